"""The image family's bad-input cases (scripts/drills/bad_inputs.py runs them): broken and exotic
encodings of a valid image, made here from the project's sample data, for RGB classifiers (the
photographs) and grayscale ones (the 8x8 digits); their samples are named in models/families.py.
"""
import io
import struct
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from scripts.drills.bad_input_cases import (GIF, HTML, JPEG, JSON, OCTETS, PNG, TEXT, WEBP, AnswerCheck, Case,
                                     DEEP_JSON, DEEP_JSON_WHAT, GoodRequest, _random_bytes, b64_json,
                                     encode_image, multipart, oversized_body)


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

def truncated_in_scan(jpeg: bytes) -> bytes:
    """The JPEG cut halfway through its entropy-coded data (after its start-of-scan header), so
    that its headers are whole and its pixels are not."""
    scan = jpeg.index(b"\xff\xda")
    return jpeg[:scan + (len(jpeg) - scan) // 2]

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


# ---------------------------------------------------------------------------------------------
# the image samples: cases and good requests (named in models/families.py)


def sample_digits(count: int = 16) -> List[Tuple[np.ndarray, str]]:
    """Held-out digits (8x8 uint8 pixels, label) the served digits model classifies correctly
    (checked by the tests; the model is 99% accurate on the held-out split)."""
    from models import sample_data
    _, _, images, labels = sample_data.digits_split()
    return [(images[i], str(labels[i])) for i in range(count)]


def photo_cases(model: str, limits: dict, max_request_size: Optional[int]) -> List[Case]:
    from models import sample_data
    return rgb_classifier_cases(model, sample_data.photo_bytes()[0], max_request_size, limits["max_pixels"],
                                limits["topk"])


def digit_cases(model: str, limits: dict, max_request_size: Optional[int]) -> List[Case]:
    """(max_request_size is left to the photographs' cases: TorchServe refuses the body before
    any worker, whatever the model.)"""
    return digits_cases(model, sample_digits(2), None, limits["max_pixels"])


def photo_requests(model: str) -> List[GoodRequest]:
    from models import sample_data
    out = []
    for i, photo in enumerate(sample_data.photo_bytes()):
        image = Image.open(io.BytesIO(photo)).convert("RGB")
        out.append(GoodRequest(f"photo_{i}_jpeg", model, photo, JPEG, (AnswerCheck("topk"),)))
        out.append(GoodRequest(f"photo_{i}_png_300", model, encode_image(image.resize((300, 200)), "PNG"),
                               PNG, (AnswerCheck("topk"),)))
    return out


def digit_requests(model: str) -> List[GoodRequest]:
    from models import sample_data
    return [GoodRequest(f"digit_{i}_{label}", model, sample_data.png_bytes(pixels), PNG,
                        (AnswerCheck("label", label),))
            for i, (pixels, label) in enumerate(sample_digits(16)[2:])]
