"""Checking one sample against its pipeline's schema (used by the build and by verify)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from distillkit.pipelines.codecs import UNSAFE_EXTENSIONS, SampleView

if TYPE_CHECKING:
    from distillkit.pipelines.base import Pipeline


class SchemaError(ValueError):
    """A sample breaks its schema; the message names the key and field."""


def validate_sample(pipeline: Pipeline, key: str, sample: Mapping[str, bytes] | SampleView) -> SampleView:
    """Check ``sample`` against ``pipeline.fields``; return its ``SampleView`` (fields decoded
    by the checks stay decoded for the statistics).

    Raises:
        SchemaError: naming ``key`` and the field: a missing required field, an unexpected
            field, a code-executing encoding or a failed check.
    """
    view = sample if isinstance(sample, SampleView) else SampleView(sample, key)
    for name in view:
        if name.lower().endswith(UNSAFE_EXTENSIONS):
            raise SchemaError(f"{key}: field {name!r} uses a code-executing encoding")
    try:
        specs = pipeline.fields(view)
    except Exception as exc:
        raise SchemaError(f"{key}: {exc}") from None
    for name, spec in specs.items():
        if spec.required and name not in view:
            raise SchemaError(f"{key}: missing field {name!r}")
    for name in view:
        if name not in specs:
            raise SchemaError(f"{key}: unexpected field {name!r}")
    for name, spec in specs.items():
        if name in view and spec.check is not None:
            try:
                spec.check(view[name], view)
            except SchemaError:
                raise
            except Exception as exc:
                raise SchemaError(f"{key}: field {name!r}: {exc}") from None
    return view


def expect_array(arr: np.ndarray, dtype: str, ndim: int, cols: int | None = None) -> None:
    """Raise ``ValueError`` unless ``arr`` has ``dtype``, ``ndim`` dimensions and ``cols`` columns."""
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"expected an array, got {type(arr).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"dtype {arr.dtype}, expected {dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"shape {arr.shape}, expected {ndim} dimensions")
    if cols is not None and arr.shape[-1] != cols:
        raise ValueError(f"shape {arr.shape}, expected {cols} columns")


def check_jpeg(data: bytes, sample: object = None) -> None:
    """A ``FieldSpec`` check of a JPEG field: raise ``ValueError`` unless ``data`` starts with the JPEG marker."""
    if bytes(data[:2]) != b"\xff\xd8":
        raise ValueError("not a JPEG")
