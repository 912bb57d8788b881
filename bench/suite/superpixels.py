"""SLIC superpixels: scikit-image (the reference, one CPU core) against the torch path (batched, on the
run's device), images/s at 1600 x 900, with SLidR's parameters, on the synthetic nuScenes cameras; and the
quality of both against the cameras' ground-truth class maps (boundary recall at 2 px, ASA, counts)."""

from __future__ import annotations

import time

import numpy as np

from bench.suite.common import Context, Figure, Result, best_of, medium_nuscenes

TITLE = "Superpixels (SLIC, 1600 x 900, SLidR parameters)"


def _inputs(ctx: Context, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first ``n`` cameras of scene-0061's first keyframe: the dataset's JPEGs, decoded, and their class
    maps (re-rendered from the scene, cached under bench/out)."""
    from distillkit.sensors.images import decode_rgb
    from distillkit.sensors.nuscenes_reader import load_nuscenes, plan_keyframes
    from tests.test_superpixels_truth import render_camera

    data = medium_nuscenes(ctx)
    kf = plan_keyframes(load_nuscenes(data, "v1.0-mini"), ["scene-0061"])[0][0]
    images = [decode_rgb(open(c.path, "rb").read()) for c in kf.cameras[:n]]
    cache = ctx.out / "superpixel-truth-medium.npz"
    truths = dict(np.load(cache)) if cache.exists() else {}
    for i in range(n):
        if f"cam{i}" not in truths:
            truths[f"cam{i}"] = render_camera(0, "medium", 0, 0, i, jpeg=False)[1]
            np.savez_compressed(cache, **truths)
    return images, [truths[f"cam{i}"] for i in range(n)]


def run(ctx: Context) -> Result:
    import torch

    from distillkit.preprocess.slic_torch import slic_torch
    from distillkit.preprocess.slic_triton import triton_available
    from distillkit.preprocess.superpixel_metrics import achievable_segmentation_accuracy, boundary_recall
    from distillkit.preprocess.superpixels import SLIDR_SLIC, slic_superpixels_batch, torch_device

    n = 2 if ctx.quick else 6
    images, truths = _inputs(ctx, n)
    res = Result(TITLE)
    dev = torch_device(ctx.device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # one core against skimage's one core
    try:
        t = time.perf_counter()
        ref = slic_superpixels_batch(images, **SLIDR_SLIC)
        sk_s = (time.perf_counter() - t) / n
        batch = torch.from_numpy(np.stack(images)).to(dev)
        kw = dict(enforce_connectivity_=True, **SLIDR_SLIC)
        ours = [o for o in slic_torch(batch, **kw).cpu().numpy()]  # also the warm-up (Triton compiles here)
        variants = {"torch": None} if dev.type == "cpu" else {"torch + Triton kernel": True, "plain torch": False}
        for label, use_triton in variants.items():
            if use_triton and not triton_available():
                res.notes.append("Triton is not installed on this machine: only the plain torch path ran")
                continue

            def go(use_triton=use_triton):
                slic_torch(batch, use_triton=use_triton, **kw)
                if dev.type == "cuda":
                    torch.cuda.synchronize()

            s = best_of(go, 1 if dev.type == "cpu" else 3) / n
            res.figures.append(Figure(f"{label} on {dev.type}, batch of {n}", 1 / s, "images/s",
                                      "skimage slic, one core", 1 / sk_s, higher_is_better=True))
            res.extra[f"{label}_s_per_image"] = s
        if dev.type == "cuda":
            big = batch.repeat(4, 1, 1, 1)
            s = best_of(lambda: (slic_torch(big, **kw), torch.cuda.synchronize()), 3) / len(big)
            res.figures.append(Figure(f"torch on cuda, batch of {len(big)}", 1 / s, "images/s",
                                      "skimage slic, one core", 1 / sk_s, higher_is_better=True))
            res.extra["torch_cuda_batch24_s_per_image"] = s
            raw = best_of(lambda: (slic_torch(big, **{**kw, "enforce_connectivity_": False}),
                                   torch.cuda.synchronize()), 3) / len(big)
            res.notes.append(f"of which the connectivity pass: {(s - raw) * 1e3:.1f} ms per image "
                             f"(k-means rounds alone: {raw * 1e3:.1f} ms)")
            res.extra["torch_cuda_connectivity_s_per_image"] = s - raw
            res.extra["torch_cuda_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    finally:
        torch.set_num_threads(threads)
    res.extra["skimage_s_per_image"] = sk_s
    res.extra["torch_s_per_image"] = min(v for k, v in res.extra.items() if k.endswith("_s_per_image")
                                         and not k.startswith("skimage"))
    br = [(boundary_recall(o, t, 2), boundary_recall(r, t, 2)) for o, r, t in zip(ours, ref, truths, strict=True)]
    asa = [(achievable_segmentation_accuracy(o, t), achievable_segmentation_accuracy(r, t))
           for o, r, t in zip(ours, ref, truths, strict=True)]
    cnt = [(o.max() + 1, r.max() + 1) for o, r in zip(ours, ref, strict=True)]
    for name, pairs, unit in (("boundary recall (2 px) vs class maps", br, "fraction"),
                              ("achievable segmentation accuracy vs class maps", asa, "fraction"),
                              ("superpixels per image", cnt, "count")):
        a = np.array(pairs, dtype=float)
        res.figures.append(Figure(f"{name}, mean of {n} cameras", a[:, 0].mean(), unit, "skimage, same images",
                                  a[:, 1].mean(), higher_is_better=True,
                                  note=f"largest per-image difference {np.abs(a[:, 0] - a[:, 1]).max():.3f}"))
    return res
