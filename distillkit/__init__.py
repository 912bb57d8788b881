"""distillkit: offline preprocessing to WebDataset shards, and thin trainers, for
self-supervised cross-modal distillation.

The repository's folders ``pipelines/``, ``sensors/``, ``preprocess/``, ``train/`` and
``manifests/`` install as ``distillkit.pipelines``, ``distillkit.sensors``, ... (see
``pyproject.toml``). The public reading API is re-exported here lazily, so
``import distillkit`` stays cheap (no torch, no dask).
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("distillkit")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
