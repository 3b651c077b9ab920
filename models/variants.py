"""Optimized variants of a trained fp32 model, made at build time, and the data that checks them.

Each transform takes the fp32 eager model and writes one artifact the handler's runtimes load:
TorchScript (traced, frozen, optimized for inference), int8 TorchScript (static post-training
quantization for the x86 backend, calibrated on real data, conv+BN(+ReLU) fused first), or ONNX
(dynamic batch size). The fidelity sets are real images preprocessed by the handler's own stages.
"""
import copy
import warnings
from typing import Iterable, List, Sequence

import torch
from torchvision.transforms import v2

from handler_kit import vision
from models import sample_data
from models.weights import photo_crops

# Calibration / fidelity data sets a catalog entry may name.
CALIBRATION_SETS = ("digits_train", "photo_crops", "none")


def calibration_batches(name: str, image: dict, count: int = 128, batch_size: int = 32) -> List[torch.Tensor]:
    """Inputs that set the int8 activation ranges: the digits training split, or ``count``
    random resized crops/flips of the two photographs (seed 1; the fidelity set uses others)."""
    if name == "none":  # deliberately uncalibrated: only to show that the fidelity gate refuses it
        return []
    if name == "digits_train":
        images, _, _, _ = sample_data.digits_split()
        batch = vision.to_batch([torch.from_numpy(p).unsqueeze(0) for p in images], image["mean"], image["std"])
    elif name == "photo_crops":
        batch = photo_crops(count, 1, image["crop"], image["mean"], image["std"])
    else:
        raise ValueError(f"calibration set {name!r} is unknown; allowed: {', '.join(CALIBRATION_SETS)}")
    return list(batch.split(batch_size))


def digits_heldout(image: dict):
    """(inputs, labels) of the digits test split, exactly as the handler preprocesses PNGs."""
    _, _, images, labels = sample_data.digits_split()
    inputs = vision.to_batch([torch.from_numpy(p).unsqueeze(0) for p in images], image["mean"], image["std"])
    return inputs, torch.as_tensor(labels)


def photo_fidelity_set(image: dict, count: int = 64) -> torch.Tensor:
    """``count`` deterministic views of the two photographs: the full photos, then seeded crops,
    horizontal flips and rescales, each through the handler's resize/crop and normalization."""
    photos = [vision.decode(data, "rgb", 10**8) for data in sample_data.photo_bytes()]
    generator = torch.Generator().manual_seed(2)
    views = list(photos)
    while len(views) < count:
        photo = photos[len(views) % len(photos)]
        _, height, width = photo.shape
        scale = float(torch.empty(1).uniform_(0.35, 1.0, generator=generator))
        h, w = max(16, int(height * scale)), max(16, int(width * scale))
        top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
        view = photo[:, top:top + h, left:left + w]
        if len(views) % 3 == 0:
            view = view.flip(-1)
        if len(views) % 5 == 0:  # a rescale: down and back up loses detail as re-encoded photos do
            view = v2.functional.resize(v2.functional.resize(view, [max(8, h // 3)], antialias=True), [h], antialias=True)
        views.append(view)
    prepared = [vision.resize_and_crop(v, image["resize"], image["crop"]) for v in views[:count]]
    return vision.to_batch(prepared, image["mean"], image["std"])


def to_torchscript(model: torch.nn.Module, example: torch.Tensor, channels_last: bool) -> torch.jit.ScriptModule:
    """Trace and freeze (weights become constants, conv+BN folded). optimize_for_inference runs
    when the handler loads it: its prepacked oneDNN weights do not survive torch.jit.save."""
    model = copy.deepcopy(model).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(model, example))


def quantize_int8_x86(model: torch.nn.Module, calibration: Iterable[torch.Tensor],
                      example: torch.Tensor, float_modules: Sequence[str] = ()) -> torch.jit.ScriptModule:
    """Static post-training quantization for the x86 backend (FX graph mode: conv+BN+ReLU are
    fused before observers are inserted), calibrated on ``calibration``, then traced and frozen.
    ``float_modules`` (e.g. the first conv and the classifier) stay in float: the usual trade of
    a little speed for fidelity."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        mapping = get_default_qconfig_mapping("x86")
        for name in float_modules:
            mapping = mapping.set_module_name(name, None)
        prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, example_inputs=(example,))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        quantized = convert_fx(prepared)
        with torch.no_grad():
            return torch.jit.freeze(torch.jit.trace(quantized, example).eval())


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str, max_batch: int = 1024) -> None:
    """ONNX with a dynamic batch dimension (torch.export-based exporter)."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(copy.deepcopy(model).eval(), (example,), dynamo=True,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    program.save(path)
