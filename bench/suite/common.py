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


def recorded_shards(out: Path, shards: int, per_shard: int, make: Callable[[int], dict[str, bytes]]) -> Path:
    """A shard folder written like a build's, from synthetic samples: ``shards`` tars of ``per_shard`` samples
    (``make(n)`` gives sample ``n``'s fields, written by ``shards.write_shard``) and the ``index.json`` that
    ``shards.index_for_tars`` makes of them (each shard's sha256 and bytes, as the trainers' stream checks them).

    Written afresh on every call (seconds; the entries' figures do not include it): a folder left by an earlier run
    may hold other samples, other tars or an index that no longer passes ``load_index``, and a benchmark must not
    measure those.

    Args:
        out: the folder (its ``synth-*.tar`` and ``index.json`` are replaced).
        shards: how many tars.
        per_shard: samples per tar.
        make: fields (name -> bytes) of sample ``n``.
    """
    from distillkit.pipelines.shards import index_for_tars, write_json_atomic, write_shard

    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("synth-*.tar"), out / "index.json"]:
        old.unlink(missing_ok=True)
    names = [f"synth-{s:06d}.tar" for s in range(shards)]
    for s, name in enumerate(names):
        write_shard(out / name, ((f"s{n:07d}", make(n)) for n in range(s * per_shard, (s + 1) * per_shard)))
    write_json_atomic(out / "index.json", index_for_tars(out, "synthetic", names))
    return out


def synthetic_jpeg(height: int, width: int, seed: int) -> bytes:
    """A JPEG of a smooth picture with texture (quality 90), about 0.2 bytes per pixel (290 KB at 1600 x 900, within
    the 200-400 KB of a camera frame of that size at that quality), so that reading, hashing and decoding cost
    what real frames cost.

    Args:
        height: rows.
        width: columns.
        seed: the texture's seed.
    """
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200, y / height * 200, (x + y) / (width + height) * 255], axis=-1)
    noisy = np.clip(base + rng.normal(0, 6, size=base.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()
