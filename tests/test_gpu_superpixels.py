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
    from distillkit.preprocess.slic_triton import triton_available

    if not triton_available():
        pytest.skip("Triton is not installed")


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
        assert (a == b).float().mean().item() > (0.9999 if iters < 10 else 0.999)


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
    image, truth = render_camera(0, "medium", 0, 0, 0)
    batch = [image] * 6
    out = slic_superpixels_batch(batch, **SLIDR_SLIC, backend="torch", device="cuda")
    ref = slic_superpixels(image, **SLIDR_SLIC)
    for o in out:
        _check_valid(o, image.shape[:2])
        np.testing.assert_array_equal(o, out[0])
    _assert_close({"ref": np.array([_quality(ref, truth)]), "ours": np.array([_quality(out[0], truth)]),
                   "n_ref": np.array([ref.max() + 1]), "n_ours": np.array([out[0].max() + 1])})
