"""Benchmark entries of ``bench/run.py``: one module per entry, registered here by name.

An entry is a module with ``TITLE`` (str) and ``run(ctx: Context) -> Result``. Every figure it returns
carries its reference, measured in the same process on the same inputs (:class:`Figure`), so a result is
always a ratio, never a bare number from a machine nobody knows. To add an entry (log-mel, UniAP, a
trainer): write ``bench/suite/<name>.py`` with those two names and add it to :data:`ENTRIES`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from bench.suite.common import Context, Figure, Result

# name -> module under bench.suite; run in this order (streaming reads the build's shards, extrapolation
# reuses what the others measured)
ENTRIES: dict[str, str] = {
    "superpixels": "bench.suite.superpixels",
    "build": "bench.suite.build",
    "streaming": "bench.suite.streaming",
    "integrity": "bench.suite.integrity",
    "resume": "bench.suite.resume",
    "checkpoint": "bench.suite.checkpoint",
    "remote": "bench.suite.remote",
    "trainer": "bench.suite.trainer",
    "comodo": "bench.suite.comodo",
    "logmel": "bench.suite.logmel",
    "uniap": "bench.suite.uniap",
    "extrapolation": "bench.suite.extrapolation",
}


def entry(name: str) -> ModuleType:
    """The module of entry ``name``.

    Args:
        name: a key of :data:`ENTRIES`.
    """
    if name not in ENTRIES:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(ENTRIES)}")
    return importlib.import_module(ENTRIES[name])


__all__ = ["ENTRIES", "Context", "Figure", "Result", "entry"]
