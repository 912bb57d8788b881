"""The torch SLIC on CUDA (skipped without a GPU): the CPU quality checks again on the device, CUDA
against the CPU torch path, the fused Triton kernel against the plain torch path on CUDA, and determinism.

NOT YET RUN: written for the device check (this machine has no GPU). Run with
``pytest -m gpu tests/test_gpu_superpixels.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.segmentation import felzenszwalb

from distillkit.preprocess.slic_torch import slic_torch
from distillkit.preprocess.superpixel_metrics import achievable_segmentation_accuracy, boundary_recall
from distillkit.preprocess.superpixels import SLIDR_SLIC, slic_superpixels, slic_superpixels_batch

from .test_superpixels import _assert_close, _check_valid, _quality
from .test_superpixels_truth import render_camera

pytestmark = pytest.mark.gpu


def _triton():
    """CUDA builds of torch ship Triton: on a GPU its absence is a failure, not a reason to skip (a skipped
    kernel test would look green while the kernel never ran)."""
    from distillkit.preprocess.slic_triton import triton_available

    assert triton_available(), "CUDA torch without an importable Triton: the fused kernel cannot be checked"


def _images() -> list[np.ndarray]:
    """Three photographs cropped to one size (300 x 450), for batches."""
    return [im[:300, :450] for im in (data.astronaut(), data.coffee(), data.chelsea())]


def test_cuda_quality_matches_skimage_on_synthetic_cameras_and_photographs():
    cams = [render_camera(0, "small", 0, 0, c) for c in (0, 1, 3, 5)]
    sets = [([im for im, _ in cams], [t for _, t in cams])]
    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    sets.append((photos, [felzenszwalb(p, scale=300, sigma=0.8, min_size=200) for p in photos]))
    for images, truths in sets:
        ref = slic_superpixels_batch(images, **SLIDR_SLIC)
        ours = slic_superpixels_batch(images, **SLIDR_SLIC, backend="torch", device="cuda")
        for o, im in zip(ours, images, strict=True):
            _check_valid(o, im.shape[:2])
        _assert_close({"ref": np.array([_quality(r, t) for r, t in zip(ref, truths, strict=True)]),
                       "ours": np.array([_quality(o, t) for o, t in zip(ours, truths, strict=True)]),
                       "n_ref": np.array([r.max() + 1 for r in ref]),
                       "n_ours": np.array([o.max() + 1 for o in ours])})


@pytest.mark.parametrize("use_triton", [False, True])
def test_cuda_agrees_with_cpu_torch_path(use_triton):
    if use_triton:
        _triton()
    image = torch.from_numpy(data.astronaut())[None]
    kw = dict(n_segments=150, compactness=6.0, sigma=3.0)
    raw_cpu = slic_torch(image, enforce_connectivity_=False, use_triton=False, **kw)[0].numpy()
    raw_gpu = slic_torch(image.cuda(), enforce_connectivity_=False, use_triton=use_triton, **kw)[0].cpu().numpy()
    # the same algorithm; only float rounding (FMA contraction, pow/cbrt ulps) differs between devices
    assert (raw_cpu == raw_gpu).mean() > 0.998
    cpu = slic_torch(image, use_triton=False, **kw)[0].numpy()
    gpu = slic_torch(image.cuda(), use_triton=use_triton, **kw)[0].cpu().numpy()
    assert achievable_segmentation_accuracy(gpu, cpu) > 0.99 and boundary_recall(gpu, cpu, 2) > 0.98


def test_triton_kernel_agrees_with_plain_torch_on_cuda():
    _triton()
    images = torch.from_numpy(np.stack(_images())).cuda()
    kw = dict(n_segments=150, compactness=6.0, sigma=3.0, enforce_connectivity_=False)
    for iters in (1, 2, 10):
        a = slic_torch(images, max_num_iter=iters, use_triton=True, **kw)
        b = slic_torch(images, max_num_iter=iters, use_triton=False, **kw)
        assert torch.equal(a, b), f"{iters} rounds: {(a != b).float().mean().item():.2e} of the pixels differ"


def test_triton_round_equals_torch_round_bit_for_bit():
    """One fused round against ``assign_torch`` + an integer ``index_add_``, round by round: labels and seed
    sums equal exactly (the launch disables FMA contraction), on odd image sizes with blocks over 1024 px,
    including a round where all but one seed are dead, so pixels no window covers keep their label."""
    import distillkit.preprocess.slic_torch as st
    from distillkit.preprocess.slic_triton import assign_and_sum

    _triton()
    torch.manual_seed(0)
    b, h, w = 2, 150 * 3 + 7, 211 * 3 + 1
    img = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, device="cuda")
    grid = st.slic_grid(h, w, 6)
    qb = st._quant_bits(6.0, True)
    q = torch.round(st.gaussian_blur(st.colour_features(img), 1.0) / 6.0 * 2.0**qb).to(torch.int32)
    feat = q.float() * 2.0**-qb
    table = st._pixel_table(q)
    seeds = st.initial_seeds(grid, b, img.device)
    lab_t = torch.zeros(b, h, w, dtype=torch.int32, device="cuda")
    lab_k = lab_t.clone()
    off = (torch.arange(b, device="cuda") * grid.n).view(b, 1, 1)
    uncovered = 0
    for it in range(5):
        if it == 2:
            alive = seeds.alive.clone()
            alive[:, 1:] = False
            seeds = st.Seeds(seeds.pos, seeds.col, alive)
            probe = st.assign_torch(feat, seeds, grid, torch.full_like(lab_t, -5))
            uncovered = int((probe == -5).sum())
        lab_t = st.assign_torch(feat, seeds, grid, lab_t)
        sums_t = torch.zeros(b * grid.n, 6, dtype=torch.int64, device="cuda").index_add_(
            0, (lab_t.long() + off).reshape(-1), table).view(b, grid.n, 6)
        lab_k, sums_k = assign_and_sum(q, qb, seeds, grid, lab_k.clone(), need_sums=True)
        assert torch.equal(lab_t, lab_k), f"round {it}: labels differ"
        assert torch.equal(sums_t, sums_k), f"round {it}: seed sums differ"
        seeds = st.seeds_from_sums(sums_t, qb)
    assert uncovered > 0, "the dead-seed round must leave pixels outside every window"


@pytest.mark.parametrize("use_triton", [False, True])
def test_cuda_runs_are_identical(use_triton):
    if use_triton:
        _triton()
    images = torch.from_numpy(np.stack(_images())).cuda()
    first = slic_torch(images, 150, 6.0, 10, 3.0, use_triton=use_triton)
    for _ in range(2):
        assert torch.equal(first, slic_torch(images, 150, 6.0, 10, 3.0, use_triton=use_triton))
    single = slic_torch(images[1:2], 150, 6.0, 10, 3.0, use_triton=use_triton)
    assert torch.equal(first[1:2], single)


def test_nuscenes_sized_batch_on_cuda():
    _triton()  # the batch the kernel is for: it must run here, not the plain torch fallback
    image, truth = render_camera(0, "medium", 0, 0, 0)
    batch = [image] * 6
    out = slic_superpixels_batch(batch, **SLIDR_SLIC, backend="torch", device="cuda")
    ref = slic_superpixels(image, **SLIDR_SLIC)
    for o in out:
        _check_valid(o, image.shape[:2])
        np.testing.assert_array_equal(o, out[0])
    _assert_close({"ref": np.array([_quality(ref, truth)]), "ours": np.array([_quality(out[0], truth)]),
                   "n_ref": np.array([ref.max() + 1]), "n_ours": np.array([out[0].max() + 1])})
