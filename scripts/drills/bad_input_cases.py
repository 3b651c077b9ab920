"""The bad-input corpus's data (scripts/drills/bad_inputs.py is the command and the judging): what a
case and a good request are, how a 200 answer is checked, the encoders the cases share, and the
text and tabular families' cases (scripts/drills/bad_input_images.py: the image family's).

Which builder a model gets is its family's samples (models/families.py): ``*_cases(model,
limits, max_request_size)`` and ``*_requests(model)`` here are named there; the limits come
from the model's handler config (the family declares where, and the handler's defaults).
"""
import base64
import io
import json
import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import urllib3
from PIL import Image

JPEG, PNG, GIF, WEBP = "image/jpeg", "image/png", "image/gif", "image/webp"
JSON, TEXT, OCTETS = "application/json", "text/plain; charset=utf-8", "application/octet-stream"
MULTIPART_BOUNDARY = "bad-inputs-boundary-7f3a"  # fixed, so that --write is reproducible

# ---------------------------------------------------------------------------------------------
# what a case is, and how its answer is checked


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    body: bytes
    content_type: str
    status: int                     # the status the server must answer with
    message: str = ""               # for a 4xx: fragment its JSON "message" must contain (any case)
    what: str = ""                  # for people: what the input is
    # For a 200: checks of the answer on its own, and against the answer to ``reference`` (an
    # equivalent request: the upright image for an EXIF-rotated one, the RGB original...).
    checks: Tuple["AnswerCheck", ...] = ()
    reference: Optional[bytes] = None
    reference_content_type: str = OCTETS
    # How far the answer may be from the reference's: probabilities (absolute; answers carry 6
    # decimals), embeddings (1 - cosine), predictions (relative).
    tolerance: float = 2e-6
    soak: bool = True               # part of the soak's mix (False: too big or too slow to repeat)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.name}"


@dataclass(frozen=True)
class AnswerCheck:
    """One property of a 200 answer: ``kind`` names the rule, ``value`` its parameter."""
    kind: str
    value: object = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value}"

    def problem(self, answer) -> Optional[str]:
        return ANSWER_RULES[self.kind](answer, self.value)


def _topk_problem(answer, k) -> Optional[str]:
    if not isinstance(answer, list) or not answer:
        return f"expected a top-k list, got {_short(answer)}"
    if not all(isinstance(p, dict) and {"label", "index", "probability"} <= set(p) for p in answer):
        return f"top-k entries need label, index and probability: {_short(answer)}"
    probabilities = [p["probability"] for p in answer]
    if probabilities != sorted(probabilities, reverse=True) or not all(0 <= p <= 1 for p in probabilities):
        return f"probabilities must be in [0, 1], most probable first: {probabilities}"
    if k is not None and len(answer) != k:
        return f"expected {k} classes, got {len(answer)}"
    return None


def _label_problem(answer, label) -> Optional[str]:
    problem = _topk_problem(answer, None)
    if problem:
        return problem
    return None if answer[0]["label"] == label else f"top-1 is {answer[0]['label']!r}, expected {label!r}"


def _embeddings_problem(answer, count) -> Optional[str]:
    if not isinstance(answer, dict) or not isinstance(answer.get("embeddings"), list):
        return f"expected {{\"embeddings\": [...]}}, got {_short(answer)}"
    vectors = np.asarray(answer["embeddings"], dtype=np.float64)
    if vectors.ndim != 2 or (count is not None and vectors.shape[0] != count):
        return f"expected {count} vectors, got an array of shape {vectors.shape}"
    if not np.isfinite(vectors).all() or not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3):
        return "vectors must be finite and of unit length"
    return None


def _predictions_problem(answer, count) -> Optional[str]:
    if not isinstance(answer, dict) or not isinstance(answer.get("predictions"), list):
        return f"expected {{\"predictions\": [...]}}, got {_short(answer)}"
    values = answer["predictions"]
    if count is not None and len(values) != count:
        return f"expected {count} predictions, got {len(values)}"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return f"predictions must be finite numbers: {values}"
    return None


ANSWER_RULES: Dict[str, Callable] = {"topk": _topk_problem, "label": _label_problem,
                                     "embeddings": _embeddings_problem,
                                     "predictions": _predictions_problem}


def _short(value, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# encoders for the inputs


def encode_image(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def multipart(fields: Sequence[Tuple[str, str, bytes, str]]) -> Tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request: fields (name, filename, data, type)."""
    return urllib3.encode_multipart_formdata([(n, (f, d, t)) for n, f, d, t in fields],
                                             boundary=MULTIPART_BOUNDARY)


def b64_json(data: bytes, key: str = "data", prefix: str = "") -> bytes:
    return json.dumps({key: prefix + base64.b64encode(data).decode()}).encode()


def oversized_body(max_request_size: int, start: bytes = b"\xff\xd8\xff\xe0") -> bytes:
    """One byte over the server's max_request_size (TorchServe refuses it before any worker)."""
    return start + b"\x00" * (max_request_size + 1 - len(start))


# ---------------------------------------------------------------------------------------------
# the corpus


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# Nesting deeper than Python's JSON reader can recurse: json.loads raises RecursionError, not a
# JSONDecodeError.
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
DEEP_JSON_WHAT = "JSON lists nested 100000 deep (200 KB)"
HTML = b"<!DOCTYPE html>\n<html><head><title>not an image</title></head><body><img src=x></body></html>\n"


@dataclass(frozen=True)
class GoodRequest:
    name: str
    model: str
    body: bytes
    content_type: str
    checks: Tuple[AnswerCheck, ...] = ()
    # how far its answer in any batch may be from its answer alone: kernels differ by batch size and
    # CPU capability in the 6th decimal of a probability (tests/answers.py has the same 1e-4)
    tolerance: float = 1e-4


def text_cases(model: str, max_chars: int, max_texts: int, max_request_size: Optional[int]) -> List[Case]:
    """Sentence-embedding models: UTF-8 text, a JSON list of texts or {"inputs": [...]}."""
    sentence = "A man is playing a guitar."
    one = (AnswerCheck("embeddings", 1),)
    same_as_sentence = dict(status=200, checks=one, reference=sentence.encode(), reference_content_type=TEXT,
                            tolerance=1e-4)
    cases = [
        Case("zero_bytes", model, b"", TEXT, 400, "empty", "an empty text/plain body"),
        Case("zero_bytes_octets", model, b"", OCTETS, 400, "empty", "an empty body with no text content type"),
        Case("whitespace_only", model, b"  \n\t  ", TEXT, 400, "empty", "only whitespace"),
        Case("non_utf8", model, b"caf\xe9 cr\xe8me", TEXT, 400, "not UTF-8",
             "Latin-1 text sent as text/plain (TorchServe forwards the undecodable bytes)"),
        Case("random_bytes", model, _random_bytes(2048, seed=1), OCTETS, 400, "not UTF-8", "2 KiB of random bytes"),
        Case("over_max_chars", model, ("word " * (max_chars // 5 + 1)).encode()[:max_chars + 1], TEXT, 413,
             "above the limit", f"{max_chars + 1} characters, one above max_chars"),
        Case("over_max_chars_in_list", model, json.dumps(["short", "x" * (max_chars + 1)]).encode(), JSON,
             413, "text 1", "the second text of a list one character too long"),
        Case("too_many_texts", model, json.dumps(["t"] * (max_texts + 1)).encode(), JSON, 400,
             "above the limit", f"{max_texts + 1} texts in one request"),
        Case("json_empty_list", model, b"[]", JSON, 400, "empty", "an empty JSON list"),
        Case("json_wrong_key", model, b'{"text": "hello"}', JSON, 400, "found keys: text",
             "JSON {\"text\": ...} instead of {\"inputs\": ...}"),
        Case("json_inputs_number", model, b'{"inputs": 5}', JSON, 400, "must be a string or a list",
             "JSON {\"inputs\": 5}"),
        Case("json_list_with_number", model, b'["fine", 5]', JSON, 400, "text 1 must be a string",
             "a list holding a number"),
        Case("json_list_with_null", model, b'["fine", null]', JSON, 400, "text 1 must be a string",
             "a list holding null"),
        Case("json_nan", model, b"[NaN]", JSON, 400, "text 0 must be a string", "[NaN]"),
        Case("json_list_with_empty_text", model, b'["fine", ""]', JSON, 400, "text 1 is empty",
             "a list holding an empty text"),
        Case("json_nested_lists", model, b'[["a", "b"]]', JSON, 400, "text 0 must be a string",
             "a list of lists"),
        Case("json_number", model, b"42", JSON, 400, "int", "a bare JSON number"),
        Case("json_broken", model, b'{"inputs": ["abc"', JSON, 400, "not valid JSON", "JSON cut short"),
        Case("json_deeply_nested", model, DEEP_JSON, JSON, 400, "JSON", DEEP_JSON_WHAT),
        Case("multipart_two_fields", model, *multipart([("a", "a.txt", b"one", "text/plain"),
                                                        ("b", "b.txt", b"two", "text/plain")]),
             400, "several payload fields", "a multipart form with two text fields"),
        Case("valid_inputs_list", model, json.dumps({"inputs": [sentence, "Kids play soccer."]}).encode(), JSON,
             200, checks=(AnswerCheck("embeddings", 2),), what="{\"inputs\": [two texts]}: two vectors"),
        Case("valid_unicode", model, "Ünïcödé ✓ 日本語のテキスト 🎸".encode(), TEXT, 200, checks=one,
             what="non-ASCII UTF-8 text: one vector"),
        Case("valid_control_characters", model, b"tab\there\x00nul\x07bell", TEXT, 200, checks=one,
             what="UTF-8 text with NUL and control characters: one vector"),
        Case("valid_at_max_chars", model, ("word " * (max_chars // 5 + 1)).encode()[:max_chars], TEXT, 200,
             checks=one, soak=False, what=f"exactly max_chars = {max_chars} characters: answered (truncated)"),
        Case("text_as_octets", model, sentence.encode(), OCTETS,
             what="the sentence with Content-Type application/octet-stream: the same vector", **same_as_sentence),
        Case("text_as_image_content_type", model, sentence.encode(), PNG,
             what="the sentence with Content-Type image/png: the same vector", **same_as_sentence),
        Case("json_string", model, json.dumps(sentence).encode(), JSON,
             what="the sentence as a JSON string: the same vector", **same_as_sentence),
        Case("multipart_text", model, *multipart([("data", "s.txt", sentence.encode(), "text/plain")]),
             what="the sentence as a multipart upload: the same vector", **same_as_sentence),
    ]
    if max_request_size:
        cases.append(Case("over_max_request_size", model, oversized_body(max_request_size, b"word "), TEXT, 413,
                          "", f"a body of max_request_size + 1 = {max_request_size + 1} bytes", soak=False))
    return cases


def tabular_cases(model: str, rows: np.ndarray, feature_names: Sequence[str], max_rows: int,
                  max_request_size: Optional[int]) -> List[Case]:
    """Tabular regressors: a row of numbers, {name: number}, a list of rows or {"inputs": rows}."""
    row = [float(v) for v in rows[0]]
    named = dict(zip(feature_names, row))
    count = len(feature_names)
    one = (AnswerCheck("predictions", 1),)
    as_row = dict(status=200, checks=one, reference=json.dumps([row]).encode(), reference_content_type=JSON,
                  tolerance=1e-4)

    def named_with(**changes) -> bytes:  # NaN/Infinity written as JSON's non-standard literals
        return json.dumps({**named, **changes}).encode()

    def without(name: str) -> bytes:
        return json.dumps({k: v for k, v in named.items() if k != name}).encode()

    cases = [
        Case("zero_bytes", model, b"", JSON, 400, "empty", "an empty body"),
        Case("random_bytes", model, _random_bytes(1024, seed=2), OCTETS, 400, "not UTF-8", "1 KiB of random bytes"),
        Case("not_json", model, b"age=59&sex=2", TEXT, 400, "not valid JSON", "a form-encoded string"),
        Case("json_broken", model, b"[59, 2, 32.1", JSON, 400, "not valid JSON", "JSON cut short"),
        Case("too_few_values", model, json.dumps(row[:-1]).encode(), JSON, 400, f"expected {count}",
             f"a row of {count - 1} numbers"),
        Case("too_many_values", model, json.dumps(row + [1.0]).encode(), JSON, 400, f"expected {count}",
             f"a row of {count + 1} numbers"),
        Case("nan_value", model, named_with(bmi=float("nan")), JSON, 400, "bmi", "bmi: NaN"),
        Case("infinite_value", model, named_with(s5=float("inf")), JSON, 400, "s5", "s5: Infinity"),
        Case("overflowing_value", model, named_with(bp=1e39), JSON, 400, "bp", "bp: 1e39 (beyond float32)"),
        Case("nan_in_list_row", model, json.dumps(row[:2] + [float("nan")] + row[3:]).encode(), JSON, 400,
             feature_names[2], "a list row with NaN as its third value"),
        Case("string_value", model, named_with(bp="high"), JSON, 400, "bp", "bp: \"high\""),
        Case("numeric_string_value", model, named_with(age="59"), JSON, 400, "age", "age: \"59\" (a string)"),
        Case("null_value", model, named_with(s1=None), JSON, 400, "s1", "s1: null"),
        Case("boolean_value", model, named_with(sex=True), JSON, 400, "sex",
             "sex: true (JSON true is not a measurement)"),
        Case("missing_feature", model, without("s6"), JSON, 400, "s6", "an object without s6"),
        Case("unknown_feature", model, named_with(bmii=1.0), JSON, 400, "bmii", "an object with a misspelt bmii"),
        Case("empty_list", model, b"[]", JSON, 400, "empty", "an empty list of rows"),
        Case("empty_object", model, b"{}", JSON, 400, "missing", "an empty object"),
        Case("inputs_not_a_list", model, b'{"inputs": "59, 2, 32.1"}', JSON, 400, "inputs",
             "{\"inputs\": a string}"),
        Case("inputs_with_extra_key", model, json.dumps({"inputs": [row], "debug": True}).encode(), JSON, 400,
             "debug", "{\"inputs\": ..., \"debug\": true}"),
        Case("row_of_wrong_type", model, json.dumps([row, "oops"]).encode(), JSON, 400, "row 1",
             "a list of rows whose second row is a string"),
        Case("named_row", model, json.dumps(named).encode(), JSON,
             what="the row as {name: value}: the same prediction as the list row", **as_row),
        Case("inputs_rows", model, json.dumps({"inputs": [row, row]}).encode(), JSON, 200,
             checks=(AnswerCheck("predictions", 2),), what="{\"inputs\": [row, row]}: two predictions"),
        Case("row_as_text_content_type", model, json.dumps([row]).encode(), "text/plain",
             what="the JSON row sent as text/plain: the same prediction", **as_row),
        Case("row_as_octets", model, json.dumps([row]).encode(), OCTETS,
             what="the JSON row sent as application/octet-stream: the same prediction", **as_row),
        Case("huge_integer", model, named_with(age=10 ** 400), JSON, 400, "age",
             "age: a 401-digit integer (Python's JSON reader makes it an int, too large for a float)"),
        Case("too_many_rows", model, json.dumps([row] * (max_rows + 1)).encode(), JSON, 413, "above the limit",
             f"{max_rows + 1} rows, one above max_rows"),
        Case("json_deeply_nested", model, DEEP_JSON, JSON, 400, "JSON", DEEP_JSON_WHAT),
    ]
    if max_request_size:
        cases.append(Case("over_max_request_size", model, oversized_body(max_request_size, b"[[1, 2"), JSON, 413,
                          "", f"a body of max_request_size + 1 = {max_request_size + 1} bytes", soak=False))
    return cases


# ---------------------------------------------------------------------------------------------
# the text and tabular samples: cases and good requests (named in models/families.py)


def sentence_cases(model: str, limits: dict, max_request_size: Optional[int]) -> List[Case]:
    return text_cases(model, limits["max_chars"], limits["max_texts"], max_request_size)


def sentence_requests(model: str) -> List[GoodRequest]:
    from models import sentences
    texts = [t for pair in sentences.PARAPHRASES[:6] for t in pair]
    return [GoodRequest(f"sentence_{i}", model, t.encode(), TEXT, (AnswerCheck("embeddings", 1),), 1e-4)
            for i, t in enumerate(texts)]


def diabetes_rows() -> Tuple[np.ndarray, List[str]]:
    """Rows of scikit-learn's diabetes set in its own units (what a client sends), and the names."""
    from sklearn.datasets import load_diabetes
    data = load_diabetes(scaled=False)
    return data.data.astype(np.float32), list(data.feature_names)


def row_cases(model: str, limits: dict, max_request_size: Optional[int]) -> List[Case]:
    rows, names = diabetes_rows()
    return tabular_cases(model, rows[:1], names, limits["max_rows"], max_request_size)


def row_requests(model: str) -> List[GoodRequest]:
    rows, _ = diabetes_rows()
    return [GoodRequest(f"row_{i}", model, json.dumps([[float(v) for v in rows[i]]]).encode(), JSON,
                        (AnswerCheck("predictions", 1),), 1e-4) for i in range(10, 20)]
