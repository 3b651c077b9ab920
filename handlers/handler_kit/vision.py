"""Image stages: bytes -> checked, decoded uint8 tensor -> normalized batch tensor.

Decoding uses torchvision's decoders (libjpeg-turbo, libpng, libwebp); PIL only reads the header,
so that the pixel limit is enforced before any pixels are decoded. Two exceptions, both through PIL:
PNGs (see decode), and large JPEGs, which libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT
domain (PIL's draft mode) when the model's resize would throw those pixels away anyway.
"""
import io
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from handler_kit.errors import BadInput, PayloadTooLarge, UnsupportedMediaType

# The pixel limit is ours, per model (handler.image.max_pixels), and checked below with the
# dimensions in the message; PIL's global guard would refuse first with a vaguer one.
Image.MAX_IMAGE_PIXELS = None
# torchvision 0.29 announces that its decoders will move to TorchCodec; they are what runs here
# (and on torch 2.11's torchvision 0.26) until that package is a dependency.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

# PIL format name -> what we call it; MPO is the multi-picture JPEG many phones write.
DECODABLE_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF"}


def inspect_header(data: bytes, max_pixels: int) -> tuple:
    """(format, width, height) from the header alone; refuses unknown formats and pixel bombs."""
    if not data:
        raise BadInput("image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
    except UnidentifiedImageError:
        raise BadInput(f"body is not a recognizable image ({len(data)} bytes); "
                       "send JPEG, PNG, WebP or GIF") from None
    except Exception as exc:  # PIL raises assorted errors on broken headers
        raise BadInput(f"image header is corrupt: {exc}") from None
    if fmt not in DECODABLE_FORMATS:
        raise UnsupportedMediaType(f"image format {fmt} is not supported; send JPEG, PNG, WebP or GIF")
    if width < 1 or height < 1:
        raise BadInput(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} = {width * height} pixels, above the "
                              f"limit of {max_pixels} pixels")
    return DECODABLE_FORMATS[fmt], width, height


def jpeg_scale(width: int, height: int, min_short_side: int) -> int:
    """The largest libjpeg DCT scale (1, 2, 4 or 8) whose decoded shorter side stays at least
    ``min_short_side`` (0: always 1)."""
    scale = 1
    while min_short_side and scale < 8 and min(width, height) // (2 * scale) >= min_short_side:
        scale *= 2
    return scale


def decode(data: bytes, color: str, max_pixels: int, min_short_side: int = 0) -> torch.Tensor:
    """Decode one image to a uint8 CxHxW tensor (C=3 for rgb, 1 for grayscale), EXIF-rotated. A
    JPEG whose shorter side is at least twice ``min_short_side`` is decoded reduced (DCT scaling),
    its shorter side still ``min_short_side`` or more."""
    fmt, width, height = inspect_header(data, max_pixels)
    scale = jpeg_scale(width, height, min_short_side) if fmt == "JPEG" else 1
    if scale > 1:
        return decode_with_pil(data, fmt, color, scale)
    if fmt == "PNG":
        # torchvision 0.29's decode_png kills the process (SIGSEGV) on any libpng error, such as
        # a bad CRC or corrupt compressed data; PIL raises instead.
        return decode_with_pil(data, fmt, color)
    mode = ImageReadMode.RGB if color == "rgb" else ImageReadMode.GRAY
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = decode_image(raw, mode=mode, apply_exif_orientation=True)
    except RuntimeError as exc:
        raise BadInput(f"{fmt} image could not be decoded: {str(exc).splitlines()[0]}") from None
    if image.ndim == 4:  # animated GIF: the first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = F.to_dtype(image, torch.uint8, scale=True)
    channels = 3 if color == "rgb" else 1
    if image.shape[0] != channels:  # decoders that ignore the mode (GIF)
        image = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
        if channels == 1:
            image = gray_of(image)
    return image


def gray_of(rgb: torch.Tensor) -> torch.Tensor:
    """Luma of a uint8 RGB image, rounded: torchvision's uint8 path truncates, which turns every
    gray pixel (v, v, v) into v - 1."""
    return F.rgb_to_grayscale(rgb.to(torch.float32)).round_().clamp_(0, 255).to(torch.uint8)


def decode_with_pil(data: bytes, fmt: str, color: str, jpeg_scale: int = 1) -> torch.Tensor:
    """Decode with PIL to a uint8 CxHxW tensor, EXIF-rotated; 16-bit samples keep their high byte
    (as torchvision's to_dtype(uint8, scale=True) does). ``jpeg_scale`` > 1: a JPEG decoded at
    1/jpeg_scale of its size by libjpeg itself (draft mode)."""
    try:
        if fmt == "PNG":
            with Image.open(io.BytesIO(data)) as img:
                img.verify()  # every chunk's CRC: PIL's decoder does not check the pixel data's
        with Image.open(io.BytesIO(data)) as img:
            if jpeg_scale > 1:
                width, height = img.size
                img.draft("RGB" if color == "rgb" else "L", (width // jpeg_scale, height // jpeg_scale))
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):  # 16-bit grayscale
                img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8), "L")
            img = img.convert("RGB" if color == "rgb" else "L")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's assorted decode errors
        raise BadInput(f"{fmt} image could not be decoded: {exc}") from None
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
    return pixels.permute(2, 0, 1).contiguous() if pixels.ndim == 3 else pixels.unsqueeze(0)


def resize_and_crop(image: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """Shorter side to ``resize`` (antialiased), then the centre ``crop`` x ``crop`` square."""
    height, width = image.shape[-2:]
    short, long = min(height, width), max(height, width)
    if long > 2 * short:
        # Only the centre survives the crop: cut the long side to twice the short one first, so
        # that a 1x50000 image costs what a 1x2 one does (resizing it whole would take gigabytes).
        image = F.center_crop(image, [2 * short, width] if height > width else [height, 2 * short])
    image = F.resize(image, [resize], antialias=True)
    return F.center_crop(image, [crop, crop])


def to_batch(images: Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float],
             channels_last: bool = False) -> torch.Tensor:
    """Stack same-sized uint8 images and normalize them in one batched operation."""
    batch = torch.stack(list(images)).to(torch.float32).div_(255.0)
    batch = F.normalize(batch, mean=list(mean), std=list(std), inplace=True)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch
