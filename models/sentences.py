"""Real sentence pairs for the text-embedding fidelity gate: paraphrases (same meaning, other
words) and unrelated pairs built from them (same style, different meaning). A variant keeps the
model's behaviour when every paraphrase pair still scores above every unrelated pair."""
from typing import List, Tuple

PARAPHRASES: List[Tuple[str, str]] = [
    ("A man is playing a guitar.", "A person plays the guitar."),
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply on the exchange today."),
    ("She is cooking dinner in the kitchen.", "A woman prepares a meal in the kitchen."),
    ("The train to Paris was delayed by two hours.", "Our train to Paris arrived two hours late."),
    ("Children are playing football in the park.", "Kids play soccer in a park."),
    ("The meeting has been moved to Thursday afternoon.", "We rescheduled the meeting for Thursday afternoon."),
    ("This laptop battery drains too quickly.", "The battery of my notebook runs out very fast."),
    ("It is going to rain heavily tomorrow.", "Tomorrow's forecast says there will be a downpour."),
    ("The museum is closed on Mondays.", "You cannot visit the museum on a Monday."),
    ("He adopted a puppy from the shelter.", "He took home a young dog from the animal shelter."),
    ("Please turn off the lights when you leave.", "Switch the lights off as you go out, please."),
]


UNRELATED_SHIFT = 5


def unrelated_pairs(shift: int = UNRELATED_SHIFT) -> List[Tuple[str, str]]:
    """Each first sentence with the second sentence of another pair."""
    n = len(PARAPHRASES)
    return [(a, PARAPHRASES[(i + shift) % n][1]) for i, (a, _) in enumerate(PARAPHRASES)]


def fidelity_sentences() -> List[str]:
    """Every distinct sentence, first sentences then second sentences."""
    return [a for a, _ in PARAPHRASES] + [b for _, b in PARAPHRASES]
