"""SLidR trainer throughput: the streaming loader (JPEGs decoded by the CPU workers, or by nvJPEG on the GPU)
against one pre-loaded batch repeated (the step's compute ceiling), and that step against the frozen image
teacher's forward alone (what the paper's step cannot beat: about 130 samples/s on an H100) and against the
sparse point network's forward + backward alone (what tells whether the pure-torch sparse convolution holds
the step back).

Every mode runs the trainer's own code (``train.slidr.train_main`` / ``train.loop.train_loop`` with the size's
optimiser, precision and schedule) for ``steps`` timed steps after one untimed warm-up step, without checkpoint
writes (they would let the loader refill between timed steps). ``--device cuda`` runs the paper's networks;
``--device cpu`` the small ones (a paper step takes minutes on a CPU core).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.suite.common import Context, Figure, Result

TITLE = "SLidR trainer: loader, nvJPEG loader and pre-loaded step; step vs teacher and point network alone"


def measure(shards: Path, device: str, size: str, steps: int, batch_size: int, workers: int) -> dict[str, Any]:
    """Samples/s, data-wait fraction and peak GPU memory of each mode, plus the parts alone.

    Args:
        shards: SLidR shard directory.
        device: ``"cpu"`` or ``"cuda"``.
        size: trainer size (``"paper"``, ``"small"``).
        steps: timed steps per mode.
        batch_size: samples per step.
        workers: DataLoader workers of the loader modes.
    """
    import torch

    from distillkit.train.image_decode import nvjpeg_available
    from distillkit.train.loop import train_loop
    from distillkit.train.slidr import batch_samples, build_method, loop_config, make_stream, train_main
    from distillkit.train.slidr_aug import slidr_collate
    from distillkit.train.streaming import make_loader, to_device

    logging.getLogger("distillkit").setLevel(logging.WARNING)
    cuda = device.startswith("cuda")
    out: dict[str, Any] = {"size": size, "batch_size": batch_size, "workers": workers, "steps": steps}
    modes = {"loader": False} | ({"loader_nvjpeg": True} if cuda and nvjpeg_available() else {})
    _peak(device)
    for name, on_device in modes.items():
        m = train_main(shards, None, device=device, max_steps=steps + 1, size=size, batch_size=batch_size,
                       num_workers=workers, log_every=0, decode_on_device=on_device, split="all",
                       random_teacher=True)  # throughput does not depend on the teacher's weights
        out[name] = _summary(m, device)

    stream = make_stream(shards, size, seed=0, strict=False)
    one = to_device(next(iter(make_loader(stream, batch_size, slidr_collate, device=device))), device)

    def repeat() -> Iterator[dict[str, Any]]:
        while True:
            yield one

    cfg = loop_config(size, steps + 1, device, out=None, log_every=0)
    method = build_method(size, 0).to(device)
    out["preloaded"] = _summary(train_loop(method, repeat, cfg, batch_size=batch_samples), device)

    n = batch_samples(one)
    bf16 = bool(cfg.bf16 and cuda)
    images = one["images"] if "images" in one else None
    if images is not None:
        def teacher() -> None:
            with torch.no_grad(), torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
                method.teacher(images)

        out["teacher_forward_samples_per_s"] = n / _timed(teacher, steps, device)

    def point_net() -> None:
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
            f3 = method.point_net(one["coords"], one["feats"])
        f3.float().square().mean().backward()

    out["point_net_fwd_bwd_samples_per_s"] = n / _timed(point_net, steps, device)
    out["nvjpeg_images_per_s"] = _nvjpeg_rate(shards, device)
    out.update(_peak(device))
    return out


def _timed(fn: Callable[[], None], steps: int, device: str) -> float:
    """Mean seconds of ``fn`` over ``steps`` calls after one warm-up call."""
    import torch

    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def _peak(device: str) -> dict[str, float]:
    import torch

    if not device.startswith("cuda"):
        return {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return {"peak_gpu_mem_gib": round(peak, 2)}


def _summary(metrics: dict[str, Any], device: str) -> dict[str, Any]:
    keep = ("samples_per_s", "data_wait_fraction", "timed_steps", "loss")
    return {k: metrics[k] for k in keep} | _peak(device)


def _nvjpeg_rate(shards: Path, device: str, n: int = 60) -> float | None:
    """Images/s of one batched nvJPEG decode of ``n`` JPEGs from the shards (None off CUDA)."""
    import torch
    import webdataset as wds

    from distillkit.train.image_decode import nvjpeg_available
    from distillkit.train.streaming import shard_files

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


def run(ctx: Context) -> Result:
    from bench.suite.streaming import shards

    cuda = ctx.device == "cuda"
    size = "paper" if cuda else "small"
    steps = (10 if ctx.quick else 30) if cuda else (1 if ctx.quick else 3)
    workers = 8 if cuda else 1
    r = measure(shards(ctx), ctx.device, size, steps, batch_size=4 if cuda else 2, workers=workers)
    res = Result(TITLE, extra=r)
    ceiling = r["preloaded"]["samples_per_s"]
    for mode, what in (("loader", "JPEGs decoded by the loader's CPU workers"),
                       ("loader_nvjpeg", "JPEG bytes decoded by nvJPEG on the GPU")):
        if mode in r:
            res.figures.append(Figure(f"{size} step, streaming loader ({what}, {workers} workers)",
                                      r[mode]["samples_per_s"], "samples/s", "pre-loaded batch", ceiling,
                                      higher_is_better=True))
    if "teacher_forward_samples_per_s" in r:
        res.figures.append(Figure(f"{size} step on a pre-loaded batch", ceiling, "samples/s",
                                  "frozen image teacher's forward alone", r["teacher_forward_samples_per_s"],
                                  higher_is_better=True))
    res.figures.append(Figure(f"{size} step on a pre-loaded batch", ceiling, "samples/s",
                              "sparse point network forward + backward alone", r["point_net_fwd_bwd_samples_per_s"],
                              higher_is_better=True))
    waits = ", ".join(f"{k} {r[k]['data_wait_fraction']:.0%}" for k in ("loader", "loader_nvjpeg", "preloaded")
                      if k in r)
    res.notes.append(f"Data-wait fraction of step time: {waits}.")
    mems = ", ".join(f"{k} {r[k]['peak_gpu_mem_gib']} GiB" for k in ("loader", "loader_nvjpeg", "preloaded")
                     if k in r and "peak_gpu_mem_gib" in r[k])
    if mems:
        res.notes.append(f"Peak GPU memory: {mems}.")
    if r.get("nvjpeg_images_per_s"):
        res.notes.append(f"nvJPEG batched decode alone: {r['nvjpeg_images_per_s']:.0f} images/s.")
    res.notes.append("A ratio near 1 against a part alone means that part bounds the step; spconv's CUDA wheels "
                     "are worth measuring as a GPU path only if the point network is the bound.")
    return res
