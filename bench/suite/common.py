"""What every benchmark entry shares: the run context, the figure/result records, timing, test data."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out"


@dataclass
class Context:
    """What a run knows: the device the torch paths use, a scratch directory, ``quick`` (smaller inputs,
    for smoke runs) and the results of the entries that ran before in this process (by name)."""

    device: str = "cpu"
    out: Path = OUT
    quick: bool = False
    results: dict[str, Result] = field(default_factory=dict)

    def scratch(self, name: str) -> Path:
        """A directory under ``out`` for ``name``, separate for quick runs (their data is smaller)."""
        return self.out / (f"{name}-quick" if self.quick else name)


@dataclass
class Figure:
    """One measured figure beside its reference, both measured in the same process on the same inputs.

    ``ratio`` is always "how many times better ours is": reference time / our time for ``unit`` a time,
    our rate / reference rate for a rate (``higher_is_better``).
    """

    name: str
    value: float
    unit: str
    reference: str
    reference_value: float
    higher_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.value / self.reference_value if self.reference_value else float("nan")
        return self.reference_value / self.value if self.value else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Result:
    """An entry's figures, plus free-form numbers (``extra``) later entries or readers may use."""

    title: str
    figures: list[Figure] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "figures": [f.to_json() for f in self.figures], "extra": self.extra,
                "notes": self.notes}


def best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Least wall time (s) of ``repeat`` calls: on a shared machine the minimum is the least disturbed."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine() -> dict[str, Any]:
    """The machine a result was taken on (CPU count, load, torch/CUDA device)."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def medium_nuscenes(ctx: Context) -> Path:
    """Synthetic nuScenes at nuScenes resolution (``--size medium``: 4 scenes x 3 keyframes, six 1600 x 900
    cameras each), generated on first use (~2 min on one core) and reused; the same data as
    bench/bench_slidr.py."""
    path = ctx.out / "nuscenes-medium"
    if not (path / "v1.0-mini").is_dir():
        from distillkit.sensors.synth.nuscenes import make_nuscenes

        make_nuscenes(path, seed=0, size="medium")
    return path
