"""The record of a training run: ``OUT/log.jsonl`` (a first line ``{"step": 0, "config": ...}``
with the trainer's resolved configuration, then one JSON line per logging window) and its
picture ``OUT/curves.png`` (loss, learning rate, samples/s and data-wait fraction over steps, titled
with the method, its network size and the run folder, so a picture passed around still says what it shows).

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


def curves_title(out: Path, method: str | None = None, size: str | None = None) -> str:
    """The first title line of ``curves.png``: what was trained, at which size, and where the run lives.

    Args:
        out: the run folder, shown as the run was given it (so it matches what the researcher typed).
        method: the trained method (``distillkit train METHOD``); None: "training run".
        size: the network size (the trainer's ``size`` key); None leaves it out (trainers without one).
    """
    what = f"{method} training run" if method else "training run"
    if size:
        what += f", {size} network"
    return f"{what}, run folder {out}"


def curves_figure(out: Path, method: str | None = None, size: str | None = None,
                  max_steps: int | None = None) -> Any:
    """The picture of ``out/log.jsonl``: 4 panels over optimiser steps, titled (``curves_title``) and
    captioned; None without metric entries.

    Args:
        out: the run folder holding ``log.jsonl``.
        method: the method's name, for the title.
        size: the network size for the title; None: the ``size`` of the log's configuration line, if any.
        max_steps: the run's planned steps, for the caption (how far the curves got).
    """
    log = read_log(out)
    entries = [e for e in log if "loss" in e]  # the config line holds no metrics
    if not entries:
        return None
    if size is None:  # e.g. re-plotting an old run folder: its configuration line knows the size
        config = next((e["config"] for e in log if isinstance(e.get("config"), dict)), {})
        size = config.get("size") if isinstance(config.get("size"), str) else None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [e["step"] for e in entries]
    # (log key, panel title, y label, y limits): each title says what the curve is, in words a reader
    # who never saw the trainer's code follows; the y label carries the unit.
    panels = [
        ("loss", "training loss", "loss (method's objective)", None),
        ("lr", "learning rate (schedule)", "learning rate", None),
        ("samples_per_s", "throughput", "samples / s (all processes)", None),
        ("data_wait_fraction", "time spent waiting for data", "fraction of step time", (0, 1)),
    ]
    has_terms = any(e.get("terms") for e in entries)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3 if has_terms else 3.6))
    marker = "." if len(steps) < 30 else None
    for ax, (key, title, ylabel, ylim) in zip(axes, panels, strict=True):
        ax.plot(steps, [e.get(key, float("nan")) for e in entries], marker=marker,
                label="loss" if key == "loss" else None)
        if key == "loss":  # the method's own split of its loss (train.loop ``log_terms``), when it gives one
            names = list(dict.fromkeys(n for e in entries for n in (e.get("terms") or {})))
            for name in names:
                ax.plot(steps, [(e.get("terms") or {}).get(name, float("nan")) for e in entries], marker=marker,
                        linestyle="--", label=name)
            if names:  # below the panel: the legend must not hide the curves
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        # steps are whole (no 2.5 on a short run), and at most 6 ticks so 4-digit steps do not run together
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    # The first window always starts at step 0 (a resumed run keeps the earlier lines), so its end is the
    # logging window's length; a last, shorter window can follow at max_steps.
    window = steps[0]
    reached = f"{steps[-1]} of {max_steps} steps" if max_steps else f"{steps[-1]} steps"
    head = next((e for e in log if isinstance(e.get("config"), dict)), {})
    if head.get("global_batch"):  # the run's scale (train.loop.run_scale), so two runs' pictures compare honestly
        world = int(head.get("world_size", 1))
        reached += f" of {head['global_batch']} samples" + (f" ({world} processes x {head['rank_batch']})"
                                                             if world > 1 else "")
    fig.suptitle(f"{curves_title(out, method, size)}\n{reached}; each point summarises the {window} steps "
                 "before it (loss: their mean; learning rate: its value at that step)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(out: Path, method: str | None = None, size: str | None = None,
                max_steps: int | None = None) -> Path | None:
    """Draw ``out/curves.png`` from ``out/log.jsonl`` (``curves_figure``). None without entries.

    Args:
        out: the run folder holding ``log.jsonl``; the picture goes next to it.
        method: the method's name, for the title.
        size: the network size for the title; None: the ``size`` of the log's configuration line, if any.
        max_steps: the run's planned steps, for the caption.
    """
    fig = curves_figure(out, method, size, max_steps)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    path = out / CURVES_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
