"""SLidR trainer throughput on one device: the streaming loader vs a single pre-loaded batch.

    python bench/gpu_slidr.py --shards DIR [--device cuda] [--steps 50] [--size paper] [--workers 8]

Every mode runs the trainer's own code (``train.slidr.train_main`` / ``train.loop.train_loop``
with the size's optimiser and schedule) for ``--steps`` timed steps after one warm-up step, and
reports samples/s, the fraction of step time spent waiting for data and peak GPU memory:

- ``loader``: ShardStream + DataLoader workers decode and crop the JPEGs on the CPU;
- ``loader_nvjpeg``: the workers pass JPEG bytes and nvJPEG decodes them on the GPU
  (only on CUDA with torchvision importable);
- ``preloaded``: the same step repeated on one batch already on the device: the compute-bound
  ceiling the loader modes are measured against.

It also reports nvJPEG's raw decode rate on the shards' JPEGs. ``--device cpu --steps 1`` is a
smoke check (tests/test_gpu.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from distillkit.train.image_decode import nvjpeg_available
from distillkit.train.loop import train_loop
from distillkit.train.slidr import SIZES, batch_samples, build_method, loop_config, make_stream, train_main
from distillkit.train.slidr_aug import slidr_collate
from distillkit.train.streaming import make_loader, shard_files, to_device


def nvjpeg_throughput(shards: Path, device: str, n: int = 60) -> float | None:
    """Images/s of one batched nvJPEG decode of ``n`` JPEGs from the shards (None off CUDA)."""
    if not (device.startswith("cuda") and nvjpeg_available()):
        return None
    from torchvision.io import decode_jpeg

    raws: list[torch.Tensor] = []
    for s in wds.WebDataset(shard_files(shards), shardshuffle=False, empty_check=False):  # raw bytes
        raws += [torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in s.items() if k.endswith(".jpg")]
        if len(raws) >= n:
            break
    decode_jpeg(raws[:6], device=device)  # warm-up: nvJPEG handle and buffers
    torch.cuda.synchronize()
    t = time.perf_counter()
    decode_jpeg(raws, device=device)
    torch.cuda.synchronize()
    return len(raws) / (time.perf_counter() - t)


def peak_memory(device: str) -> dict[str, float]:
    if not device.startswith("cuda"):
        return {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return {"peak_gpu_mem_gib": round(peak, 2)}


def summary(metrics: dict[str, Any], device: str) -> dict[str, Any]:
    keep = ("samples_per_s", "data_wait_fraction", "timed_steps", "loss")
    return {k: metrics[k] for k in keep} | peak_memory(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", default="paper", choices=sorted(SIZES))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", type=Path, help="write the JSON result here too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result: dict[str, Any] = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "size": args.size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "steps": args.steps,
    }
    modes = {"loader": False}
    if args.device.startswith("cuda") and nvjpeg_available():
        modes["loader_nvjpeg"] = True
    peak_memory(args.device)
    for name, on_device in modes.items():
        m = train_main(
            args.shards,
            None,  # no checkpoints: their writes would let the workers refill between timed steps
            device=args.device,
            max_steps=args.steps + 1,  # + the untimed first step
            size=args.size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            log_every=0,
            decode_on_device=on_device,
            split="all",
            random_teacher=True,  # throughput does not depend on the teacher's weights
        )
        result[name] = summary(m, args.device)

    stream = make_stream(args.shards, args.size, seed=0, strict=False)
    one = to_device(next(iter(make_loader(stream, args.batch_size, slidr_collate, device=args.device))),
                    args.device)

    def repeat() -> Iterator[dict[str, Any]]:
        while True:
            yield one

    cfg = loop_config(args.size, args.steps + 1, args.device, out=None, log_every=0)
    m = train_loop(build_method(args.size, 0), repeat, cfg, batch_size=batch_samples)
    result["preloaded"] = summary(m, args.device)
    result["nvjpeg_images_per_s"] = nvjpeg_throughput(args.shards, args.device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
