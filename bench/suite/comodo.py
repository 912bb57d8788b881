"""The COMODO build (manifests/comodo-ego4d.toml: 5 s windows at 200 Hz, 8 frames at 224 px) against a serial
script doing what COMODO's released preparation does (``bench/bench_comodo.py``'s ``published_style``: decode the
whole video at 10 fps, crop and resize every kept frame, resample the whole IMU recording, pair windows by index),
on the same synthetic Ego4D-style recordings in this process. On ``--device cuda`` the build also embeds every
window with the TimeSformer teacher on a GPU worker."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.suite.common import Context, Figure, Result

TITLE = "COMODO build (synthetic Ego4D-style recordings, 320 x 240 H.264 + 200 Hz IMU)"


def _build(data: Path, out: Path, *sets: str) -> tuple[int, float]:
    from distillkit.pipelines.catalog import load_manifest
    from distillkit.pipelines.runner import build

    shutil.rmtree(out, ignore_errors=True)
    m = load_manifest("comodo-ego4d", [f"source.root={data}", f"output.dir={out}", *sets])
    t = time.perf_counter()
    result = build(m, progress=False)
    return result.written, time.perf_counter() - t


def run(ctx: Context) -> Result:
    from bench.bench_comodo import published_style
    from distillkit.sensors.synth.ego import make_ego

    size = "small" if ctx.quick else "medium"
    data = ctx.scratch(f"ego-{size}")
    if not (data / "synth_truth.json").is_file():
        make_ego(data, seed=0, size=size)
    t = time.perf_counter()
    pairs = published_style(data)
    ref = pairs / (time.perf_counter() - t)
    res = Result(TITLE, extra={"published_pairs": pairs})
    runs = [("in-process, no clock-offset estimation (the script has none)",
             ("cluster.scheduler=serial", "stages.offset.mode=zero")),
            ("LocalCluster 2 workers, offsets estimated", ("cluster.workers=2",))]
    if ctx.device == "cuda":
        runs.append(("LocalCluster 2 workers + GPU worker, TimeSformer teacher embeddings (random init)",
                     ("cluster.workers=2", "stages.teacher.enabled=true", "stages.teacher.arch=timesformer")))
    for i, (what, sets) in enumerate(runs):
        n, s = _build(data, ctx.scratch(f"suite-comodo-{i}"), *sets)
        res.figures.append(Figure(f"build, {what}, {n} windows", n / s, "windows/s",
                                  f"published-style script, {pairs} pairs", ref, higher_is_better=True))
        res.extra[f"run{i}_windows"] = n
    res.notes.append("The script pairs windows by index and never looks at the clocks; the build finds each "
                     "window's frames by presentation time and (second run) estimates each recording's offset.")
    return res
