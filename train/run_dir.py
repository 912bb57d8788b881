"""Run folders: where ``distillkit train`` writes a run, so that one run never lands on another.

Without ``--out`` every run gets a folder of its own, ``runs/<method>/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ...
appended when another run of the method started in the same second). A folder *holds a run* when it has
``latest.pt`` or ``log.jsonl``; ``train --out`` refuses such a folder unless ``--resume`` (continue it) or
``--overwrite`` (``clear_run``: remove the old run's files first, so its log lines never mix with the new
run's). ``--resume`` without ``--out`` continues the newest run of the method (``newest_run``).
Decisions and their reasons: docs/training.md, "Run folders".
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from distillkit.train.checkpoint import CHECKPOINT_NAME
from distillkit.train.run_log import CURVES_NAME, LOG_NAME

RUNS_ROOT = Path("runs")
RUN_MARKERS = (CHECKPOINT_NAME, LOG_NAME)
"""Files whose presence means a folder holds a run."""
_STAMP = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?$")


def holds_run(out: Path) -> list[str]:
    """The run files (``latest.pt``, ``log.jsonl``) present in ``out``; empty when it holds no run.

    Args:
        out: a run folder, which need not exist.
    """
    return [name for name in RUN_MARKERS if (out / name).is_file()]


def new_run_dir(method: str, root: Path = RUNS_ROOT, now: float | None = None) -> Path:
    """Create and return a fresh run folder ``root/method/YYYYmmdd-HHMMSS[-N]``.

    Unique even when several runs start in the same second, on one machine or several sharing ``root``:
    each candidate is created with an exclusive ``mkdir``, which exactly one process wins.

    Args:
        method: the trainer's name (``slidr``).
        root: the folder of all runs (``runs`` in the working directory).
        now: the start time (seconds since the epoch; default: now), local time in the name.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    parent = root / method
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def newest_run(method: str, root: Path = RUNS_ROOT) -> Path | None:
    """The newest folder ``root/method/<YYYYmmdd-HHMMSS[-N]>`` that holds a run, or None.

    Ordered by the name (start time, then the same-second counter), not by modification time, which a
    copy or a later ``eval`` next to the run would change.

    Args:
        method: the trainer's name.
        root: the folder of all runs.
    """
    parent = root / method
    if not parent.is_dir():
        return None
    runs = []
    for d in parent.iterdir():
        m = _STAMP.match(d.name)
        if m and d.is_dir() and holds_run(d):
            runs.append((m.group(1), int(m.group(2) or 1), d))
    return max(runs)[2] if runs else None


def clear_run(out: Path) -> list[str]:
    """Remove the files of the run in ``out`` (``latest.pt``, ``log.jsonl``, ``curves.png`` and the temporary
    files of an interrupted write); other files in ``out`` are left alone. Returns the names removed.

    Args:
        out: the run folder.
    """
    removed = []
    names = (CHECKPOINT_NAME, LOG_NAME, CURVES_NAME)
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        # save_checkpoint and truncate_after write ".NAME.tmpPID" and rename it: a kill leaves one behind
        temporary = any(path.name.startswith(f".{n}.tmp") for n in names)
        if path.is_file() and (path.name in names or temporary):
            path.unlink()
            removed.append(path.name)
    return removed
