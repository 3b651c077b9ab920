"""Tabular-regression stages as plain functions: request -> rows -> standardized tensor -> model
-> predictions in the target's units -> response bodies; plus loading the archive's checkpoint.

The checkpoint is one torch.save'd dict {"model_state_dict", "preprocess_params", "version"} of
tensors, lists, floats and strings only (loaded with weights_only=True): the feature names and the
standardization travel with the weights they were trained with, never in handler code.
"""
import importlib
import json
import math
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from handler_kit import runtime, wire
from handler_kit.batching import split_counts
from handler_kit.errors import BadInput, ConfigError, PayloadTooLarge
from handler_kit.quantization import check_dynamic_int8_worker, quantize_dynamic_int8

# Where a request may carry its rows: the wire's usual payload fields, or a form field "inputs".
ROW_FIELDS = wire.PAYLOAD_FIELDS + ("inputs",)
INPUTS_KEY = "inputs"
CHECKPOINT_KEYS = ("model_state_dict", "preprocess_params", "version")
PREPROCESS_KEYS = ("feature_names", "mean", "std", "target_mean", "target_std")
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True, eq=False)
class PreprocessParams:
    """How raw rows become model inputs, and model outputs become target units."""
    feature_names: Tuple[str, ...]
    mean: np.ndarray        # float32, one per feature (train split)
    std: np.ndarray         # float32, one per feature, > 0
    target_mean: float
    target_std: float


# ---------------------------------------------------------------------------------------------
# the checkpoint and the model


def _vector(value, length: int, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if (not isinstance(value, (list, tuple)) or len(value) != length
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        got = f"{len(value)} values" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ConfigError(f"checkpoint: '{where}' must be a list of {length} numbers (one per feature), "
                          f"got {got}")
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ConfigError(f"checkpoint: '{where}' holds a value that is not finite")
    return array.astype(np.float32)


def _scalar(value, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"checkpoint: '{where}' must be a finite number, got {value!r}")
    return float(value)


def parse_preprocess_params(section) -> PreprocessParams:
    if not isinstance(section, dict):
        raise ConfigError(f"checkpoint: 'preprocess_params' must be a dict, got {type(section).__name__}")
    missing = [k for k in PREPROCESS_KEYS if k not in section]
    if missing:
        raise ConfigError(f"checkpoint: 'preprocess_params.{missing[0]}' is missing; it needs "
                          f"{', '.join(PREPROCESS_KEYS)}")
    names = section["feature_names"]
    if (not isinstance(names, (list, tuple)) or not names
            or not all(isinstance(n, str) and n for n in names)):
        raise ConfigError("checkpoint: 'preprocess_params.feature_names' must be a non-empty list of names")
    if len(set(names)) != len(names):
        raise ConfigError(f"checkpoint: 'preprocess_params.feature_names' repeats a name: {list(names)}")
    std = _vector(section["std"], len(names), "preprocess_params.std")
    if (std <= 0).any():
        zero = [names[i] for i in np.flatnonzero(std <= 0)]
        raise ConfigError(f"checkpoint: 'preprocess_params.std' must be > 0 for every feature; "
                          f"it is not for {', '.join(zero)} (a constant training column?)")
    target_std = _scalar(section["target_std"], "preprocess_params.target_std")
    if target_std <= 0:
        raise ConfigError("checkpoint: 'preprocess_params.target_std' must be > 0")
    return PreprocessParams(feature_names=tuple(names),
                            mean=_vector(section["mean"], len(names), "preprocess_params.mean"), std=std,
                            target_mean=_scalar(section["target_mean"], "preprocess_params.target_mean"),
                            target_std=target_std)


def load_checkpoint(path: str, device: torch.device) -> Tuple[dict, PreprocessParams, str]:
    """(state_dict, preprocessing, version) from the archive's checkpoint, loaded as plain data:
    a file carrying pickled code is refused, never executed."""
    checkpoint = runtime.load_state_dict(path, device)  # weights_only=True, map_location=device
    name = os.path.basename(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        found = ", ".join(map(str, checkpoint)) or "nothing"
        raise ConfigError(f"checkpoint {name} lacks '{missing[0]}'; it must hold "
                          f"{', '.join(CHECKPOINT_KEYS)} (found: {found})")
    state_dict, version = checkpoint["model_state_dict"], checkpoint["version"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConfigError(f"checkpoint {name}: 'model_state_dict' must be a dict of tensors")
    if not isinstance(version, str) or not version:
        raise ConfigError(f"checkpoint {name}: 'version' must be a non-empty string, got {version!r}")
    return state_dict, parse_preprocess_params(checkpoint["preprocess_params"]), version


def build_model(module: str, factory: str, kwargs: dict, state_dict: dict,
                device: torch.device) -> torch.nn.Module:
    """The architecture the configuration names, with the checkpoint's weights loaded strictly."""
    try:
        constructor = getattr(importlib.import_module(module), factory)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"handler.model: cannot import {module}.{factory}: {exc}") from None
    model = constructor(**kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys, shape mismatches
        arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ConfigError(f"checkpoint's model_state_dict does not fit {module}.{factory}({arguments}) "
                          f"(handler.model.kwargs): {exc}") from None
    return model.to(device).eval()


def check_model_fits(model: torch.nn.Module, feature_count: int, device: torch.device) -> None:
    """The model takes one row of the checkpoint's features and returns one value per row; a
    mismatch fails the load here, not as a shape error on the first request."""
    try:
        with torch.inference_mode():
            out = model(torch.zeros(2, feature_count, device=device))
    except RuntimeError as exc:
        raise ConfigError(f"the model does not take the checkpoint's {feature_count} features: "
                          f"{str(exc).splitlines()[0]}") from None
    if out.numel() != 2:
        raise ConfigError(f"the model must return one value per row, got shape {tuple(out.shape)} "
                          f"for 2 rows")


@dataclass(frozen=True, eq=False)
class Regressor:
    """A loaded model with the preprocessing and version its checkpoint carries."""
    model: torch.nn.Module
    params: PreprocessParams
    version: str
    device: torch.device

    def predict_rows(self, rows: np.ndarray) -> np.ndarray:
        """Predictions in the target's units (float64) for raw rows [n, features]."""
        outputs = predict(self.model, standardize(np.asarray(rows, np.float32), self.params), self.device)
        return to_target_units(outputs, self.params)


def load_regressor(path: str, model_spec, device: torch.device, quantization: str = "none") -> Regressor:
    """Checkpoint -> model checked against its features -> optionally dynamic int8 (CPU only).
    ``model_spec``: handler.model (module, factory, kwargs) from tabular_config."""
    check_dynamic_int8_worker(quantization, device)
    state_dict, params, version = load_checkpoint(path, device)
    model = build_model(model_spec.module, model_spec.factory, model_spec.kwargs, state_dict, device)
    check_model_fits(model, len(params.feature_names), device)
    if quantization == "dynamic_int8":
        model = quantize_dynamic_int8(model)
    return Regressor(model=model, params=params, version=version, device=device)


# ---------------------------------------------------------------------------------------------
# request -> rows


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value[:20]!r}" + ("..." if len(value) > 20 else "")
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def _parse_body(value):
    """A body that did not arrive parsed (raw bytes: JSON sent with another content type, or JSON
    that did not decode; text/* as str) -> its JSON value."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(f"request body is not UTF-8 (invalid byte at position {exc.start}); "
                           "send JSON rows as UTF-8 text") from None
    if isinstance(value, str):
        if not value.strip():
            raise BadInput("request body is empty; send JSON rows")
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadInput(f"request body is not valid JSON: {exc}") from None
        except RecursionError:  # e.g. "[[[[..." thousands deep; must not fail the whole batch
            raise BadInput("request body is not valid JSON: nested too deeply") from None
    return value


def _rows_in(value, feature_names: Sequence[str]) -> list:
    """A parsed JSON body -> list of candidate rows (checked by the caller)."""
    if isinstance(value, dict) and INPUTS_KEY in value and INPUTS_KEY not in feature_names:
        extra = sorted(k for k in value if k != INPUTS_KEY)
        if extra:
            raise BadInput(f"JSON object with '{INPUTS_KEY}' must have no other keys; found: {', '.join(extra)}")
        value = value[INPUTS_KEY]
        if not isinstance(value, (list, dict)):
            raise BadInput(f"JSON field '{INPUTS_KEY}' must be a list of rows, got {_json_type(value)}")
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        if value and not any(isinstance(v, (list, dict)) for v in value):
            return [value]  # a flat list is one row of values
        return value
    raise BadInput(f"JSON body must be a row (a list of {len(feature_names)} numbers, or an object "
                   f"feature name -> number), a list of rows, or {{\"{INPUTS_KEY}\": [rows]}}; "
                   f"got {_json_type(value)}")


NUMBER_TYPES = (int, float)  # what json gives for numbers; bool (an int subclass) is not one


def _not_a_number(value, row: int, name: str) -> BadInput:
    return BadInput(f"row {row}, feature '{name}': expected a number, got {_json_type(value)}")


def _check_finite(value, row: int, name: str) -> None:
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not -FLOAT32_MAX <= number <= FLOAT32_MAX:  # also false for NaN
        if math.isnan(number):
            what = "NaN"
        elif isinstance(value, float) and math.isinf(value):
            what = "Infinity" if value > 0 else "-Infinity"
        else:
            what = "a value beyond the float32 range"
        raise BadInput(f"row {row}, feature '{name}': {what} is not allowed; send finite numbers")


def _row_values(row, index: int, feature_names: Sequence[str], known: frozenset) -> list:
    """One row's values in feature order, each a JSON number (range checked by the caller)."""
    count = len(feature_names)
    if isinstance(row, dict):
        unknown = [k for k in row if k not in known]
        if unknown:
            raise BadInput(f"row {index}: unknown feature '{unknown[0]}'; the features are "
                           f"{', '.join(feature_names)}")
        missing = [n for n in feature_names if n not in row]
        if missing:
            raise BadInput(f"row {index}: missing feature{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(repr(n) for n in missing)}; every row needs all {count}")
        values = [row[n] for n in feature_names]
    elif isinstance(row, list):
        if len(row) != count:
            raise BadInput(f"row {index} has {len(row)} values; expected {count} "
                           f"({', '.join(feature_names)})")
        values = row
    else:
        raise BadInput(f"row {index} must be a list of {count} numbers or an object feature name -> "
                       f"number, got {_json_type(row)}")
    # type(), not isinstance(): true/false are not measurements
    if not all(type(v) in NUMBER_TYPES for v in values):
        name, value = next((n, v) for n, v in zip(feature_names, values) if type(v) not in NUMBER_TYPES)
        raise _not_a_number(value, index, name)
    return values


def rows_of(request, feature_names: Sequence[str], max_rows: int) -> np.ndarray:
    """One request's rows as a float32 array [rows, features], whatever the wire format: a row
    ([n numbers] or {name: number}), a list of rows, or {"inputs": [rows]}, as a parsed JSON body
    or as raw UTF-8 JSON text."""
    _, value = wire.payload_field(request, ROW_FIELDS, (bytes, bytearray, str, dict, list),
                                  'JSON rows, e.g. [[...], ...] or {"inputs": [...]}')
    rows = _rows_in(_parse_body(value), feature_names)
    if not rows:
        raise BadInput("no rows: the list is empty")
    if len(rows) > max_rows:
        raise PayloadTooLarge(f"{len(rows)} rows in one request, above the limit of {max_rows}; "
                              "split them over several requests")
    known = frozenset(feature_names)
    values = [_row_values(row, i, feature_names, known) for i, row in enumerate(rows)]
    try:
        array = np.asarray(values, dtype=np.float64)
        in_range = bool((np.abs(array) <= FLOAT32_MAX).all())  # false for NaN and infinities
    except OverflowError:  # an integer too large for a float
        in_range = False
    if not in_range:  # rare: find the first bad value to name it
        for i, row in enumerate(values):
            for name, v in zip(feature_names, row):
                _check_finite(v, i, name)
    return array.astype(np.float32).reshape(len(rows), len(feature_names))


# ---------------------------------------------------------------------------------------------
# rows -> predictions -> response bodies


def standardize(rows: np.ndarray, params: PreprocessParams) -> torch.Tensor:
    """(rows - train mean) / train std per feature, float32: the scale the model was trained on."""
    return torch.from_numpy(((rows - params.mean) / params.std).astype(np.float32, copy=False))


def predict(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One standardized prediction per row, float32 on the CPU."""
    with torch.inference_mode():
        return model(x.to(device, non_blocking=True)).reshape(-1).float().cpu()


def to_target_units(outputs: torch.Tensor, params: PreprocessParams) -> np.ndarray:
    """Standardized model outputs -> the target's units (float64: no float32 rounding on top)."""
    return outputs.double().numpy() * params.target_std + params.target_mean


def format_predictions(outputs: torch.Tensor, counts: Sequence[int], params: PreprocessParams,
                       version: str) -> List[dict]:
    """Response body of each request: its predictions in the target's units, in row order."""
    values = to_target_units(outputs, params).tolist()
    return [{"predictions": chunk, "model_version": version} for chunk in split_counts(values, counts)]
