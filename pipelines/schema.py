"""Checking one sample against its pipeline's schema (used by the build and by verify)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from pipelines.shards import FORBIDDEN_EXTENSIONS


class SchemaError(ValueError):
    """A sample breaks its schema; the message names the key and field."""


def validate_sample(pipeline: Any, key: str, sample: dict[str, bytes]) -> None:
    """Raise ``SchemaError`` naming ``key`` and the field if ``sample`` breaks the schema:
    a missing required field, an unexpected field, a refused encoding or a failed check."""
    for name in sample:
        if any(name.endswith(ext) for ext in FORBIDDEN_EXTENSIONS):
            raise SchemaError(f"{key}: field {name!r} uses a code-executing encoding")
    specs = pipeline.fields(sample)
    for name, spec in specs.items():
        if spec.required and name not in sample:
            raise SchemaError(f"{key}: missing field {name!r}")
    for name in sample:
        if name not in specs:
            raise SchemaError(f"{key}: unexpected field {name!r}")
    for name, spec in specs.items():
        if name in sample and spec.check is not None:
            try:
                spec.check(sample[name], sample)
            except SchemaError:
                raise
            except Exception as exc:
                raise SchemaError(f"{key}: field {name!r}: {exc}") from None


def load_npy(data: bytes) -> np.ndarray:
    """Decode ``.npy`` bytes without ever unpickling (object arrays are refused)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_bytes(array: np.ndarray) -> bytes:
    if array.dtype == object:
        raise ValueError("object arrays cannot be stored (they would need pickle)")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def expect_array(arr: np.ndarray, dtype: str, ndim: int, cols: int | None = None) -> None:
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"dtype {arr.dtype}, expected {dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"shape {arr.shape}, expected {ndim} dimensions")
    if cols is not None and arr.shape[-1] != cols:
        raise ValueError(f"shape {arr.shape}, expected {cols} columns")
