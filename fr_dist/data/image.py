"""Image decode + augmentation.

Decoder: ``simplejpeg`` (libjpeg-turbo, wheels for Linux/macOS/Windows on x86 and ARM, no system
libraries) for JPEG: it decodes straight to RGB without a BGR->RGB copy and releases the GIL, so
DataLoader threads and workers scale; PNG and anything else falls back to OpenCV (also
libjpeg-turbo/libpng inside its wheel), then Pillow. ``benchmarks/data_loader.py`` measures them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["decode_image", "encode_jpeg", "normalize_chw", "DECODERS"]


def _decode_simplejpeg(buf: bytes) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(buf, colorspace="RGB")


def _decode_cv2(buf: bytes) -> np.ndarray:
    import cv2

    img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("OpenCV could not decode the image")
    return np.ascontiguousarray(img[:, :, ::-1])


def _decode_pil(buf: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(buf)).convert("RGB"))


DECODERS = {"simplejpeg": _decode_simplejpeg, "cv2": _decode_cv2, "pil": _decode_pil}


def decode_image(buf: bytes, decoder: str = "auto") -> np.ndarray:
    """Encoded JPEG/PNG bytes -> HxWx3 uint8 RGB."""
    if not buf:
        raise ValueError("empty image payload")
    if decoder != "auto":
        return DECODERS[decoder](buf)
    if buf[:2] == b"\xff\xd8":
        try:
            return _decode_simplejpeg(buf)
        except ImportError:
            pass
    try:
        return _decode_cv2(buf)
    except ImportError:
        return _decode_pil(buf)


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """HxWx3 uint8 RGB -> JPEG bytes (OpenCV, as ``mx.recordio.pack_img`` does from BGR)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def normalize_chw(img: np.ndarray, flip: bool = False) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32 in [-1, 1] ((x - 127.5) / 127.5), optionally mirrored."""
    if flip:
        img = img[:, ::-1]
    return ((img.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1).copy()
