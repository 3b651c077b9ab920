"""Rules every family's model-config.yaml ``handler:`` section follows, and the validators that
enforce them; each family's schema is its own module (image_config, text_config, tabular_config).

Every model fact (sizes, mean/std, labels, dtype, weights) lives in the archive's configuration;
handlers hold none. A wrong key fails the load with a message naming it and what is allowed.
"""
from typing import Any, Optional

from handler_kit.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def require(section: dict, key: str, where: str):
    if key not in section:
        raise ConfigError(f"model-config.yaml: '{where}.{key}' is missing")
    return section[key]


def check_keys(section: Any, allowed: tuple, where: str) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"model-config.yaml: '{where}' must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"model-config.yaml: unknown key '{where}.{unknown[0]}'; "
                          f"allowed keys: {', '.join(allowed)}")
    return section


def choice(value, allowed: tuple, where: str):
    if value not in allowed:
        raise ConfigError(f"model-config.yaml: '{where}' is {value!r}; allowed values: {', '.join(allowed)}")
    return value


def positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model-config.yaml: '{where}' must be a positive integer, got {value!r}")
    return value


def floats(value, length: int, where: str) -> tuple:
    if (not isinstance(value, (list, tuple)) or len(value) != length
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"model-config.yaml: '{where}' must be a list of {length} numbers, got {value!r}")
    return tuple(float(v) for v in value)


def flag(section: dict, key: str, default: bool, where: str) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"model-config.yaml: '{where}.{key}' must be true or false, got {value!r}")
    return value


def threads_setting(section: dict) -> Optional[int]:
    """handler.runtime.threads: 'auto' (None: cores / workers of the model) or a positive int."""
    threads = section.get("threads", "auto")
    return None if threads == "auto" else positive_int(threads, "handler.runtime.threads")


def meta_section(section: dict) -> dict:
    meta = section.get("meta", {}) or {}
    if not isinstance(meta, dict):
        raise ConfigError("model-config.yaml: 'handler.meta' must be a mapping")
    return meta


def check_dynamic_int8_device(quantization: str, device: str) -> None:
    """Dynamic int8 (text, tabular) runs on CPU only: refuse a configured cuda device."""
    if quantization == "dynamic_int8" and device == "cuda":
        raise ConfigError("model-config.yaml: 'handler.runtime.quantization' dynamic_int8 runs on CPU "
                          "only, but 'handler.runtime.device' is 'cuda'; use device cpu (or auto "
                          "without a GPU), or quantization none")
