"""Each handler stage on its own, on real images and real inputs."""
import base64
import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from handler_kit import batching, classification, runtime, vision, wire
from handler_kit.image_config import parse_image_classifier
from handler_kit.errors import BadInput, ConfigError, PayloadTooLarge, UnsupportedMediaType


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def china(samples):
    return samples.photo_bytes()[0]


# -- wire formats ---------------------------------------------------------------------------------
def test_raw_body_and_multipart_field_give_the_bytes(china):
    assert wire.binary_payload({"body": bytearray(china)}) == china
    assert wire.binary_payload({"file": china}) == china  # curl -F file=@photo.jpg


def test_base64_json_and_data_url(china):
    text = base64.b64encode(china).decode()
    assert wire.binary_payload({"body": {"data": text}}) == china
    assert wire.binary_payload({"body": {"image": "data:image/jpeg;base64," + text}}) == china


@pytest.mark.parametrize("request_, message", [
    ({"body": b""}, "empty"),
    ({"body": {"data": "not base64!!"}}, "not valid base64"),
    ({"body": {"data": 12}}, "must be a base64 string"),
    ({"body": {"pixels": "AAAA"}}, "needs one of the keys"),
    ({"body": [1, 2, 3]}, "not a list"),
    ({"body": b'{"data": "abc"'}, "not valid JSON"),
    ({"body": "hello"}, "is text"),
    ({}, "no body"),
    ({"a": b"x", "b": b"y"}, "several payload fields"),
])
def test_wire_errors_say_what_is_wrong(request_, message):
    with pytest.raises(BadInput, match=message):
        wire.binary_payload(request_)


# -- decoding -------------------------------------------------------------------------------------
def test_decode_real_photo(china):
    image = vision.decode(china, "rgb", 10**8)
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 427, 640)
    assert vision.decode(china, "grayscale", 10**8).shape == (1, 427, 640)


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                                       ("RGB", "WEBP"), ("RGB", "GIF"), ("I;16", "PNG")])
def test_decode_modes_and_formats_to_rgb(mode, fmt):
    image = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    decoded = vision.decode(encode(image, fmt), "rgb", 10**6)
    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == (3, 30, 40)


def test_exif_orientation_is_honoured():
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    decoded = vision.decode(encode(image, "JPEG", exif=exif.tobytes()), "rgb", 10**6)
    assert tuple(decoded.shape) == (3, 60, 20)


def large_photo_jpeg(samples, size=(2048, 1536), exif=None) -> bytes:
    photo = Image.open(io.BytesIO(samples.photo_bytes()[0])).convert("RGB").resize(size, Image.BICUBIC)
    return encode(photo, "JPEG", **({"exif": exif} if exif else {}))


def test_jpeg_scale_keeps_the_shorter_side_at_least_the_minimum():
    assert vision.jpeg_scale(4032, 3024, 512) == 4       # 756 >= 512; 1/8 would give 378
    assert vision.jpeg_scale(4032, 3024, 0) == 1         # switched off
    assert vision.jpeg_scale(1000, 1023, 512) == 1       # 511 < 512: full size
    assert vision.jpeg_scale(8000, 6000, 16) == 8        # never beyond libjpeg's 1/8


def test_large_jpeg_is_decoded_reduced_with_the_same_pixels(samples):
    data = large_photo_jpeg(samples)
    full = vision.decode(data, "rgb", 10**8)
    reduced = vision.decode(data, "rgb", 10**8, min_short_side=512)
    assert tuple(full.shape) == (3, 1536, 2048) and tuple(reduced.shape) == (3, 768, 1024)
    # DCT scaling is a proper low-pass: after the model's resize the two agree to a few levels
    a, b = (vision.resize_and_crop(x, 256, 224).float() for x in (full, reduced))
    assert (a - b).abs().mean().item() < 2.0
    gray = vision.decode(data, "grayscale", 10**8, min_short_side=512)
    assert tuple(gray.shape) == (1, 768, 1024)


def test_reduced_jpeg_keeps_exif_orientation_and_refuses_truncation(samples):
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = vision.decode(large_photo_jpeg(samples, exif=exif.tobytes()), "rgb", 10**8, min_short_side=256)
    assert tuple(rotated.shape) == (3, 512, 384)  # 1/4 of 2048x1536, turned upright
    truncated = large_photo_jpeg(samples)[:20000]
    with pytest.raises(BadInput, match="JPEG image could not be decoded"):
        vision.decode(truncated, "rgb", 10**8, min_short_side=256)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(PayloadTooLarge, match="30000x30000"):
        vision.decode(png_declaring(30000, 30000), "rgb", 50_000_000)


@pytest.mark.parametrize("data, error, message", [
    (b"", BadInput, "empty"),
    (bytes(range(256)) * 4, BadInput, "not a recognizable image"),
    (b"<html><body>not an image</body></html>", BadInput, "not a recognizable image"),
])
def test_undecodable_bodies(data, error, message):
    with pytest.raises(error, match=message):
        vision.decode(data, "rgb", 10**6)


def test_truncated_jpeg_is_a_bad_input(china):
    with pytest.raises(BadInput):
        vision.decode(china[: len(china) // 3], "rgb", 10**8)


def test_unsupported_format_is_415():
    with pytest.raises(UnsupportedMediaType, match="BMP"):
        vision.decode(encode(Image.new("RGB", (8, 8)), "BMP"), "rgb", 10**6)


# -- transforms and batching ----------------------------------------------------------------------
def test_resize_crop_and_batch(china):
    image = vision.resize_and_crop(vision.decode(china, "rgb", 10**8), 256, 224)
    assert tuple(image.shape) == (3, 224, 224)
    batch = vision.to_batch([image, image], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=True)
    assert tuple(batch.shape) == (2, 3, 224, 224)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    expected = (image[0, 0, 0].item() / 255 - 0.5) / 0.25
    assert batch[1, 0, 0, 0].item() == pytest.approx(expected, abs=1e-5)


class RecordingContext:
    """What TorchServe's Context receives from batching.merge, for a batch of ``size`` requests
    that came over HTTP (a url_path header) or gRPC (none)."""

    def __init__(self, size, url_path="/predictions/m", version="2.0"):
        self.request_ids = {i: f"req-{i}" for i in range(size)}
        self.url_path, self.statuses, self.headers, self.content_types = url_path, {}, {}, {}
        self.manifest = {"model": {"modelName": "m", "modelVersion": version}}

    def set_response_status(self, code, phrase, idx):
        self.statuses[idx] = (code, phrase)

    def get_request_header(self, idx, key):
        return self.url_path if key == "url_path" else None

    def set_response_header(self, idx, key, value):
        self.headers[(idx, key)] = value

    def set_response_content_type(self, idx, value):
        self.content_types[idx] = value


def _negative_is_bad(x):
    if x < 0:
        raise BadInput(f"negative: {x}")
    return x * 10


def test_bad_request_does_not_fail_the_batch():
    batch = batching.prepare([1, -2, 3], _negative_is_bad)
    context = RecordingContext(3)
    responses = batching.merge(batch, [r + 1 for r in batch.items], context)
    # every answer goes out as compact JSON text (TorchServe would indent it)
    assert responses == ["11", '{"code":400,"type":"bad_input","message":"negative: -2"}', "31"]
    assert context.content_types == {0: "application/json", 1: "application/json", 2: "application/json"}
    assert context.statuses == {1: (400, "negative: -2")}
    # HTTP answers are not marked as streams; each says which version answered, refused or not
    assert context.headers == {(i, "X-Model-Version"): "2.0" for i in range(3)}


def test_grpc_answers_are_marked_as_one_part_streams():
    batch = batching.prepare([1, 2], _negative_is_bad)
    context = RecordingContext(2, url_path=None)
    batching.merge(batch, batch.items, context)
    assert context.headers == {(0, "ts_stream_next"): "false", (1, "ts_stream_next"): "false"}


def test_instances_of_one_enveloped_request_are_answered_in_place(monkeypatch):
    """KServe's envelope turns one request's instances into the batch: a bad instance must not
    set a status for a request index that does not exist."""
    monkeypatch.setenv("TS_SERVICE_ENVELOPE", "kserve")
    batch = batching.prepare([1, -2, 3], _negative_is_bad)
    context = RecordingContext(1)
    responses = batching.merge(batch, batch.items, context)
    assert context.statuses == {} and responses[1]["message"] == "negative: -2"


def test_topk_predictions_are_sorted_probabilities():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    rows = classification.topk_predictions(logits, ["a", "b", "c"], 2)
    assert [p["label"] for p in rows[0]] == ["b", "c"]
    assert rows[1][0] == {"label": "a", "index": 0, "probability": pytest.approx(0.986, abs=1e-3)}
    assert rows[0][0]["probability"] >= rows[0][1]["probability"]


def test_stock_answer_shape_is_label_to_probability_best_first():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    labels = ["a", "crane", "c", "crane"]  # ImageNet names two classes "crane"
    (project,) = classification.format_topk(logits, labels, 3, "project")
    (stock,) = classification.format_topk(logits, labels, 3, "stock")
    assert [p["label"] for p in project] == ["crane", "crane", "c"]
    assert list(stock) == ["crane", "c"] and stock["crane"] == project[0]["probability"]
    assert stock["c"] == project[2]["probability"]


def test_labels_file_formats(tmp_path):
    (tmp_path / "list.json").write_text('["x", "y"]')
    (tmp_path / "dict.json").write_text('{"1": "y", "0": "x"}')
    assert classification.load_labels(str(tmp_path / "list.json")) == ["x", "y"]
    assert classification.load_labels(str(tmp_path / "dict.json"), 2) == ["x", "y"]
    with pytest.raises(ConfigError, match="has 2 labels but the model has 3"):
        classification.load_labels(str(tmp_path / "list.json"), 3)


# -- configuration and runtime --------------------------------------------------------------------
def handler_section(**changes):
    section = {"model": {"module": "torchvision.models", "factory": "resnet18", "weights": "w.pt"},
               "image": {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.2] * 3},
               "labels": "labels.json"}
    section.update(changes)
    return section


def test_config_defaults():
    cfg = parse_image_classifier(handler_section())
    assert cfg.topk == 5 and cfg.runtime.device == "auto" and cfg.runtime.dtype == "float32"
    assert cfg.image.color == "rgb" and cfg.runtime.threads is None and cfg.answer == "project"


@pytest.mark.parametrize("changes, message", [
    ({"runtime": {"dtype": "int4"}}, "'handler.runtime.dtype' is 'int4'; allowed values: float32, bfloat16, float16"),
    ({"runtime": {"device": "tpu"}}, "allowed values: auto, cpu, cuda"),
    ({"colour": "rgb"}, "unknown key 'handler.colour'; allowed keys: model, image"),
    ({"topk": 0}, "'handler.topk' must be a positive integer"),
    ({"answer": "torchserve"}, "'handler.answer' is 'torchserve'; allowed values: project, stock"),
    ({"image": {"resize": 8, "mean": [0.5] * 3, "std": [0.2] * 3, "jpeg_dct_scaling": "yes"}},
     "'handler.image.jpeg_dct_scaling' must be true or false"),
    ({"image": {"resize": 8, "crop": 16, "mean": [0.5] * 3, "std": [0.2] * 3}}, "must not exceed"),
    ({"image": {"resize": 8, "mean": [0.5], "std": [0.2] * 3}}, "'handler.image.mean' must be a list of 3"),
])
def test_config_errors_name_the_key_and_allowed_values(changes, message):
    with pytest.raises(ConfigError) as err:
        parse_image_classifier(handler_section(**changes))
    assert message in str(err.value)


def test_thread_budget_keeps_workers_times_threads_within_cores():
    assert runtime.thread_budget(None, workers=2, cores=2) == 1
    assert runtime.thread_budget(None, workers=1, cores=8) == 8
    assert runtime.thread_budget(None, workers=4, cores=2) == 1
    assert runtime.thread_budget(3, workers=4, cores=2) == 3


def test_cpu_device_without_gpu():
    assert runtime.select_device("cpu", 0) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert runtime.select_device("auto", 0) == torch.device("cpu")
        with pytest.raises(ConfigError, match="no GPU"):
            runtime.select_device("cuda", 0)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_with_pickled_code_are_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2), "evil": Payload()}, path)
    with pytest.raises(ConfigError, match="refusing to load weights.pt"):
        runtime.load_state_dict(str(path), torch.device("cpu"))


def test_cgroup_cpu_quota_limits_the_thread_budget(tmp_path):
    from handler_kit.runtime import cgroup_cpu_quota
    assert cgroup_cpu_quota(str(tmp_path)) is None  # no cgroup files: unlimited
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(str(tmp_path)) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # Kubernetes limits: cpu: 1500m
    assert cgroup_cpu_quota(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(str(tmp_path)) == 2.0


def test_extreme_aspect_ratio_is_cropped_before_resizing():
    """A 1x50000 image must not be resized whole (gigabytes at 256 px high); the centre that
    survives the crop is the same as for the uncut image."""
    strip = torch.arange(3 * 4 * 400, dtype=torch.float32).reshape(3, 4, 400).remainder(251).to(torch.uint8)
    out = vision.resize_and_crop(strip, 16, 8)
    assert out.shape == (3, 8, 8)
    wide = torch.zeros(3, 1, 50000, dtype=torch.uint8)
    assert vision.resize_and_crop(wide, 256, 224).shape == (3, 224, 224)
