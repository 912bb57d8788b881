"""distillkit: offline preprocessing to WebDataset shards, and thin trainers, for
self-supervised cross-modal distillation.

The repository's folders ``pipelines/``, ``sensors/``, ``preprocess/``, ``train/`` and
``manifests/`` install as ``distillkit.pipelines``, ``distillkit.sensors``, ... (see
``pyproject.toml``). The public reading API is re-exported here lazily, so
``import distillkit`` stays cheap (no torch, no dask).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from distillkit.build_info import version

__version__ = version()

# Public name -> module that defines it; imported on first attribute access (PEP 562), because
# the reading API needs torch, webdataset and OpenCV, which a plain ``import distillkit`` must not load.
_LAZY = {
    "open_shards": "distillkit.reading",
    "shard_urls": "distillkit.reading",
    "wds_handlers": "distillkit.reading",
    "UnsafeFieldError": "distillkit.pipelines.codecs",
}

if TYPE_CHECKING:  # static checkers and IDEs see the real objects
    from distillkit.pipelines.codecs import UnsafeFieldError
    from distillkit.reading import open_shards, shard_urls, wds_handlers

__all__ = ["UnsafeFieldError", "__version__", "open_shards", "shard_urls", "wds_handlers"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: the next access skips __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
