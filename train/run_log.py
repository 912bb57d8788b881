"""The record of a training run: ``OUT/log.jsonl`` (a first line ``{"step": 0, "config": ...}``
with the trainer's resolved configuration, then one JSON line per logging window) and its
picture ``OUT/curves.png`` (loss, learning rate, samples/s and data-wait fraction over steps).

Console logs scroll away; this file is what a researcher compares runs with. On ``--resume`` the
lines past the checkpoint's step (written by the interrupted run after its last checkpoint) are
dropped, because the resumed run trains those steps again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"


def append_entry(out: Path, entry: dict[str, Any]) -> None:
    """Append one window's metrics (must hold ``step``) to ``out/log.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG_NAME, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


def read_log(out: Path) -> list[dict[str, Any]]:
    """The entries of ``out/log.jsonl`` in order ([] when there is none); a torn last line is skipped."""
    path = out / LOG_NAME
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return entries


def truncate_after(out: Path, step: int) -> None:
    """Keep only entries with ``step <= step`` (atomically): the resumed run re-trains the rest."""
    path = out / LOG_NAME
    if not path.is_file():
        return
    kept = [e for e in read_log(out) if e.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))
    os.replace(tmp, path)


def plot_curves(out: Path) -> Path | None:
    """Draw ``out/curves.png`` from ``out/log.jsonl``: 4 panels over steps. None without entries."""
    entries = [e for e in read_log(out) if "loss" in e]  # the config line holds no metrics
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in entries]
    panels = [
        ("loss", "loss", None),
        ("lr", "learning rate", None),
        ("samples_per_s", "samples/s", None),
        ("data_wait_fraction", "data-wait fraction", (0, 1)),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title, ylim) in zip(axes, panels, strict=True):
        ax.plot(steps, [e.get(key, float("nan")) for e in entries], marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / CURVES_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
