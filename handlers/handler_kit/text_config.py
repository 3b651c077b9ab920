"""The handler section of a text-embedding archive's model-config.yaml, checked when the model loads.

Same rules as handler_kit.config (whose helpers it uses): every model fact lives in the archive's
configuration, and a wrong key fails the load with a message naming it and what is allowed.
"""
from dataclasses import dataclass
from typing import Optional

from handler_kit.config import (DEVICES, check_dynamic_int8_device, check_keys, choice, meta_section,
                                positive_int, require, threads_setting)
from handler_kit.errors import ConfigError

TEXT_DTYPES = ("float32", "bfloat16")
TEXT_QUANTIZATIONS = ("none", "dynamic_int8")


@dataclass(frozen=True)
class TextRuntimeSpec:
    device: str = "auto"           # auto: the GPU TorchServe assigns, else CPU
    dtype: str = "float32"         # float32, or autocast to bfloat16
    quantization: str = "none"     # dynamic_int8: nn.Linear weights int8 at load, CPU only
    threads: Optional[int] = None  # None: cores / workers of this model


@dataclass(frozen=True)
class TextEmbedderConfig:
    model_path: str   # folder inside the archive with config.json, tokenizer files, model.safetensors
    max_length: int   # tokens per text (special tokens included); longer texts are truncated
    max_chars: int    # characters per text; longer texts are refused with 413
    max_texts: int    # texts per request
    runtime: TextRuntimeSpec
    meta: dict


def parse_text_runtime(section) -> TextRuntimeSpec:
    s = check_keys(section or {}, ("device", "dtype", "quantization", "threads"), "handler.runtime")
    threads = threads_setting(s)
    spec = TextRuntimeSpec(
        device=choice(s.get("device", "auto"), DEVICES, "handler.runtime.device"),
        dtype=choice(s.get("dtype", "float32"), TEXT_DTYPES, "handler.runtime.dtype"),
        quantization=choice(s.get("quantization", "none"), TEXT_QUANTIZATIONS,
                             "handler.runtime.quantization"),
        threads=threads)
    check_dynamic_int8_device(spec.quantization, spec.device)
    if spec.quantization == "dynamic_int8" and spec.dtype != "float32":
        # int8 Linear layers compute in float32; autocast on top would only add casts.
        raise ConfigError("model-config.yaml: 'handler.runtime.quantization' dynamic_int8 needs "
                          f"'handler.runtime.dtype' float32, got {spec.dtype!r}")
    return spec


def parse_text_embedder(handler_section) -> TextEmbedderConfig:
    """Validate the ``handler:`` section of model-config.yaml for the text embedder."""
    s = check_keys(handler_section, ("model", "max_length", "max_chars", "max_texts", "runtime", "meta"),
                    "handler")
    model = check_keys(require(s, "model", "handler"), ("path",), "handler.model")
    meta = meta_section(s)
    return TextEmbedderConfig(
        model_path=str(require(model, "path", "handler.model")),
        max_length=positive_int(s.get("max_length", 256), "handler.max_length"),
        max_chars=positive_int(s.get("max_chars", 10_000), "handler.max_chars"),
        max_texts=positive_int(s.get("max_texts", 64), "handler.max_texts"),
        runtime=parse_text_runtime(s.get("runtime")),
        meta=meta)
