"""The SLidR build (manifests/demo-slidr.toml) on an embedded dask LocalCluster with 1 and 2 workers,
against reading the build's raw input files (lidar ``.pcd.bin`` + JPEGs) in the same process: how much a
keyframe costs beyond getting its bytes. On ``--device cuda`` the torch superpixel backend is built too."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.suite.common import ROOT, Context, Figure, Result, best_of, medium_nuscenes

TITLE = "SLidR build (medium synthetic nuScenes, 1600 x 900 cameras)"


def build_once(ctx: Context, workers: int, out: Path, *extra: str) -> float:
    """Build the demo manifest on the medium data into ``out`` (emptied first); wall seconds.

    Args:
        ctx: the run context (``quick``: one scene instead of four).
        workers: LocalCluster worker processes.
        out: shard directory.
        extra: more ``key=value`` manifest overrides.
    """
    from distillkit.pipelines.catalog import load_manifest
    from distillkit.pipelines.runner import build

    data = medium_nuscenes(ctx)
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"source.dataroot={data}", f"output.dir={out}", "output.samples_per_shard=2",
            f"cluster.workers={workers}", *extra]
    if ctx.quick:
        sets.append('source.scenes=["scene-0061"]')
    m = load_manifest(ROOT / "manifests" / "demo-slidr.toml", sets)
    t = time.perf_counter()
    build(m, workers=workers, progress=False)
    return time.perf_counter() - t


def run(ctx: Context) -> Result:
    from distillkit.pipelines.shards import load_index
    from distillkit.sensors.nuscenes_reader import load_nuscenes, plan_keyframes

    data = medium_nuscenes(ctx)
    refs, _ = plan_keyframes(load_nuscenes(data, "v1.0-mini"), ["scene-0061"] if ctx.quick else None)
    files = [Path(r.lidar_path) for r in refs] + [Path(c.path) for r in refs for c in r.cameras]
    raw_s = best_of(lambda: [p.read_bytes() for p in files])
    n = len(refs)
    res = Result(TITLE, extra={"keyframes": n})
    backends = [("skimage", "cpu")] + ([("torch", "cuda")] if ctx.device == "cuda" else [])
    for backend, device in backends:
        for workers in (1, 2):
            tag = "" if backend == "skimage" else f"{backend}-"
            out = ctx.scratch(f"suite-shards-{tag}w{workers}")
            s = build_once(ctx, workers, out, f"stages.superpixels.backend={backend}",
                           f"stages.superpixels.device={device}")
            written = load_index(out)["counts"]["written"]
            assert written == n, f"built {written} of {n} keyframes"
            res.figures.append(Figure(f"build, {backend} superpixels, {workers} dask worker(s), {n} keyframes",
                                      n / s, "keyframes/s", "reading the raw input files", n / raw_s,
                                      higher_is_better=True))
            res.extra[f"{backend}_w{workers}_s_per_keyframe"] = s / n
    res.notes.append("The ratio is far below 1 by design: it says how many times a keyframe's build costs "
                     "more than reading its inputs; the skimage figures are SLIC-bound (see superpixels).")
    return res
