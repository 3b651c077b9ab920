"""Hostile and broken inputs for every served model, as data: each case is one request (body and
content type; multipart bodies are encoded here) with what the server must answer: a 4xx whose
message names the problem, or a 200 whose answer is checked (the same answer as an equivalent
upright/RGB/8-bit reference image, a known digit, a number of vectors...).

Everything is generated from the project's own sample data (nothing large is committed):

    python -m scripts.bad_inputs --list              # the cases, one line each
    python -m scripts.bad_inputs --write DIR         # DIR/<model>/<case>.<ext>, index.json, replay.sh (curl)
    python -m scripts.bad_inputs --send [--models efficientnet_lite0,digits]
                                                     # replay against the running server (make serve)

Cases are keyed by model name (CASE_BUILDERS). Which models are exercised comes from the catalog
(its loaded_at_start names); cases for a model listed in PENDING_MODELS that the catalog does not
declare yet are reported as pending. The tests (tests/test_bad_inputs.py) and the soak
(scripts/soak.py) use the functions below.
"""
import argparse
import base64
import io
import json
import math
import os
import random
import shlex
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import requests
import urllib3
from PIL import Image

from scripts.catalog import CONFIG_PROPERTIES_PATH, ROOT, Catalog, load_catalog, parse_config_properties
from scripts.ts_client import TorchServeClient

JPEG, PNG, GIF, WEBP = "image/jpeg", "image/png", "image/gif", "image/webp"
JSON, TEXT, OCTETS = "application/json", "text/plain; charset=utf-8", "application/octet-stream"
# Models whose cases are written but which the catalog does not serve yet: their cases are
# reported as pending. Cases of any other model the catalog does not serve fail the tests (a
# model that was served must not silently stop being tested): add a model here only until its
# catalog entry lands.
PENDING_MODELS: Tuple[str, ...] = ()
MULTIPART_BOUNDARY = "bad-inputs-boundary-7f3a"  # fixed, so that --write is reproducible
TORCHSERVE_MAX_REQUEST_SIZE = 6553500  # TorchServe's default when the catalog sets none
DEFAULT_MAX_PIXELS = 50_000_000
TEXT_DEFAULT_LIMITS = {"max_chars": 10_000, "max_texts": 64}  # handler_kit.text_config defaults


# ---------------------------------------------------------------------------------------------
# what a case is, and how its answer is checked


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    body: bytes
    content_type: str
    status: int                     # the status the server must answer with
    message: str = ""               # for a 4xx: fragment its JSON "message" must contain (any case)
    what: str = ""                  # for people: what the input is
    # For a 200: checks of the answer on its own, and against the answer to ``reference`` (an
    # equivalent request: the upright image for an EXIF-rotated one, the RGB original...).
    checks: Tuple["AnswerCheck", ...] = ()
    reference: Optional[bytes] = None
    reference_content_type: str = OCTETS
    # How far the answer may be from the reference's: probabilities (absolute; answers carry 6
    # decimals), embeddings (1 - cosine), predictions (relative).
    tolerance: float = 2e-6
    soak: bool = True               # part of the soak's mix (False: too big or too slow to repeat)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.name}"


@dataclass(frozen=True)
class AnswerCheck:
    """One property of a 200 answer: ``kind`` names the rule, ``value`` its parameter."""
    kind: str
    value: object = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value}"

    def problem(self, answer) -> Optional[str]:
        return ANSWER_RULES[self.kind](answer, self.value)


def _topk_problem(answer, k) -> Optional[str]:
    if not isinstance(answer, list) or not answer:
        return f"expected a top-k list, got {_short(answer)}"
    if not all(isinstance(p, dict) and {"label", "index", "probability"} <= set(p) for p in answer):
        return f"top-k entries need label, index and probability: {_short(answer)}"
    probabilities = [p["probability"] for p in answer]
    if probabilities != sorted(probabilities, reverse=True) or not all(0 <= p <= 1 for p in probabilities):
        return f"probabilities must be in [0, 1], most probable first: {probabilities}"
    if k is not None and len(answer) != k:
        return f"expected {k} classes, got {len(answer)}"
    return None


def _label_problem(answer, label) -> Optional[str]:
    problem = _topk_problem(answer, None)
    if problem:
        return problem
    return None if answer[0]["label"] == label else f"top-1 is {answer[0]['label']!r}, expected {label!r}"


def _embeddings_problem(answer, count) -> Optional[str]:
    if not isinstance(answer, dict) or not isinstance(answer.get("embeddings"), list):
        return f"expected {{\"embeddings\": [...]}}, got {_short(answer)}"
    vectors = np.asarray(answer["embeddings"], dtype=np.float64)
    if vectors.ndim != 2 or (count is not None and vectors.shape[0] != count):
        return f"expected {count} vectors, got an array of shape {vectors.shape}"
    if not np.isfinite(vectors).all() or not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3):
        return "vectors must be finite and of unit length"
    return None


def _predictions_problem(answer, count) -> Optional[str]:
    if not isinstance(answer, dict) or not isinstance(answer.get("predictions"), list):
        return f"expected {{\"predictions\": [...]}}, got {_short(answer)}"
    values = answer["predictions"]
    if count is not None and len(values) != count:
        return f"expected {count} predictions, got {len(values)}"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return f"predictions must be finite numbers: {values}"
    return None


ANSWER_RULES: Dict[str, Callable] = {"topk": _topk_problem, "label": _label_problem,
                                     "embeddings": _embeddings_problem,
                                     "predictions": _predictions_problem}


def compare_answers(answer, reference, tolerance: float) -> Optional[str]:
    """Why ``answer`` is not the same answer as ``reference`` (None when it is), whatever the
    family: top-k classes (top-1 and probabilities), embeddings (cosine), predictions. Fields
    that name the model or version are not compared (a copy registered under another name
    answers with its own name)."""
    if isinstance(reference, list) and isinstance(answer, list):
        if _topk_problem(answer, None) or _topk_problem(reference, None):
            return f"not comparable top-k lists: {_short(answer)} vs {_short(reference)}"
        expected = {p["label"]: p["probability"] for p in reference}
        top, best = answer[0], reference[0]
        # Another top-1 is only acceptable where the reference itself has a tie within tolerance.
        if top["label"] != best["label"] and abs(expected.get(top["label"], -1.0) - best["probability"]) > tolerance:
            return f"top-1 is {top['label']!r} ({top['probability']:.4f}), expected {best['label']!r} " \
                   f"({best['probability']:.4f})"
        for p in answer:
            if p["label"] in expected and abs(p["probability"] - expected[p["label"]]) > tolerance:
                return f"probability of {p['label']!r} is {p['probability']:.6f}, expected " \
                       f"{expected[p['label']]:.6f} (tolerance {tolerance})"
        return None
    if isinstance(reference, dict) and "embeddings" in reference:
        if not isinstance(answer, dict) or "embeddings" not in answer:
            return f"expected embeddings, got {_short(answer)}"
        a, b = np.asarray(answer["embeddings"], np.float64), np.asarray(reference["embeddings"], np.float64)
        if a.shape != b.shape:
            return f"embeddings of shape {a.shape}, expected {b.shape}"
        cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return None if cosine.min() >= 1 - tolerance else f"embedding cosine {cosine.min():.6f} to the reference"
    if isinstance(reference, dict) and "predictions" in reference:
        if not isinstance(answer, dict) or "predictions" not in answer:
            return f"expected predictions, got {_short(answer)}"
        a, b = answer["predictions"], reference["predictions"]
        if len(a) != len(b) or any(abs(x - y) > tolerance * max(1.0, abs(y)) for x, y in zip(a, b)):
            return f"predictions {a}, expected {b}"
        return None
    return None if answer == reference else f"answer {_short(answer)}, expected {_short(reference)}"


def _short(value, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# encoders for the inputs


def encode_image(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, rows: int = 16) -> bytes:
    """A small, well-formed-looking 8-bit grayscale PNG whose header declares width x height
    pixels; only its first ``rows`` rows of pixel data are present (a decompression bomb needs
    nothing more to be refused from its header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (rows * (width + 1)), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL writes 16-bit grayscale only)."""
    height, width, _ = pixels.shape
    rows = pixels.astype(">u2").reshape(height, width * 6 // 2).view(np.uint8).reshape(height, width * 6)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw, 6))
            + png_chunk(b"IEND", b""))


def corrupt_png_crc(png: bytes) -> bytes:
    """The PNG with one bit flipped in its first IDAT chunk's CRC: the pixels are intact, the
    checksum does not match them."""
    start = png.index(b"IDAT")
    length = struct.unpack(">I", png[start - 4:start])[0]
    data = bytearray(png)
    data[start + 4 + length] ^= 0x01
    return bytes(data)


def corrupt_png_pixels(png: bytes) -> bytes:
    """The PNG with a compressed-data byte of its first IDAT chunk changed and the chunk's CRC
    recomputed: the file is consistent, its deflate stream is not."""
    start = png.index(b"IDAT")
    length = struct.unpack(">I", png[start - 4:start])[0]
    data = bytearray(png)
    data[start + 4 + 2] ^= 0xFF  # the first byte after the zlib header
    chunk = bytes(data[start:start + 4 + length])
    data[start + 4 + length:start + 8 + length] = struct.pack(">I", zlib.crc32(chunk))
    return bytes(data)


def with_exif_orientation(upright: Image.Image, orientation: int, fmt: str = "JPEG", **options) -> bytes:
    """The image stored turned, with the EXIF orientation tag that tells a viewer how to turn it
    back upright (orientation 3: 180 degrees, 6: 90 clockwise, 8: 90 counter-clockwise)."""
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode_image(stored, fmt, exif=exif.tobytes(), **options)


def animated_gif(frames: Sequence[Image.Image]) -> bytes:
    return encode_image(frames[0], "GIF", save_all=True, append_images=list(frames[1:]), duration=100, loop=0)


def multipart(fields: Sequence[Tuple[str, str, bytes, str]]) -> Tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request: fields (name, filename, data, type)."""
    return urllib3.encode_multipart_formdata([(n, (f, d, t)) for n, f, d, t in fields],
                                             boundary=MULTIPART_BOUNDARY)


def b64_json(data: bytes, key: str = "data", prefix: str = "") -> bytes:
    return json.dumps({key: prefix + base64.b64encode(data).decode()}).encode()


def truncated_in_scan(jpeg: bytes) -> bytes:
    """The JPEG cut halfway through its entropy-coded data (after its start-of-scan header), so
    that its headers are whole and its pixels are not."""
    scan = jpeg.index(b"\xff\xda")
    return jpeg[:scan + (len(jpeg) - scan) // 2]


def oversized_body(max_request_size: int, start: bytes = b"\xff\xd8\xff\xe0") -> bytes:
    """One byte over the server's max_request_size (TorchServe refuses it before any worker)."""
    return start + b"\x00" * (max_request_size + 1 - len(start))


# ---------------------------------------------------------------------------------------------
# the corpus


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# Nesting deeper than Python's JSON reader can recurse: json.loads raises RecursionError, not a
# JSONDecodeError.
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
DEEP_JSON_WHAT = "JSON lists nested 100000 deep (200 KB)"
HTML = b"<!DOCTYPE html>\n<html><head><title>not an image</title></head><body><img src=x></body></html>\n"


def shared_image_cases(model: str, sample: bytes, sample_type: str, max_request_size: Optional[int],
                       max_pixels: int, jpeg: Optional[bytes] = None) -> List[Case]:
    """Inputs every image classifier must refuse (or, for other wire formats of a valid image,
    answer as the raw image): the sample is a valid image of the model's kind; broken forms of it
    (and of ``jpeg``, when given) are made here."""
    png = sample if sample_type == PNG else None
    jpeg = sample if sample_type == JPEG else jpeg
    same = dict(status=200, checks=(AnswerCheck("topk"),), reference=sample, reference_content_type=sample_type)
    cases = [
        Case("zero_bytes", model, b"", JPEG, 400, "empty", "an empty body declared as a JPEG"),
        Case("random_bytes", model, _random_bytes(4096), OCTETS, 400, "not a recognizable image",
             "4 KiB of random bytes"),
        Case("html_as_jpeg", model, HTML, JPEG, 400, "not a recognizable image",
             "an HTML page sent with Content-Type image/jpeg"),
        Case("text_as_image", model, b"this is not an image", TEXT, 400, "is text",
             "plain text (text/plain): TorchServe hands the handler a str"),
        Case("bmp_unsupported", model, encode_image(Image.new("RGB", (16, 16), (10, 200, 30)), "BMP"),
             "image/bmp", 415, "BMP is not supported", "a BMP image (a format the handler does not decode)"),
        Case("tiff_unsupported", model, encode_image(Image.new("RGB", (16, 16), (10, 200, 30)), "TIFF"),
             "image/tiff", 415, "TIFF is not supported", "a TIFF image"),
        Case("decompression_bomb_png", model, png_declaring(30000, 30000), PNG, 413, "30000x30000",
             f"a {len(png_declaring(30000, 30000))}-byte PNG declaring 30000x30000 pixels "
             f"(limit {max_pixels})"),
        Case("png_header_only", model, png_declaring(64, 64)[:33], PNG, 400, "not a recognizable image",
             "the PNG signature and IHDR chunk, nothing else"),
        Case("invalid_base64", model, b'{"data": "%%% not base64 %%%"}', JSON, 400, "not valid base64",
             "JSON {\"data\": ...} whose value is not base64"),
        Case("base64_of_text", model, b64_json(b"hello, world"), JSON, 400, "not a recognizable image",
             "valid base64 of bytes that are not an image"),
        Case("base64_empty", model, b'{"data": ""}', JSON, 400, "zero bytes", "JSON {\"data\": \"\"}"),
        Case("json_broken", model, b'{"data": "abc', JSON, 400, "not valid JSON", "JSON cut short"),
        Case("json_list", model, b"[1, 2, 3]", JSON, 400, "not a list", "a JSON list instead of an object"),
        Case("json_deeply_nested", model, DEEP_JSON, JSON, 400, "JSON", DEEP_JSON_WHAT),
        Case("json_number_for_data", model, b'{"data": 12345}', JSON, 400, "must be a base64 string",
             "JSON {\"data\": 12345}"),
        Case("json_nan_for_data", model, b'{"data": NaN}', JSON, 400, "must be a base64 string",
             "JSON {\"data\": NaN} (Python's JSON reader accepts NaN)"),
        Case("json_wrong_keys", model, b'{"picture": "aGVsbG8="}', JSON, 400, "needs one of the keys",
             "a JSON object without any of the keys data/image/b64/bytes"),
        Case("json_nested", model, b'{"data": {"data": "aGVsbG8="}}', JSON, 400, "must be a base64 string",
             "the base64 nested one object too deep"),
        Case("multipart_two_files", model, *multipart([("a", "a.png", sample, sample_type),
                                                      ("b", "b.png", sample, sample_type)]),
             400, "several payload fields", "a multipart form with two files"),
        Case("multipart_empty_file", model, *multipart([("data", "empty.jpg", b"", JPEG)]), 400, "empty",
             "a multipart form whose file is empty"),
        Case("multipart_valid", model, *multipart([("data", "image", sample, sample_type)]),
             what="the valid sample as a multipart upload: same answer as raw", **same),
        Case("base64_valid", model, b64_json(sample), JSON, what="the valid sample as base64 JSON: same answer",
             **same),
        Case("data_url_valid", model, b64_json(sample, "image", f"data:{sample_type};base64,"), JSON,
             what="the valid sample as a data: URL under \"image\": same answer", **same),
        Case("image_as_json_content_type", model, sample, JSON,
             what="the valid image sent with Content-Type application/json: answered as the image", **same),
        Case("image_as_text_content_type", model, sample, "text/plain",
             what="the valid image sent with Content-Type text/plain (not UTF-8, so bytes reach the "
                  "handler): answered as the image", **same),
    ]
    if png is not None:
        cases += [
            Case("png_corrupt_crc", model, corrupt_png_crc(png), PNG, 400, "PNG",
                 "the sample PNG with one bit of its IDAT chunk's CRC flipped"),
            Case("png_corrupt_deflate", model, corrupt_png_pixels(png), PNG, 400, "PNG",
                 "the sample PNG with a byte of its compressed pixels changed (CRC recomputed)"),
            Case("png_truncated", model, png[:len(png) * 2 // 3], PNG, 400, "PNG image could not be decoded",
                 "the sample PNG cut at two thirds"),
        ]
    if jpeg is not None:
        cases += [
            Case("jpeg_truncated", model, truncated_in_scan(jpeg), JPEG, 400, "JPEG image could not be decoded",
                 "a JPEG cut halfway through its compressed pixels"),
            Case("jpeg_header_only", model, jpeg[:200], JPEG, 400, "corrupt", "the first 200 bytes of a JPEG"),
        ]
    if max_request_size:
        cases.append(Case("over_max_request_size", model, oversized_body(max_request_size), JPEG, 413, "",
                          f"a body of max_request_size + 1 = {max_request_size + 1} bytes", soak=False))
    return cases


def rgb_classifier_cases(model: str, photo: bytes, max_request_size: Optional[int], max_pixels: int,
                         topk: int) -> List[Case]:
    """efficientnet_lite0-style RGB classifiers: the photograph in every valid form must be answered as the
    photograph (or its exact RGB equivalent) is; broken forms of it get a 4xx."""
    upright = Image.open(io.BytesIO(photo)).convert("RGB")
    small = upright.resize((320, 214), Image.BILINEAR)
    small_png = encode_image(small, "PNG")
    gray = small.convert("L")
    rgba = np.dstack([np.asarray(small), np.full(small.size[::-1], 255, np.uint8)])
    rgba_half = np.dstack([np.asarray(small), np.full(small.size[::-1], 128, np.uint8)])
    cmyk_jpeg = encode_image(small.convert("CMYK"), "JPEG", quality=95)
    exif_jpeg = with_exif_orientation(small, 6, quality=95)
    gif = animated_gif([small.quantize(64), Image.new("RGB", small.size, (255, 0, 0)).quantize(64)])
    palette_png = encode_image(small.quantize(64), "PNG", transparency=0)
    topk_check = (AnswerCheck("topk", topk),)
    valid = dict(status=200, checks=topk_check)

    cases = shared_image_cases(model, small_png, PNG, max_request_size, max_pixels, jpeg=photo)
    cases += [
        Case("one_pixel", model, encode_image(Image.new("RGB", (1, 1), (200, 120, 40)), "PNG"), PNG,
             reference=encode_image(Image.new("RGB", (256, 256), (200, 120, 40)), "PNG"),
             reference_content_type=PNG, what="a 1x1 image: answered as the same colour at 256x256", **valid),
        Case("wide_4000x1", model, encode_image(Image.new("RGB", (4000, 1), (30, 160, 90)), "PNG"), PNG,
             reference=encode_image(Image.new("RGB", (256, 256), (30, 160, 90)), "PNG"),
             reference_content_type=PNG, soak=False,
             what="a 4000x1 image (aspect 4000:1): answered as the same colour at 256x256", **valid),
        Case("tall_1x4000", model, encode_image(Image.new("RGB", (1, 4000), (30, 160, 90)), "PNG"), PNG,
             reference=encode_image(Image.new("RGB", (256, 256), (30, 160, 90)), "PNG"),
             reference_content_type=PNG, soak=False,
             what="a 1x4000 image: answered as the same colour at 256x256", **valid),
        Case("grayscale_png", model, encode_image(gray, "PNG"), PNG,
             reference=encode_image(gray.convert("RGB"), "PNG"), reference_content_type=PNG,
             what="an 8-bit grayscale PNG: answered as its RGB equivalent (gray in 3 channels)", **valid),
        Case("grayscale_jpeg", model, encode_image(gray, "JPEG", quality=95), JPEG,
             reference=decoded_png(encode_image(gray, "JPEG", quality=95)), reference_content_type=PNG,
             what="a grayscale JPEG: answered as its decoded pixels in RGB", **valid),
        Case("cmyk_jpeg", model, cmyk_jpeg, JPEG, reference=decoded_png(cmyk_jpeg), reference_content_type=PNG,
             what="a CMYK JPEG: answered as its pixels converted to RGB (as PIL converts them)",
             **valid),
        Case("rgba_opaque_png", model, encode_image(Image.fromarray(rgba, "RGBA"), "PNG"), PNG,
             reference=small_png, reference_content_type=PNG,
             what="an RGBA PNG with an opaque alpha channel: answered as the RGB original", **valid),
        Case("rgba_half_transparent_png", model, encode_image(Image.fromarray(rgba_half, "RGBA"), "PNG"), PNG,
             reference=small_png, reference_content_type=PNG,
             what="an RGBA PNG, alpha 128 everywhere: answered as its RGB channels (alpha dropped)", **valid),
        Case("palette_png_with_transparency", model, palette_png, PNG, reference=decoded_png(palette_png),
             reference_content_type=PNG,
             what="a 64-colour palette PNG with a tRNS transparent colour: answered as its RGB colours",
             **valid),
        Case("png_16bit_rgb", model, png_rgb16(np.asarray(small).astype(np.uint16) * 257), PNG,
             reference=small_png, reference_content_type=PNG,
             what="a 16-bit-per-channel RGB PNG of the same pixels: answered as the 8-bit original", **valid),
        Case("exif_rotated_jpeg", model, exif_jpeg, JPEG, reference=decoded_png(exif_jpeg),
             reference_content_type=PNG,
             what="a JPEG stored turned 90 degrees with EXIF orientation 6: answered as the upright image",
             **valid),
        Case("animated_gif", model, gif, GIF, reference=decoded_png(gif), reference_content_type=PNG,
             what="an animated GIF (photo, then a red frame): answered as its first frame", **valid),
        Case("webp", model, encode_image(small, "WEBP", lossless=True), WEBP, reference=small_png,
             reference_content_type=PNG, what="a lossless WebP of the sample: same answer as the PNG", **valid),
    ]
    return cases


def decoded_png(data: bytes, mode: str = "RGB") -> bytes:
    """What a correct decoder sees in an image (EXIF orientation applied, converted to ``mode``),
    as PIL decodes it, re-encoded losslessly: the reference for lossy or exotic encodings."""
    from PIL import ImageOps
    return encode_image(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert(mode), "PNG")


def digits_cases(model: str, digits: Sequence[Tuple[np.ndarray, str]], max_request_size: Optional[int],
                 max_pixels: int) -> List[Case]:
    """The 8x8 grayscale digits classifier: each valid form of a held-out digit must be answered
    with that digit (``digits``: (8x8 uint8 pixels, label) pairs the model gets right), and with
    the answer its exact (or decoded) pixels get."""
    (pixels, label), (other, other_label) = digits[0], digits[1]
    sample = Image.fromarray(pixels, "L")
    big = sample.resize((64, 64), Image.NEAREST)  # 8x8 blocks, as a phone photo of a digit is bigger
    png, big_png = encode_image(sample, "PNG"), encode_image(big, "PNG")
    is_label = (AnswerCheck("label", label),)
    as_png = dict(status=200, checks=is_label, reference=png, reference_content_type=PNG)
    as_big_png = dict(status=200, checks=is_label, reference=big_png, reference_content_type=PNG)

    def as_decoded(data: bytes) -> dict:  # lossy encodings: the pixels PIL decodes from them
        return dict(status=200, checks=is_label, reference=decoded_png(data, "L"), reference_content_type=PNG,
                    )

    rgba = np.dstack([np.asarray(big)] * 3 + [np.full((64, 64), 255, np.uint8)])
    rgb_jpeg = encode_image(big.convert("RGB"), "JPEG", quality=95)
    cmyk_jpeg = encode_image(big.convert("CMYK"), "JPEG", quality=95)
    cases = shared_image_cases(model, png, PNG, max_request_size, max_pixels,
                               jpeg=encode_image(big, "JPEG", quality=95))
    cases += [
        Case("one_pixel", model, encode_image(Image.new("L", (1, 1), 200), "PNG"), PNG, 200,
             checks=(AnswerCheck("topk"),), reference=encode_image(Image.new("L", (8, 8), 200), "PNG"),
             reference_content_type=PNG, what="a 1x1 image: answered as the same gray at 8x8"),
        Case("tall_1x100000", model, encode_image(Image.new("L", (1, 100000), 0), "PNG"), PNG, 200,
             checks=(AnswerCheck("topk"),), reference=encode_image(Image.new("L", (8, 8), 0), "PNG"),
             reference_content_type=PNG, soak=False,
             what="a black 1x100000 image (aspect 1:100000): answered as black at 8x8"),
        Case("rgb_png", model, encode_image(sample.convert("RGB"), "PNG"), PNG,
             what="the digit as an RGB PNG (gray in 3 channels): the same answer", **as_png),
        Case("png_16bit_gray", model, encode_image(Image.fromarray(pixels.astype(np.uint16) * 257), "PNG"), PNG,
             what="the digit as a 16-bit grayscale PNG: the same answer", **as_png),
        Case("rgba_opaque_png", model, encode_image(Image.fromarray(rgba, "RGBA"), "PNG"), PNG,
             what="the 64x64 digit as an RGBA PNG, opaque alpha: the same answer as its gray PNG", **as_big_png),
        Case("gray_alpha_png", model, encode_image(big.convert("LA"), "PNG"), PNG,
             what="the 64x64 digit as a gray+alpha PNG: the same answer", **as_big_png),
        Case("webp", model, encode_image(big, "WEBP", lossless=True), WEBP,
             what="the 64x64 digit as a lossless WebP: the same answer", **as_big_png),
        Case("animated_gif", model, animated_gif([big.convert("P"), Image.fromarray(other, "L").resize(
            (64, 64), Image.NEAREST).convert("P")]), GIF,
             what=f"an animated GIF ({label}, then {other_label}): answered as its first frame", **as_big_png),
        Case("rgb_jpeg", model, rgb_jpeg, JPEG,
             what="the 64x64 digit as an RGB JPEG: the same digit, as its decoded pixels", **as_decoded(rgb_jpeg)),
        Case("cmyk_jpeg", model, cmyk_jpeg, JPEG,
             what="the 64x64 digit as a CMYK JPEG: the same digit, as its decoded pixels", **as_decoded(cmyk_jpeg)),
    ]
    for orientation in (3, 6, 8):
        turned = with_exif_orientation(big, orientation, quality=95)
        cases.append(Case(f"exif_orientation_{orientation}", model, turned, JPEG,
                          what=f"the 64x64 digit stored turned, EXIF orientation {orientation}: the same "
                               "answer as its pixels turned upright", **as_decoded(turned)))
    return cases


def text_cases(model: str, max_chars: int, max_texts: int, max_request_size: Optional[int]) -> List[Case]:
    """Sentence-embedding models: UTF-8 text, a JSON list of texts or {"inputs": [...]}."""
    sentence = "A man is playing a guitar."
    one = (AnswerCheck("embeddings", 1),)
    same_as_sentence = dict(status=200, checks=one, reference=sentence.encode(), reference_content_type=TEXT,
                            tolerance=1e-4)
    cases = [
        Case("zero_bytes", model, b"", TEXT, 400, "empty", "an empty text/plain body"),
        Case("zero_bytes_octets", model, b"", OCTETS, 400, "empty", "an empty body with no text content type"),
        Case("whitespace_only", model, b"  \n\t  ", TEXT, 400, "empty", "only whitespace"),
        Case("non_utf8", model, b"caf\xe9 cr\xe8me", TEXT, 400, "not UTF-8",
             "Latin-1 text sent as text/plain (TorchServe forwards the undecodable bytes)"),
        Case("random_bytes", model, _random_bytes(2048, seed=1), OCTETS, 400, "not UTF-8", "2 KiB of random bytes"),
        Case("over_max_chars", model, ("word " * (max_chars // 5 + 1)).encode()[:max_chars + 1], TEXT, 413,
             "above the limit", f"{max_chars + 1} characters, one above max_chars"),
        Case("over_max_chars_in_list", model, json.dumps(["short", "x" * (max_chars + 1)]).encode(), JSON,
             413, "text 1", "the second text of a list one character too long"),
        Case("too_many_texts", model, json.dumps(["t"] * (max_texts + 1)).encode(), JSON, 400,
             "above the limit", f"{max_texts + 1} texts in one request"),
        Case("json_empty_list", model, b"[]", JSON, 400, "empty", "an empty JSON list"),
        Case("json_wrong_key", model, b'{"text": "hello"}', JSON, 400, "found keys: text",
             "JSON {\"text\": ...} instead of {\"inputs\": ...}"),
        Case("json_inputs_number", model, b'{"inputs": 5}', JSON, 400, "must be a string or a list",
             "JSON {\"inputs\": 5}"),
        Case("json_list_with_number", model, b'["fine", 5]', JSON, 400, "text 1 must be a string",
             "a list holding a number"),
        Case("json_list_with_null", model, b'["fine", null]', JSON, 400, "text 1 must be a string",
             "a list holding null"),
        Case("json_nan", model, b"[NaN]", JSON, 400, "text 0 must be a string", "[NaN]"),
        Case("json_list_with_empty_text", model, b'["fine", ""]', JSON, 400, "text 1 is empty",
             "a list holding an empty text"),
        Case("json_nested_lists", model, b'[["a", "b"]]', JSON, 400, "text 0 must be a string",
             "a list of lists"),
        Case("json_number", model, b"42", JSON, 400, "int", "a bare JSON number"),
        Case("json_broken", model, b'{"inputs": ["abc"', JSON, 400, "not valid JSON", "JSON cut short"),
        Case("json_deeply_nested", model, DEEP_JSON, JSON, 400, "JSON", DEEP_JSON_WHAT),
        Case("multipart_two_fields", model, *multipart([("a", "a.txt", b"one", "text/plain"),
                                                        ("b", "b.txt", b"two", "text/plain")]),
             400, "several payload fields", "a multipart form with two text fields"),
        Case("valid_inputs_list", model, json.dumps({"inputs": [sentence, "Kids play soccer."]}).encode(), JSON,
             200, checks=(AnswerCheck("embeddings", 2),), what="{\"inputs\": [two texts]}: two vectors"),
        Case("valid_unicode", model, "Ünïcödé ✓ 日本語のテキスト 🎸".encode(), TEXT, 200, checks=one,
             what="non-ASCII UTF-8 text: one vector"),
        Case("valid_control_characters", model, b"tab\there\x00nul\x07bell", TEXT, 200, checks=one,
             what="UTF-8 text with NUL and control characters: one vector"),
        Case("valid_at_max_chars", model, ("word " * (max_chars // 5 + 1)).encode()[:max_chars], TEXT, 200,
             checks=one, soak=False, what=f"exactly max_chars = {max_chars} characters: answered (truncated)"),
        Case("text_as_octets", model, sentence.encode(), OCTETS,
             what="the sentence with Content-Type application/octet-stream: the same vector", **same_as_sentence),
        Case("text_as_image_content_type", model, sentence.encode(), PNG,
             what="the sentence with Content-Type image/png: the same vector", **same_as_sentence),
        Case("json_string", model, json.dumps(sentence).encode(), JSON,
             what="the sentence as a JSON string: the same vector", **same_as_sentence),
        Case("multipart_text", model, *multipart([("data", "s.txt", sentence.encode(), "text/plain")]),
             what="the sentence as a multipart upload: the same vector", **same_as_sentence),
    ]
    if max_request_size:
        cases.append(Case("over_max_request_size", model, oversized_body(max_request_size, b"word "), TEXT, 413,
                          "", f"a body of max_request_size + 1 = {max_request_size + 1} bytes", soak=False))
    return cases


def tabular_cases(model: str, rows: np.ndarray, feature_names: Sequence[str], max_rows: int,
                  max_request_size: Optional[int]) -> List[Case]:
    """Tabular regressors: a row of numbers, {name: number}, a list of rows or {"inputs": rows}."""
    row = [float(v) for v in rows[0]]
    named = dict(zip(feature_names, row))
    count = len(feature_names)
    one = (AnswerCheck("predictions", 1),)
    as_row = dict(status=200, checks=one, reference=json.dumps([row]).encode(), reference_content_type=JSON,
                  tolerance=1e-4)

    def named_with(**changes) -> bytes:  # NaN/Infinity written as JSON's non-standard literals
        return json.dumps({**named, **changes}).encode()

    def without(name: str) -> bytes:
        return json.dumps({k: v for k, v in named.items() if k != name}).encode()

    cases = [
        Case("zero_bytes", model, b"", JSON, 400, "empty", "an empty body"),
        Case("random_bytes", model, _random_bytes(1024, seed=2), OCTETS, 400, "not UTF-8", "1 KiB of random bytes"),
        Case("not_json", model, b"age=59&sex=2", TEXT, 400, "not valid JSON", "a form-encoded string"),
        Case("json_broken", model, b"[59, 2, 32.1", JSON, 400, "not valid JSON", "JSON cut short"),
        Case("too_few_values", model, json.dumps(row[:-1]).encode(), JSON, 400, f"expected {count}",
             f"a row of {count - 1} numbers"),
        Case("too_many_values", model, json.dumps(row + [1.0]).encode(), JSON, 400, f"expected {count}",
             f"a row of {count + 1} numbers"),
        Case("nan_value", model, named_with(bmi=float("nan")), JSON, 400, "bmi", "bmi: NaN"),
        Case("infinite_value", model, named_with(s5=float("inf")), JSON, 400, "s5", "s5: Infinity"),
        Case("overflowing_value", model, named_with(bp=1e39), JSON, 400, "bp", "bp: 1e39 (beyond float32)"),
        Case("nan_in_list_row", model, json.dumps(row[:2] + [float("nan")] + row[3:]).encode(), JSON, 400,
             feature_names[2], "a list row with NaN as its third value"),
        Case("string_value", model, named_with(bp="high"), JSON, 400, "bp", "bp: \"high\""),
        Case("numeric_string_value", model, named_with(age="59"), JSON, 400, "age", "age: \"59\" (a string)"),
        Case("null_value", model, named_with(s1=None), JSON, 400, "s1", "s1: null"),
        Case("boolean_value", model, named_with(sex=True), JSON, 400, "sex",
             "sex: true (JSON true is not a measurement)"),
        Case("missing_feature", model, without("s6"), JSON, 400, "s6", "an object without s6"),
        Case("unknown_feature", model, named_with(bmii=1.0), JSON, 400, "bmii", "an object with a misspelt bmii"),
        Case("empty_list", model, b"[]", JSON, 400, "empty", "an empty list of rows"),
        Case("empty_object", model, b"{}", JSON, 400, "missing", "an empty object"),
        Case("inputs_not_a_list", model, b'{"inputs": "59, 2, 32.1"}', JSON, 400, "inputs",
             "{\"inputs\": a string}"),
        Case("inputs_with_extra_key", model, json.dumps({"inputs": [row], "debug": True}).encode(), JSON, 400,
             "debug", "{\"inputs\": ..., \"debug\": true}"),
        Case("row_of_wrong_type", model, json.dumps([row, "oops"]).encode(), JSON, 400, "row 1",
             "a list of rows whose second row is a string"),
        Case("named_row", model, json.dumps(named).encode(), JSON,
             what="the row as {name: value}: the same prediction as the list row", **as_row),
        Case("inputs_rows", model, json.dumps({"inputs": [row, row]}).encode(), JSON, 200,
             checks=(AnswerCheck("predictions", 2),), what="{\"inputs\": [row, row]}: two predictions"),
        Case("row_as_text_content_type", model, json.dumps([row]).encode(), "text/plain",
             what="the JSON row sent as text/plain: the same prediction", **as_row),
        Case("row_as_octets", model, json.dumps([row]).encode(), OCTETS,
             what="the JSON row sent as application/octet-stream: the same prediction", **as_row),
        Case("huge_integer", model, named_with(age=10 ** 400), JSON, 400, "age",
             "age: a 401-digit integer (Python's JSON reader makes it an int, too large for a float)"),
        Case("too_many_rows", model, json.dumps([row] * (max_rows + 1)).encode(), JSON, 413, "above the limit",
             f"{max_rows + 1} rows, one above max_rows"),
        Case("json_deeply_nested", model, DEEP_JSON, JSON, 400, "JSON", DEEP_JSON_WHAT),
    ]
    if max_request_size:
        cases.append(Case("over_max_request_size", model, oversized_body(max_request_size, b"[[1, 2"), JSON, 413,
                          "", f"a body of max_request_size + 1 = {max_request_size + 1} bytes", soak=False))
    return cases


# ---------------------------------------------------------------------------------------------
# sample data, limits from the catalog, and the builders keyed by model name


def sample_digits(count: int = 16) -> List[Tuple[np.ndarray, str]]:
    """Held-out digits (8x8 uint8 pixels, label) the served digits model classifies correctly
    (checked by the tests; the model is 99% accurate on the held-out split)."""
    from models import sample_data
    _, _, images, labels = sample_data.digits_split()
    return [(images[i], str(labels[i])) for i in range(count)]


def _handler_config(catalog: Optional[Catalog], model: str) -> dict:
    if catalog is None:
        return {}
    entries = [m for m in catalog.models if m.name == model]
    return dict(entries[0].handler_config) if entries else {}


def _max_request_size(catalog: Optional[Catalog]) -> int:
    server = catalog.server if catalog else {}
    return int(server.get("max_request_size", TORCHSERVE_MAX_REQUEST_SIZE))


def _efficientnet_lite0(catalog: Optional[Catalog]) -> List[Case]:
    from models import sample_data
    config = _handler_config(catalog, "efficientnet_lite0")
    image = config.get("image", {})
    return rgb_classifier_cases("efficientnet_lite0", sample_data.photo_bytes()[0], _max_request_size(catalog),
                                int(image.get("max_pixels", DEFAULT_MAX_PIXELS)), int(config.get("topk", 5)))


def _digits(catalog: Optional[Catalog]) -> List[Case]:
    image = _handler_config(catalog, "digits").get("image", {})
    return digits_cases("digits", sample_digits(2), None, int(image.get("max_pixels", DEFAULT_MAX_PIXELS)))


def _minilm(catalog: Optional[Catalog]) -> List[Case]:
    config = {**TEXT_DEFAULT_LIMITS, **_handler_config(catalog, "minilm")}
    return text_cases("minilm", int(config["max_chars"]), int(config["max_texts"]), _max_request_size(catalog))


def diabetes_rows() -> Tuple[np.ndarray, List[str]]:
    """Rows of scikit-learn's diabetes set in its own units (what a client sends), and the names."""
    from sklearn.datasets import load_diabetes
    data = load_diabetes(scaled=False)
    return data.data.astype(np.float32), list(data.feature_names)


def _diabetes(catalog: Optional[Catalog]) -> List[Case]:
    rows, names = diabetes_rows()
    max_rows = int(_handler_config(catalog, "diabetes").get("max_rows", 1024))
    return tabular_cases("diabetes", rows[:1], names, max_rows, _max_request_size(catalog))


CASE_BUILDERS: Dict[str, Callable[[Optional[Catalog]], List[Case]]] = {
    "efficientnet_lite0": _efficientnet_lite0, "digits": _digits, "minilm": _minilm, "diabetes": _diabetes}


def cases(models: Optional[Iterable[str]] = None, catalog: Optional[Catalog] = None) -> List[Case]:
    """The corpus (of ``models`` only, when given); limits such as max_chars or max_request_size
    come from the catalog where it declares the model."""
    catalog = catalog if catalog is not None else load_catalog()
    wanted = list(CASE_BUILDERS) if models is None else list(models)
    out: List[Case] = []
    for model in wanted:
        out += CASE_BUILDERS[model](catalog)
    names = [c.label for c in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"case names must be unique per model: {duplicates}")
    return out


def served_models(catalog: Catalog) -> List[str]:
    """Model names the catalog serves from the start (one per name, whatever its versions)."""
    return list(dict.fromkeys(m.name for m in catalog.loaded_at_start))


def coverage(catalog: Catalog) -> Dict[str, List[str]]:
    """{"run": models to exercise, "pending": models with cases that the catalog does not serve
    yet, "missing": problems that must fail a test (a served model without cases, or cases for a
    model neither served nor pending)}."""
    served = served_models(catalog)
    run = [m for m in served if m in CASE_BUILDERS]
    missing = [f"model {m!r} is served (catalog loaded_at_start) but scripts/bad_inputs.py has no cases "
               f"for it: add a builder to CASE_BUILDERS" for m in served if m not in CASE_BUILDERS]
    pending = [m for m in CASE_BUILDERS if m not in served and m in PENDING_MODELS]
    missing += [f"cases for model {m!r} exist but the catalog does not serve it and it is not in "
                f"PENDING_MODELS: it would silently stop being tested" for m in CASE_BUILDERS
                if m not in served and m not in PENDING_MODELS]
    return {"run": run, "pending": pending, "missing": missing}


# ---------------------------------------------------------------------------------------------
# good requests: what the batches and the soak mix the cases with


@dataclass(frozen=True)
class GoodRequest:
    name: str
    model: str
    body: bytes
    content_type: str
    checks: Tuple[AnswerCheck, ...] = ()
    # how far its answer in any batch may be from its answer alone: kernels differ by batch size and
    # CPU capability in the 6th decimal of a probability (tests/answers.py has the same 1e-4)
    tolerance: float = 1e-4


def good_requests(model: str, catalog: Optional[Catalog] = None) -> List[GoodRequest]:
    """Valid requests of the model's ordinary kind; their correct answer is the one each gets
    alone (and, for digits, its true label)."""
    if model == "efficientnet_lite0":
        from models import sample_data
        out = []
        for i, photo in enumerate(sample_data.photo_bytes()):
            image = Image.open(io.BytesIO(photo)).convert("RGB")
            out.append(GoodRequest(f"photo_{i}_jpeg", model, photo, JPEG, (AnswerCheck("topk"),)))
            out.append(GoodRequest(f"photo_{i}_png_300", model, encode_image(image.resize((300, 200)), "PNG"),
                                   PNG, (AnswerCheck("topk"),)))
        return out
    if model == "digits":
        from models import sample_data
        return [GoodRequest(f"digit_{i}_{label}", model, sample_data.png_bytes(pixels), PNG,
                            (AnswerCheck("label", label),))
                for i, (pixels, label) in enumerate(sample_digits(16)[2:])]
    if model == "minilm":
        from models import sentences
        texts = [t for pair in sentences.PARAPHRASES[:6] for t in pair]
        return [GoodRequest(f"sentence_{i}", model, t.encode(), TEXT, (AnswerCheck("embeddings", 1),), 1e-4)
                for i, t in enumerate(texts)]
    if model == "diabetes":
        rows, _ = diabetes_rows()
        return [GoodRequest(f"row_{i}", model, json.dumps([[float(v) for v in rows[i]]]).encode(), JSON,
                            (AnswerCheck("predictions", 1),), 1e-4) for i in range(10, 20)]
    raise KeyError(f"no good requests for model {model!r}")


# ---------------------------------------------------------------------------------------------
# sending and judging


@dataclass
class Outcome:
    status: Optional[int]           # None: no HTTP answer (connection reset, timeout)
    answer: object = None           # parsed JSON body (or text)
    message: str = ""               # the error message of a 4xx/5xx, or what went wrong
    seconds: float = 0.0


def send(client: TorchServeClient, model: str, body: bytes, content_type: str,
         timeout: float = 120.0) -> Outcome:
    started = time.perf_counter()
    try:
        response = client.predict_raw(model, body, content_type=content_type, timeout=timeout)
    except requests.RequestException as exc:
        return Outcome(None, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - started)
    seconds = time.perf_counter() - started
    try:
        answer = response.json()
    except ValueError:
        answer = response.text
    message = ""
    if response.status_code >= 400:
        message = answer.get("message", json.dumps(answer)) if isinstance(answer, dict) else str(answer)
    return Outcome(response.status_code, answer, message, seconds)


def judge(case: Case, outcome: Outcome, reference_answer=None) -> Optional[str]:
    """Why the outcome is not what the case expects (None when it is)."""
    if outcome.status != case.status:
        got = "no HTTP answer" if outcome.status is None else f"HTTP {outcome.status}"
        return f"{got} ({_short(outcome.message or outcome.answer or '')}), expected {case.status}"
    if case.status >= 400:
        if case.message.lower() not in outcome.message.lower():
            return f"message {outcome.message!r} does not contain {case.message!r}"
        return None
    for check in case.checks:
        problem = check.problem(outcome.answer)
        if problem:
            return problem
    if case.reference is not None:
        return compare_answers(outcome.answer, reference_answer, case.tolerance)
    return None


def judge_good(request: GoodRequest, outcome: Outcome, alone_answer=None) -> Optional[str]:
    """Why a good request's outcome is not its correct answer (None when it is)."""
    if outcome.status != 200:
        got = "no HTTP answer" if outcome.status is None else f"HTTP {outcome.status}"
        return f"{got}: {_short(outcome.message or outcome.answer or '')}"
    for check in request.checks:
        problem = check.problem(outcome.answer)
        if problem:
            return problem
    if alone_answer is not None:
        return compare_answers(outcome.answer, alone_answer, request.tolerance)
    return None


def reference_answers(client: TorchServeClient, model: str, selected: Sequence[Case]) -> dict:
    """(reference body, content type) -> the answer the model gives it alone."""
    out = {}
    for case in selected:
        key = (case.reference, case.reference_content_type)
        if case.reference is not None and key not in out:
            outcome = send(client, model, case.reference, case.reference_content_type)
            if outcome.status != 200:
                raise RuntimeError(f"{case.label}: its reference input was answered {outcome.status}: "
                                   f"{outcome.message}")
            out[key] = outcome.answer
    return out


def worker_pids(client: TorchServeClient, models: Iterable[str]) -> Dict[str, List[int]]:
    """Model -> the pids of its workers, from the management API's describe (a restarted
    worker has a new pid)."""
    out = {}
    for model in models:
        workers = client.describe(model)[0].get("workers", [])
        out[model] = sorted(int(w["pid"]) for w in workers if w.get("pid") not in (None, "", -1))
    return out


@dataclass
class Result:
    case: Case
    outcome: Outcome
    problem: Optional[str]

    @property
    def ok(self) -> bool:
        return self.problem is None


def run_alone(client: TorchServeClient, selected: Sequence[Case], model_url: Optional[Callable[[str], str]] = None
              ) -> List[Result]:
    """Send each case on its own (one after the other) and judge it."""
    model_url = model_url or (lambda model: model)
    references: dict = {}
    results = []
    for case in selected:
        url = model_url(case.model)
        if case.reference is not None and (case.reference, case.reference_content_type) not in references:
            references.update(reference_answers(client, url, [case]))
        outcome = send(client, url, case.body, case.content_type)
        reference = references.get((case.reference, case.reference_content_type))
        results.append(Result(case, outcome, judge(case, outcome, reference)))
        if outcome.status is None or outcome.status >= 500:  # a dead worker: wait for its restart
            client.wait_ready([url], 300)
    return results


def results_table(results: Sequence[Result]) -> str:
    """Markdown table: case, status received, status expected, verdict, message or answer."""
    lines = ["| model | case | status | expected | verdict | message / answer |",
             "|---|---|---:|---:|---|---|"]
    for r in results:
        said = r.outcome.message if r.outcome.status != 200 else _short(r.outcome.answer, 70)
        verdict = "ok" if r.ok else f"WRONG: {r.problem}"
        status = "-" if r.outcome.status is None else r.outcome.status
        lines.append(f"| {r.case.model} | {r.case.name} | {status} | {r.case.status} | "
                     f"{_cell(verdict)} | {_cell(said)} |")
    return "\n".join(lines)


def _cell(text, limit: int = 140) -> str:
    text = _short(text, limit) if not isinstance(text, str) or len(text) > limit else text
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# writing the corpus for curl


EXTENSIONS = {JPEG: "jpg", PNG: "png", GIF: "gif", WEBP: "webp", JSON: "json", "image/bmp": "bmp",
              "image/tiff": "tif", "text/plain": "txt", TEXT: "txt"}


def _extension(content_type: str) -> str:
    if content_type.startswith("multipart/"):
        return "multipart"
    return EXTENSIONS.get(content_type, "bin")


def write_corpus(folder: str, selected: Sequence[Case], inference_url: str = "http://127.0.0.1:8080") -> str:
    """DIR/<model>/<case>.<ext> (+ .reference.<ext>), DIR/index.json and DIR/replay.sh; returns
    the index path."""
    index = []
    script = ["#!/bin/sh",
              "# Replays every case with curl; prints model/case, the status received and the one expected.",
              "# KEY: an inference key (.venv/bin/python -m scripts.serve key inference); URL: the inference API.",
              f'URL="${{URL:-{inference_url}}}"', 'cd "$(dirname "$0")"']
    for case in selected:
        os.makedirs(os.path.join(folder, case.model), exist_ok=True)
        path = f"{case.model}/{case.name}.{_extension(case.content_type)}"
        with open(os.path.join(folder, path), "wb") as f:
            f.write(case.body)
        entry = {"model": case.model, "name": case.name, "file": path, "content_type": case.content_type,
                 "bytes": len(case.body), "status": case.status, "message": case.message,
                 "checks": [str(c) for c in case.checks], "what": case.what}
        if case.reference is not None:
            reference = f"{case.model}/{case.name}.reference.{_extension(case.reference_content_type)}"
            with open(os.path.join(folder, reference), "wb") as f:
                f.write(case.reference)
            entry.update(reference=reference, reference_content_type=case.reference_content_type,
                         tolerance=case.tolerance)
        index.append(entry)
        curl = (f'curl -s -o /dev/null -w "{case.model}/{case.name} %{{http_code}} (expected {case.status})\\n" '
                f'-H "Authorization: Bearer $KEY" -H {shlex.quote("Content-Type: " + case.content_type)} '
                f'--data-binary @{shlex.quote(path)} "$URL/predictions/{case.model}"')
        script.append(curl)
    index_path = os.path.join(folder, "index.json")
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    with open(os.path.join(folder, "replay.sh"), "w", encoding="utf-8") as f:
        f.write("\n".join(script) + "\n")
    os.chmod(os.path.join(folder, "replay.sh"), 0o755)
    return index_path


# ---------------------------------------------------------------------------------------------
# command line


def running_client(config_path: str = CONFIG_PROPERTIES_PATH, home: str = ROOT) -> TorchServeClient:
    """A client for the server `make serve` started (addresses from config.properties, keys from
    its key_file.json)."""
    with open(config_path, encoding="utf-8") as f:
        props = parse_config_properties(f.read())
    return TorchServeClient(props["inference_address"], props["management_address"], home)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="print the cases")
    action.add_argument("--write", metavar="DIR", help="write the corpus files, index.json and replay.sh")
    action.add_argument("--send", action="store_true", help="replay against the running server")
    parser.add_argument("--models", help="comma-separated model names (default: every model with cases)")
    parser.add_argument("--config", default=CONFIG_PROPERTIES_PATH, help="config.properties of the server")
    parser.add_argument("--home", default=ROOT, help="folder holding the server's key_file.json")
    args = parser.parse_args(argv)
    catalog = load_catalog()
    wanted = args.models.split(",") if args.models else list(CASE_BUILDERS)
    unknown = [m for m in wanted if m not in CASE_BUILDERS]
    if unknown:
        parser.error(f"no cases for {', '.join(unknown)}; models with cases: {', '.join(CASE_BUILDERS)}")
    selected = cases(wanted, catalog)
    if args.list:
        for case in selected:
            print(f"{case.label:48s} {case.status}  {case.message or ', '.join(map(str, case.checks)):32s} {case.what}")
        print(f"{len(selected)} cases")
        return 0
    if args.write:
        print(f"{len(selected)} cases written; index: {write_corpus(args.write, selected)}")
        return 0
    client = running_client(args.config, args.home)
    served = {m["modelName"] for m in client.list_models()}
    pending = [c for c in selected if c.model not in served]
    results = run_alone(client, [c for c in selected if c.model in served])
    print(results_table(results))
    wrong = [r for r in results if not r.ok]
    for model in sorted({c.model for c in pending}):
        print(f"pending: {model} is not served by {client.inference_url} "
              f"({sum(c.model == model for c in pending)} cases not sent)")
    print(f"{len(results) - len(wrong)} of {len(results)} cases answered as expected"
          + (f"; WRONG: {', '.join(r.case.label for r in wrong)}" if wrong else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
