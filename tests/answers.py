"""Comparing model answers that were computed in different batches, processes or machines.

The same input through the same model does not give the same last bits everywhere: oneDNN and
ATen pick kernels by batch size, thread count and CPU capability (AVX2, AVX-512, AMX), so a
probability can move in its 6th decimal depending on which other requests shared its
server-side batch (seen: 0.995762 alone vs 0.995761 in a batch, AVX-512). Answers are therefore
compared with tolerances that are far above that rounding and far below the differences the
tests look for (another model version, another input, a wrong preprocessing step):

- probabilities: ``PROBABILITY_ATOL`` = 1e-4 absolute. Kernel rounding moves a softmax output
  by ~1e-6 (and the answer is rounded to 6 decimals); two trained versions of digits differ by
  more than 1e-3 on most held-out images (checked by the version tests).
- embedding components: ``EMBEDDING_ATOL`` = 1e-4 absolute on unit vectors (fp32 rounding
  across batches ~1e-6; the cosine of unrelated sentences is < 0.9).
- regression predictions: ``PREDICTION_RTOL`` = 1e-4 relative (fp32 rounding ~1e-6 relative;
  targets are 25-346).

A top-k list may swap two labels whose probabilities are within the tolerance (a near tie), and
the k-th label may change if it ties with the (k+1)-th; any other change is a different answer.
Exact equality stays only where the same computation is repeated on the same batch.
"""
import math
import re
from typing import Any, Iterable

PROBABILITY_ATOL = 1e-4
EMBEDDING_ATOL = 1e-4
PREDICTION_RTOL = 1e-4


def is_topk(answer: Any) -> bool:
    return (isinstance(answer, list) and bool(answer)
            and all(isinstance(p, dict) and {"label", "probability"} <= set(p) for p in answer))


def topk_close(a: list, b: list, atol: float = PROBABILITY_ATOL) -> bool:
    if len(a) != len(b):
        return False
    probs_a = {p["label"]: p["probability"] for p in a}
    probs_b = {p["label"]: p["probability"] for p in b}
    for mine, theirs in ((probs_a, probs_b), (probs_b, probs_a)):
        floor = min(theirs.values())
        for label, p in mine.items():
            if label in theirs:
                if abs(p - theirs[label]) > atol:
                    return False
            elif p > floor + atol:  # only a label tied with the other's last one may be missing
                return False
    # order: most probable first; a swap is allowed only between near ties
    for first, second in zip(a, b):
        if first["label"] != second["label"] and abs(first["probability"] - second["probability"]) > atol:
            return False
    return True


def _numbers_close(a: Iterable, b: Iterable, atol: float, rtol: float = 0.0) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(
        math.isclose(float(x), float(y), abs_tol=atol, rel_tol=rtol) for x, y in zip(a, b))


def answers_close(a: Any, b: Any) -> bool:
    """Whether two answers of this project's handlers are the same answer (see the module doc)."""
    if is_topk(a) and is_topk(b):
        return topk_close(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return False
        for key in a:
            if key == "embeddings":
                if len(a[key]) != len(b[key]) or not all(
                        _numbers_close(u, v, EMBEDDING_ATOL) for u, v in zip(a[key], b[key])):
                    return False
            elif key == "predictions":
                if not _numbers_close(a[key], b[key], 0.0, PREDICTION_RTOL):
                    return False
            elif a[key] != b[key]:
                return False
        return True
    if isinstance(a, list) and isinstance(b, list):  # e.g. several top-k lists
        return len(a) == len(b) and all(answers_close(x, y) for x, y in zip(a, b))
    return a == b


def assert_answers_close(a: Any, b: Any, what: str = "") -> None:
    assert answers_close(a, b), f"{what}: answers differ beyond kernel rounding:\n  {a}\n  {b}"


_NUMBER = re.compile(r"-?\d+\.\d+")


def summaries_close(a: str, b: str) -> bool:
    """Two printed answer summaries (e.g. ``4-d [0.5000, -0.2500, ...]`` or ``151.23``): the same
    text, except that printed numbers may differ by one unit in their last printed decimal plus
    ``PREDICTION_RTOL`` (a value on a rounding boundary prints either way)."""
    if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
        return False
    for x, y in zip(_NUMBER.findall(a), _NUMBER.findall(b)):
        unit = 10.0 ** -len(x.split(".")[1])
        if not math.isclose(float(x), float(y), abs_tol=unit * 1.01, rel_tol=PREDICTION_RTOL):
            return False
    return True
