"""The handler section of an image-classification archive's model-config.yaml, checked when the
model loads.

Same rules as handler_kit.config (whose validators it uses): every model fact lives in the archive's
configuration, and a wrong key fails the load with a message naming it and what is allowed.
"""
from dataclasses import dataclass, field
from typing import Optional

from handler_kit.config import (DEVICES, check_keys, choice, flag, floats, meta_section, positive_int,
                                require, threads_setting)
from handler_kit.errors import ConfigError

MODEL_FORMATS = ("state_dict", "torchscript", "onnx")  # picks the runtime: eager, TorchScript, ONNX Runtime
QUANTIZATIONS = ("none", "int8_x86")
DTYPES = ("float32", "bfloat16", "float16")
COLOR_MODES = ("rgb", "grayscale")
# project: [{"label", "index", "probability"}, ...] best first; stock: {"label": probability, ...}
# as TorchServe's stock image_classifier answers, for clients migrating from it.
ANSWER_FORMATS = ("project", "stock")


@dataclass(frozen=True)
class ModelSpec:
    """How to build the network and where its weights are inside the archive."""
    weights: str          # file inside the archive: a state_dict, a TorchScript or an ONNX model
    format: str = "state_dict"
    module: str = ""      # state_dict only: importable module (archive file or e.g. torchvision.models)
    factory: str = ""     # state_dict only: callable in that module returning an nn.Module
    kwargs: dict = field(default_factory=dict)
    quantization: str = "none"  # int8_x86: quantized at build time, runs on CPU only

@dataclass(frozen=True)
class ImageSpec:
    color: str            # rgb | grayscale
    resize: int           # shorter side is resized to this
    crop: int             # then a centre square of this side is cut
    mean: tuple
    std: tuple
    max_pixels: int       # decoded-size limit, checked from the header before decoding
    # decode large JPEGs reduced by libjpeg (DCT scaling) to a shorter side of at least
    # 2 x resize: measured on 12 MP photos, half the decode time, logit cosine >= 0.998
    jpeg_dct_scaling: bool = True


@dataclass(frozen=True)
class RuntimeSpec:
    device: str = "auto"          # auto: the GPU TorchServe assigns, else CPU
    dtype: str = "float32"        # float32, or autocast to bfloat16/float16
    channels_last: bool = True
    threads: Optional[int] = None  # None: cores / workers of this model
    compile: bool = False         # torch.compile the eager model at load (state_dict format only)


@dataclass(frozen=True)
class ImageClassifierConfig:
    model: ModelSpec
    image: ImageSpec
    runtime: RuntimeSpec
    labels: str
    topk: int
    meta: dict
    answer: str = "project"


def parse_model(section) -> ModelSpec:
    s = check_keys(section, ("format", "module", "factory", "weights", "kwargs", "quantization"),
                    "handler.model")
    fmt = choice(s.get("format", "state_dict"), MODEL_FORMATS, "handler.model.format")
    kwargs = s.get("kwargs", {}) or {}
    if not isinstance(kwargs, dict):
        raise ConfigError("model-config.yaml: 'handler.model.kwargs' must be a mapping")
    if fmt == "state_dict":
        module = str(require(s, "module", "handler.model"))
        factory = str(require(s, "factory", "handler.model"))
    else:
        module, factory = str(s.get("module", "")), str(s.get("factory", ""))
    return ModelSpec(weights=str(require(s, "weights", "handler.model")), format=fmt,
                     module=module, factory=factory, kwargs=kwargs,
                     quantization=choice(s.get("quantization", "none"), QUANTIZATIONS,
                                          "handler.model.quantization"))


def parse_runtime(section) -> RuntimeSpec:
    s = check_keys(section or {}, ("device", "dtype", "channels_last", "threads", "compile"),
                    "handler.runtime")
    threads = threads_setting(s)
    return RuntimeSpec(device=choice(s.get("device", "auto"), DEVICES, "handler.runtime.device"),
                       dtype=choice(s.get("dtype", "float32"), DTYPES, "handler.runtime.dtype"),
                       channels_last=flag(s, "channels_last", True, "handler.runtime"),
                       threads=threads, compile=flag(s, "compile", False, "handler.runtime"))


def check_model_runtime(model: ModelSpec, rt: RuntimeSpec) -> None:
    """Combinations that cannot work are refused at load, not at the first request."""
    if model.format != "state_dict" and rt.dtype != "float32":
        raise ConfigError(f"model-config.yaml: 'handler.runtime.dtype' {rt.dtype!r} needs "
                          f"'handler.model.format' state_dict (autocast runs on the eager model); "
                          f"{model.format} models run as exported")
    if rt.compile and model.format != "state_dict":
        raise ConfigError("model-config.yaml: 'handler.runtime.compile' needs "
                          "'handler.model.format' state_dict")
    if model.quantization == "int8_x86" and rt.device == "cuda":
        raise ConfigError("model-config.yaml: an int8_x86 quantized model runs on CPU only, "
                          "but 'handler.runtime.device' is 'cuda'")


def parse_image(section) -> ImageSpec:
    s = check_keys(section, ("color", "resize", "crop", "mean", "std", "max_pixels", "jpeg_dct_scaling"),
                   "handler.image")
    color = choice(s.get("color", "rgb"), COLOR_MODES, "handler.image.color")
    channels = 3 if color == "rgb" else 1
    resize = positive_int(require(s, "resize", "handler.image"), "handler.image.resize")
    crop = positive_int(s.get("crop", resize), "handler.image.crop")
    if crop > resize:
        raise ConfigError(f"model-config.yaml: 'handler.image.crop' ({crop}) must not exceed "
                          f"'handler.image.resize' ({resize})")
    std = floats(require(s, "std", "handler.image"), channels, "handler.image.std")
    if any(v <= 0 for v in std):
        raise ConfigError("model-config.yaml: 'handler.image.std' values must be > 0")
    return ImageSpec(color=color, resize=resize, crop=crop,
                     mean=floats(require(s, "mean", "handler.image"), channels, "handler.image.mean"),
                     std=std,
                     max_pixels=positive_int(s.get("max_pixels", 50_000_000), "handler.image.max_pixels"),
                     jpeg_dct_scaling=flag(s, "jpeg_dct_scaling", True, "handler.image"))


def parse_image_classifier(handler_section) -> ImageClassifierConfig:
    """Validate the ``handler:`` section of model-config.yaml for the image classifier."""
    s = check_keys(handler_section, ("model", "image", "runtime", "labels", "topk", "answer", "meta"),
                   "handler")
    meta = meta_section(s)
    model, rt = parse_model(require(s, "model", "handler")), parse_runtime(s.get("runtime"))
    check_model_runtime(model, rt)
    return ImageClassifierConfig(model=model, image=parse_image(require(s, "image", "handler")),
                                 runtime=rt,
                                 labels=str(require(s, "labels", "handler")),
                                 topk=positive_int(s.get("topk", 5), "handler.topk"),
                                 answer=choice(s.get("answer", "project"), ANSWER_FORMATS, "handler.answer"),
                                 meta=meta)
