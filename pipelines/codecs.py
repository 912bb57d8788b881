"""Shard field encodings, decided by the field name's extension, for every pipeline.

One table serves the build's field checks, ``verify``, the training streams and the public
reader (``distillkit.open_shards``), so a field decodes the same way everywhere:

============================  =====================================================
field name ends with          decoded as
============================  =====================================================
``.npy``                      numpy array (``allow_pickle=False``: never unpickles)
``.json``                     JSON value
a label suffix (``.sp.png``)  (H, W) uint8/uint16 label image, bit depth kept
``.jpg`` / ``.jpeg``/``.png``  (H, W, 3) uint8 RGB (``images="rgb"``) or the bytes
anything else (``.flac``...)  the bytes
``.pth`` ``.pt`` ``.pickle``  refused (``UnsafeFieldError``): reading never runs code
============================  =====================================================

Label images are PNGs whose pixel values are ids, not colours. Stock decoders (webdataset's
``.decode("rgb")``, PIL's ``convert("RGB")``) turn them into 3-channel floats or clip 16-bit
ids without an error, so their field names end in one of ``LABEL_IMAGE_SUFFIXES`` and every
reader here decodes those with :func:`decode_labels`. New pipelines must name label images
with one of these suffixes (``docs/reading.md`` shows the stock-webdataset handler).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np

from distillkit.sensors.images import decode_labels, decode_rgb

# Decoding these would unpickle or import code: never written, never read.
UNSAFE_EXTENSIONS = (".pth", ".pt", ".pyd", ".pickle", ".pkl", ".ten", ".pyc", ".so")
# Field-name suffixes of label images (ids stored as PNG pixels, 8- or 16-bit).
LABEL_IMAGE_SUFFIXES = (".sp.png", ".inst.png", ".sem.png", ".lbl.png")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class UnsafeFieldError(ValueError):
    """A field whose decoding could execute code (pickle, .pth, .pyd): always fatal."""


def refuse_unsafe(name: str) -> None:
    """Raise ``UnsafeFieldError`` for a field whose format could execute code when decoded."""
    if name.lower().endswith(UNSAFE_EXTENSIONS):
        raise UnsafeFieldError(f"field {name!r} has a refused (code-executing) format")


def is_label_image(name: str) -> bool:
    """True for a field that holds a label image (ids as PNG pixels), by its name's suffix."""
    return name.lower().endswith(LABEL_IMAGE_SUFFIXES)


def decode_field(name: str, data: bytes, images: Literal["rgb", "raw"] = "rgb") -> Any:
    """Decode one field by its name (see the module's table).

    Args:
        name: the field name without the sample key, e.g. ``"cam0.sp.png"``.
        data: the field's bytes as stored in the shard.
        images: ``"rgb"`` decodes photographs to (H, W, 3) uint8 RGB; ``"raw"`` leaves them as
            bytes (label images are always decoded: they are data, not pictures).

    Raises:
        UnsafeFieldError: for a code-executing format. ``ValueError`` for undecodable bytes.
    """
    refuse_unsafe(name)
    low = name.lower()
    if low.endswith(".npy"):
        return load_npy(data)
    if low.endswith(".json"):
        return json.loads(data)
    if low.endswith(LABEL_IMAGE_SUFFIXES):
        return decode_labels(data)
    if low.endswith(IMAGE_EXTENSIONS) and images == "rgb":
        return decode_rgb(data)
    return bytes(data)


def load_npy(data: bytes) -> np.ndarray:
    """Decode ``.npy`` bytes without ever unpickling (object arrays are refused)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_bytes(array: np.ndarray) -> bytes:
    """Encode an array as ``.npy`` bytes; object arrays are refused (they would need pickle)."""
    if array.dtype == object:
        raise ValueError("object arrays cannot be stored (they would need pickle)")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): the same object gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class SampleView(Mapping[str, Any]):
    """A built or stored sample whose fields decode on first access and stay decoded.

    The build's field checks, the statistics and ``render`` all read one view, so each field is
    decoded at most once per sample. ``view[name]`` is the decoded value (photographs stay
    bytes: no check needs their pixels), ``view.raw[name]`` the stored bytes.
    """

    def __init__(self, raw: Mapping[str, bytes], key: str = ""):
        self.raw = raw
        self.key = key
        self._decoded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._decoded:
            self._decoded[name] = decode_field(name, self.raw[name], images="raw")
        return self._decoded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def __contains__(self, name: object) -> bool:
        return name in self.raw

    def image(self, name: str) -> np.ndarray:
        """A photograph field decoded to (H, W, 3) uint8 RGB (not cached: pictures only)."""
        return decode_rgb(self.raw[name])
