"""Image decode + augmentation (CPU, numpy).

Decoder: ``simplejpeg`` for JPEG. It wraps libjpeg-turbo, ships wheels for Linux/macOS/Windows
on x86-64 and ARM (no system libraries), decodes straight to RGB (no BGR->RGB copy as with
OpenCV) and releases the GIL. ``benchmarks/data_loader.py`` measures it against OpenCV and
Pillow (results in ``benchmarks/results/``). PNG and anything simplejpeg rejects fall back to
OpenCV (libpng/libjpeg-turbo inside its wheel), then Pillow. All three use libjpeg-turbo's
default IDCT, so they agree exactly on JPEG (the tests check within 1 on uint8).

Normalisation: ``(x - 127.5) / 127.5`` -> [-1, 1], as insightface's ``arcface_torch``:
:data:`PIXEL_MEAN`, :data:`PIXEL_STD` and :func:`normalize_pixels` are its one definition (the
loaders, DALI, evaluation and the exported model's input contract use them).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = [
    "DECODERS",
    "decode_image",
    "encode_jpeg",
    "resize_to",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "normalize_pixels",
]

PIXEL_MEAN = 127.5
PIXEL_STD = 127.5


def _decode_simplejpeg(buf: bytes) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(buf, colorspace="RGB")


def _decode_cv2(buf: bytes) -> np.ndarray:
    import cv2

    img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("OpenCV could not decode the image")
    return np.ascontiguousarray(img[:, :, ::-1])  # BGR -> RGB


def _decode_pil(buf: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(buf)) as im:
        return np.asarray(im.convert("RGB"))


DECODERS = {"simplejpeg": _decode_simplejpeg, "cv2": _decode_cv2, "pil": _decode_pil}


def decode_image(buf: bytes, decoder: str = "auto") -> np.ndarray:
    """Encoded JPEG/PNG bytes -> HxWx3 uint8 RGB (``decoder``: auto | simplejpeg | cv2 | pil)."""
    if not buf:
        raise ValueError("empty image payload")
    if decoder != "auto":
        try:
            fn = DECODERS[decoder]
        except KeyError:
            raise ValueError(f"unknown decoder {decoder!r}; known: auto, {', '.join(DECODERS)}") from None
        return fn(buf)
    if buf[:2] == b"\xff\xd8":
        try:
            return _decode_simplejpeg(buf)
        except ImportError:
            pass
        except ValueError:  # let OpenCV try (and produce its own message) for odd JPEGs
            pass
    try:
        return _decode_cv2(buf)
    except ImportError:
        return _decode_pil(buf)


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """HxWx3 uint8 RGB -> JPEG bytes (OpenCV from BGR, as ``mx.recordio.pack_img`` does)."""
    import cv2

    ok, buf = cv2.imencode(
        ".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def resize_to(img: np.ndarray, size: Optional[tuple[int, int]]) -> np.ndarray:
    """Bilinear resize to ``size`` = (h, w) when the image differs (no-op otherwise)."""
    if size is None or img.shape[:2] == tuple(size):
        return img
    import cv2

    return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def normalize_pixels(pixels, dtype=None):
    """uint8 pixels (numpy array or torch tensor, any shape) -> ``(x - 127.5) / 127.5`` in [-1, 1].

    Returns a new float array / tensor (float32, or ``dtype``); the input is never modified.
    """
    if isinstance(pixels, np.ndarray):
        out = pixels.astype(dtype or np.float32)  # a copy
        out -= PIXEL_MEAN
        out /= PIXEL_STD
        return out
    import torch

    out = pixels.to(dtype or torch.float32, copy=True)
    return out.sub_(PIXEL_MEAN).div_(PIXEL_STD)
