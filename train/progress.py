"""Progress bars of the evaluations (and other long loops of the trainers), in one place.

Every evaluation (``distillkit eval METHOD``) reads its shards, extracts frozen features and trains a
probe: minutes on a CPU, which without output look like a hang. The bars go to stderr (stdout keeps
the result table, so ``eval ... > result.txt`` stays clean), vanish when their loop ends, and are
shown only when stderr is a terminal: logs, CI output and tests get no carriage-return clutter.
``DISTILLKIT_PROGRESS=1`` forces them on (e.g. under ``script``), ``=0`` off. While a bar is shown,
log records go above it (``tqdm.write``) instead of through it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")
ENV = "DISTILLKIT_PROGRESS"


def progress_enabled() -> bool:
    """Whether bars are shown: ``DISTILLKIT_PROGRESS`` (``1``/``0``) if set, else whether stderr is a terminal."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None, unit: str = "it",
             leave: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr over ``iterable`` (or a manual one when None), shown as ``progress_enabled`` says.

    Args:
        iterable: what to iterate; None for a bar advanced with ``update``.
        desc: what the loop does (``"slidr eval: features (distilled)"``).
        total: items expected; default ``len(iterable)`` when it has one.
        unit: what one item is (``"sample"``, ``"epoch"``).
        leave: keep the finished bar on screen (default: it disappears, the result is printed after it).
        **kwargs: passed to ``tqdm``.
    """
    return _Bar(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=not progress_enabled(), dynamic_ncols=True, **kwargs)


class _Bar(tqdm):
    """A tqdm bar that, while shown, sends the root logger's console output through ``tqdm.write`` (a warning
    logged inside the loop would otherwise be cut into the bar's line). Closing (the loop's end) restores it."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._redirect: Any = None
        super().__init__(*args, **kwargs)
        if not self.disable:
            self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
            self._redirect.__enter__()

    def close(self) -> None:
        super().close()
        redirect, self._redirect = getattr(self, "_redirect", None), None
        if redirect is not None:
            redirect.__exit__(None, None, None)


def shard_sample_count(shards: Sequence[Path | str] | Path | str) -> int | None:
    """Samples written in one or more shard directories, from their ``index.json`` (a bar's total);
    None when an index is missing or unreadable (the bar then counts without a total).

    Args:
        shards: shard directories.
    """
    from distillkit.pipelines.shards import load_index
    from distillkit.remote import location

    dirs = [shards] if isinstance(shards, (str, Path)) else list(shards)
    total = 0
    for d in dirs:
        try:
            written = load_index(location(d))["counts"]["written"]
        except (OSError, ValueError, KeyError, TypeError):  # FileNotFoundError is an OSError
            return None
        if not isinstance(written, int):
            return None
        total += written
    return total
