"""SLidR trainer throughput on one device: the streaming loader vs a single pre-loaded batch.

    python bench/gpu_slidr.py --shards DIR [--device cuda] [--steps 50] [--size paper] [--workers 8]

Reports samples/s, the fraction of step time spent waiting for data and peak GPU memory for
(a) the real ShardStream + DataLoader decoding JPEGs on the CPU, (a') the same loader passing
JPEG bytes that nvJPEG decodes on the GPU (``torchvision.io.decode_jpeg(device="cuda")``, when
torchvision is importable and the device is CUDA) and (b) the same step repeated on one
pre-loaded batch (the compute-bound ceiling).
``--device cpu --steps 2`` is a smoke check.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import webdataset as wds

from train.slidr import SIZES, build_method, make_stream
from train.slidr_aug import slidr_collate
from train.streaming import make_loader, shard_files, to_device


def gpu_jpeg_decode_available(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: use the CPU path
        return False
    return True


def gpu_decode_throughput(shards: Path, device: str, n: int = 60) -> float | None:
    """Images/s of nvJPEG decode on raw JPEG bytes from the shards (None when unavailable)."""
    if not gpu_jpeg_decode_available(device):
        return None
    from torchvision.io import decode_jpeg

    raws = []
    ds = wds.WebDataset(shard_files(shards), shardshuffle=False, empty_check=False)  # raw bytes, no decoding
    for s in ds:
        raws += [
            torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in s.items() if k.endswith(".jpg")
        ]
        if len(raws) >= n:
            break
    torch.cuda.synchronize()
    t = time.perf_counter()
    decode_jpeg(raws, device=device)
    torch.cuda.synchronize()
    return len(raws) / (time.perf_counter() - t)


def run(method: torch.nn.Module, batches, steps: int, device: str) -> dict:
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    it = iter(batches)
    wait = total = 0.0
    n = 0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):  # step 0 is warm-up, not timed
        t0 = time.perf_counter()
        b = to_device(next(it), device)
        t1 = time.perf_counter()
        with amp:
            loss = method.loss(b)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
        float(loss.detach())  # sync so the step time is honest
        t2 = time.perf_counter()
        if step:
            wait, total, n = wait + t1 - t0, total + t2 - t0, n + len(b["keys"])
    out = {"samples_per_s": n / total, "data_wait_fraction": wait / total}
    if device.startswith("cuda"):
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", default="paper", choices=sorted(SIZES))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    method = build_method(args.size, 0).to(args.device).train()
    result = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "size": args.size,
        "batch_size": args.batch_size,
        "workers": args.workers,
    }
    modes = {"loader": False}  # JPEG decode + crop in the DataLoader workers (CPU)
    if gpu_jpeg_decode_available(args.device):
        modes["loader_nvjpeg"] = True  # workers pass JPEG bytes; nvJPEG decodes on the GPU
    for name, deferred in modes.items():
        stream = make_stream(args.shards, args.size, seed=0, strict=False, decode_on_device=deferred)
        loader = make_loader(
            stream,
            args.batch_size,
            slidr_collate,
            num_workers=args.workers,
            device=args.device,
            timeout=600 if args.workers else 0,
        )
        result[name] = run(method, loader, args.steps, args.device)
    stream = make_stream(args.shards, args.size, seed=0, strict=False)
    one = next(iter(make_loader(stream, args.batch_size, slidr_collate, device=args.device)))
    one = to_device(one, args.device)

    def repeat():
        while True:
            yield one

    result["preloaded"] = run(method, repeat(), args.steps, args.device)
    result["gpu_jpeg_decode_images_per_s"] = gpu_decode_throughput(args.shards, args.device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
