"""Real data that ships inside scikit-learn: the digits set and two photographs.

Used to train and calibrate at build time, and by the tests and the benchmark, so that all of
them see exactly the same images.
"""
import io
import os
from typing import List, Tuple

import numpy as np
from PIL import Image

PHOTO_NAMES = ("china.jpg", "flower.jpg")
# What a real ImageNet classifier must see in them (top-1 among these): a Chinese palace/temple
# building, and a daisy-like flower head (with a bee on it). The tests check the served models.
PHOTO_CLASSES = {
    "china.jpg": frozenset({"palace", "castle", "monastery", "bell cote", "church", "mosque", "stupa",
                            "dome", "boathouse", "lakeside", "pagoda"}),
    "flower.jpg": frozenset({"daisy", "sea anemone", "yellow lady's slipper", "bee"}),
}
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def photo_paths() -> List[str]:
    import sklearn.datasets
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [os.path.join(folder, name) for name in PHOTO_NAMES]


def photo_bytes() -> List[bytes]:
    out = []
    for path in photo_paths():
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def digits_split() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, test_images, test_labels); images are uint8 8x8 in 0..255,
    exactly the pixels a client sends when it encodes a digit as an 8-bit grayscale PNG."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target)
    return x_train, y_train, x_test, y_test


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a HxW uint8 array as a grayscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def phone_photo_bytes(quality: int = 95) -> bytes:
    """A 12 MP (4032x3024) JPEG as phones take them: flower.jpg enlarged with fixed sensor-like
    noise, so that it compresses like a real photo (about 7 MB at quality 95, above TorchServe's
    default 6.5 MB request limit). Deterministic: the same bytes on every machine."""
    photo = Image.open(io.BytesIO(photo_bytes()[1])).convert("RGB").resize((4032, 3024))
    noise = np.random.default_rng(0).integers(-30, 30, (3024, 4032, 3))
    photo = Image.fromarray(np.clip(np.asarray(photo, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
