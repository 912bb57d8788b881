"""Image bytes -> arrays, one decoder for the whole toolkit (OpenCV, libjpeg-turbo)."""

from __future__ import annotations

import cv2
import numpy as np


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8 RGB. Raises ``ValueError`` if undecodable."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a decodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_labels(data: bytes) -> np.ndarray:
    """Single-channel PNG bytes -> (H, W) uint8 or uint16 array, bit depth kept (superpixel
    labels above 255 are stored as 16-bit). Raises ``ValueError`` otherwise."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 2:
        raise ValueError("not a single-channel PNG")
    return img


# zlib level 6 with adaptive filtering instead of OpenCV's default (level 1, RLE): on 1600x900
# superpixel maps the files are 32% smaller and decode 25% faster (4.7 -> 3.6 ms), for 8 ms more
# encoding per image. Shards are built once and decoded every epoch (docs/benchmarks.md).
PNG_LABEL_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_DEFAULT]


def encode_labels_png(labels: np.ndarray) -> bytes:
    """(H, W) non-negative integer labels -> PNG bytes: 8-bit when they fit (< 256), else 16-bit."""
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    ok, buf = cv2.imencode(".png", labels.astype(dtype), PNG_LABEL_PARAMS)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
