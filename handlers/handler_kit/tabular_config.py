"""The handler section of a tabular-regression archive's model-config.yaml, checked when the model
loads.

Same rules as handler_kit.config (whose helpers it uses): every model fact lives in the archive's
configuration or its checkpoint, and a wrong key fails the load naming it and what is allowed.
"""
from dataclasses import dataclass, field
from typing import Optional

from handler_kit.config import (DEVICES, check_dynamic_int8_device, check_keys, choice, meta_section,
                                positive_int, require, threads_setting)
from handler_kit.errors import ConfigError

TABULAR_QUANTIZATIONS = ("none", "dynamic_int8")


@dataclass(frozen=True)
class TabularModelSpec:
    module: str       # importable module (a file shipped in the archive) holding the factory
    factory: str      # callable in that module returning the nn.Module
    weights: str      # checkpoint file inside the archive: state_dict, preprocessing, version
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TabularRuntimeSpec:
    device: str = "auto"           # auto: the GPU TorchServe assigns, else CPU
    quantization: str = "none"     # dynamic_int8: nn.Linear weights int8 at load, CPU only
    threads: Optional[int] = None  # None: cores / workers of this model


@dataclass(frozen=True)
class TabularRegressorConfig:
    model: TabularModelSpec
    max_rows: int     # rows per request; more is refused with 413
    runtime: TabularRuntimeSpec
    meta: dict


def parse_tabular_model(section) -> TabularModelSpec:
    s = check_keys(section, ("module", "factory", "kwargs", "weights"), "handler.model")
    kwargs = s.get("kwargs", {}) or {}
    if not isinstance(kwargs, dict):
        raise ConfigError("model-config.yaml: 'handler.model.kwargs' must be a mapping")
    return TabularModelSpec(module=str(require(s, "module", "handler.model")),
                            factory=str(require(s, "factory", "handler.model")),
                            weights=str(require(s, "weights", "handler.model")), kwargs=kwargs)


def parse_tabular_runtime(section) -> TabularRuntimeSpec:
    s = check_keys(section or {}, ("device", "quantization", "threads"), "handler.runtime")
    threads = threads_setting(s)
    spec = TabularRuntimeSpec(
        device=choice(s.get("device", "auto"), DEVICES, "handler.runtime.device"),
        quantization=choice(s.get("quantization", "none"), TABULAR_QUANTIZATIONS,
                            "handler.runtime.quantization"),
        threads=threads)
    check_dynamic_int8_device(spec.quantization, spec.device)
    return spec


def parse_tabular_regressor(handler_section) -> TabularRegressorConfig:
    """Validate the ``handler:`` section of model-config.yaml for the tabular regressor."""
    s = check_keys(handler_section, ("model", "max_rows", "runtime", "meta"), "handler")
    meta = meta_section(s)
    return TabularRegressorConfig(model=parse_tabular_model(require(s, "model", "handler")),
                                  max_rows=positive_int(s.get("max_rows", 1024), "handler.max_rows"),
                                  runtime=parse_tabular_runtime(s.get("runtime")),
                                  meta=meta)
