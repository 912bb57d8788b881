"""CPU cost per sample of the SLidR training loader, and what it implies for feeding a GPU (not a test).

    .venv/bin/python bench/loader_slidr.py [--shards bench/out/shards-w2] [--size paper] [--epochs 3]

One process, no DataLoader: the time each loader worker spends per sample, against reading
the same shards without decoding (webdataset iteration of raw bytes) and ``cat`` of the shards.
Modes: ``eager`` decodes the six JPEGs and crops on the CPU (the CPU path); ``deferred`` leaves
JPEG bytes for nvJPEG on the GPU (``decode_on_device``), so the worker only decodes superpixel
PNGs and arrays, augments and voxelises. ``cores_for_130_per_s`` is the number of worker cores
that would keep up with ~130 samples/s, what the issue says the paper's teacher absorbs on an H100.
Run ``bench/bench_slidr.py`` first: it builds the medium shards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import webdataset as wds  # noqa: E402

from distillkit.train.slidr import SIZES, make_stream  # noqa: E402
from distillkit.train.streaming import shard_files  # noqa: E402

TEACHER_SAMPLES_PER_S = 130


def per_sample_ms(make_iter, epochs: int) -> float:
    n, t = 0, time.perf_counter()
    for _ in range(epochs):
        for _ in make_iter():
            n += 1
    return 1e3 * (time.perf_counter() - t) / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, default=ROOT / "bench" / "out" / "shards-w2")
    ap.add_argument("--size", default="paper", choices=sorted(SIZES))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "loader_slidr.json")
    args = ap.parse_args()
    tars = shard_files(args.shards)
    res: dict[str, float | str] = {"size": args.size}
    t = time.perf_counter()
    for _ in range(args.epochs):
        subprocess.run(["cat", *tars], stdout=subprocess.DEVNULL, check=True)
    n_samples = sum(1 for _ in wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    res["cat_ms"] = 1e3 * (time.perf_counter() - t) / (args.epochs * n_samples)
    res["raw_read_ms"] = per_sample_ms(lambda: wds.WebDataset(tars, shardshuffle=False, empty_check=False),
                                       args.epochs)
    for mode, deferred in (("eager", False), ("deferred", True)):
        def samples(deferred=deferred):
            return make_stream(args.shards, args.size, seed=0, strict=True, epochs=1, decode_on_device=deferred)

        res[f"{mode}_ms"] = per_sample_ms(samples, args.epochs)
        res[f"{mode}_cores_for_{TEACHER_SAMPLES_PER_S}_per_s"] = res[f"{mode}_ms"] * TEACHER_SAMPLES_PER_S / 1e3
    res["samples"] = n_samples
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(f"| loader mode ({args.size}) | per sample, one core | reference: raw read / cat | ratio to raw read "
          f"| cores for {TEACHER_SAMPLES_PER_S} samples/s |\n|---|---|---|---|---|")
    for mode in ("eager", "deferred"):
        ms = res[f"{mode}_ms"]
        print(f"| {mode} | {ms:.1f} ms | {res['raw_read_ms']:.1f} ms / {res['cat_ms']:.1f} ms | "
              f"{ms / res['raw_read_ms']:.0f}x | {res[f'{mode}_cores_for_{TEACHER_SAMPLES_PER_S}_per_s']:.1f} |")


if __name__ == "__main__":
    main()
