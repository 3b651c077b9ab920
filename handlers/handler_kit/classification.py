"""Image classification answers: the archive's labels file, and logits -> the top-k labelled
classes of each request, in the project's or TorchServe's stock shape (handler.answer)."""
import json
from typing import List, Sequence

import torch

from handler_kit.errors import ConfigError


def load_labels(path: str, num_classes: int = None) -> List[str]:
    """Labels file: a JSON list of names, or a JSON object {"0": name, ...} (TorchServe's style)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"labels file {path} is missing from the archive") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"labels file {path} is not valid JSON: {exc}") from None
    if isinstance(raw, dict):
        try:
            raw = [raw[str(i)] for i in range(len(raw))]
        except KeyError as exc:
            raise ConfigError(f"labels file {path}: keys must be 0..{len(raw) - 1}, missing {exc}") from None
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ConfigError(f"labels file {path} must hold a list of strings")
    if num_classes is not None and len(raw) != num_classes:
        raise ConfigError(f"labels file {path} has {len(raw)} labels but the model has {num_classes} outputs")
    return raw


def topk_predictions(logits: torch.Tensor, labels: Sequence[str], k: int) -> List[List[dict]]:
    """Per row: the k most probable classes as {label, index, probability}, best first."""
    probabilities = torch.softmax(logits.float(), dim=1)
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [[{"label": labels[i], "index": i, "probability": round(p, 6)}
             for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)]


def stock_shape(topk: List[dict]) -> dict:
    """One row of ``topk_predictions`` as TorchServe's stock image_classifier answers it:
    ``{label: probability}``, best first (JSON objects keep insertion order). A label that repeats
    (ImageNet has two "crane" and two "maillot") keeps its higher probability (the stock handler's
    dict comprehension would keep the lower, later one)."""
    out = {}
    for p in topk:
        out.setdefault(p["label"], p["probability"])
    return out


def format_topk(logits: torch.Tensor, labels: Sequence[str], k: int, answer: str) -> list:
    """Per row, the answer in the archive's configured shape (handler.answer)."""
    rows = topk_predictions(logits, labels, k)
    return [stock_shape(row) for row in rows] if answer == "stock" else rows
