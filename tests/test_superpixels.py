"""The torch SLIC (preprocess/slic_torch.py) against scikit-image's, on CPU.

Quality is compared on the same images: synthetic nuScenes cameras with their ground-truth class maps
(tests/test_superpixels_truth.py), and scikit-image's bundled photographs, which have no ground truth:
there each method is scored against a Felzenszwalb segmentation of the photograph (a fixed, independent
partition with many boundaries), and the two label maps are compared with each other.
Sizes: the "small" synthetic cameras (384 x 216) and the photographs at their shipped size (~512 px);
1600 x 900 (nuScenes) is the slow test. torch runs single-threaded here (see ``one_thread``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.segmentation import felzenszwalb, slic

from distillkit.preprocess.slic_torch import enforce_connectivity, slic_grid, slic_torch
from distillkit.preprocess.superpixel_metrics import (
    achievable_segmentation_accuracy,
    boundary_recall,
    disconnected_labels,
    is_contiguous,
)
from distillkit.preprocess.superpixels import SLIDR_SLIC, slic_superpixels, slic_superpixels_batch

from .test_superpixels_truth import render_camera


@pytest.fixture(autouse=True)
def one_thread():
    """torch's intra-op threads spin against each other on a loaded 2-core machine (15x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quality(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    return boundary_recall(labels, truth, 2), achievable_segmentation_accuracy(labels, truth)


def _check_valid(labels: np.ndarray, shape: tuple[int, int]) -> None:
    assert labels.shape == shape and labels.dtype == np.int32
    assert is_contiguous(labels)
    assert disconnected_labels(labels) == 0


def _compare(images: list[np.ndarray], truths: list[np.ndarray], **params) -> dict[str, np.ndarray]:
    ref = slic_superpixels_batch(images, backend="skimage", **params)
    ours = slic_superpixels_batch(images, backend="torch", device="cpu", **params)
    q_ref = np.array([_quality(r, t) for r, t in zip(ref, truths, strict=True)])
    q_ours = np.array([_quality(o, t) for o, t in zip(ours, truths, strict=True)])
    for o, im in zip(ours, images, strict=True):
        _check_valid(o, im.shape[:2])
    n_ref = np.array([r.max() + 1 for r in ref])
    n_ours = np.array([o.max() + 1 for o in ours])
    return {"ref": q_ref, "ours": q_ours, "n_ref": n_ref, "n_ours": n_ours}


def _assert_close(res: dict[str, np.ndarray]) -> None:
    mean_diff = np.abs(res["ours"].mean(0) - res["ref"].mean(0))
    assert (mean_diff <= 0.02).all(), (res["ref"], res["ours"])  # boundary recall, ASA
    assert (np.abs(res["ours"] - res["ref"]) <= 0.04).all(), (res["ref"], res["ours"])  # and image by image
    assert (np.abs(res["n_ours"] / res["n_ref"] - 1) <= 0.10).all(), (res["n_ref"], res["n_ours"])


def test_quality_matches_skimage_on_synthetic_cameras(synth_nuscenes):
    from distillkit.sensors.images import decode_rgb
    from distillkit.sensors.nuscenes_reader import load_nuscenes, plan_keyframes

    # the dataset's own JPEGs; class maps re-rendered (aligned: tests/test_superpixels_truth.py)
    nusc = load_nuscenes(synth_nuscenes, "v1.0-mini")
    kf = plan_keyframes(nusc)[0][0]  # scene 0, keyframe 0
    cams = (0, 1, 3, 5)
    images = [decode_rgb(open(kf.cameras[c].path, "rb").read()) for c in cams]
    truths = [render_camera(0, "small", 0, 0, c, jpeg=False)[1] for c in cams]
    res = _compare(images, truths, **SLIDR_SLIC)
    _assert_close(res)
    assert res["ref"][:, 0].mean() > 0.5  # the metric sees something: SLIC finds most class boundaries


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_quality_matches_skimage_on_photographs(name):
    image = getattr(data, name)()
    truth = felzenszwalb(image, scale=300, sigma=0.8, min_size=200)
    res = _compare([image], [truth], **SLIDR_SLIC)
    _assert_close(res)
    # and the two partitions are nearly the same one: each explains the other's segments
    ref = slic_superpixels(image, **SLIDR_SLIC)
    ours = slic_superpixels(image, **SLIDR_SLIC, backend="torch", device="cpu")
    assert achievable_segmentation_accuracy(ours, ref) > 0.97
    assert boundary_recall(ours, ref, 2) > 0.95


@pytest.mark.parametrize("iters", [1, 10])
def test_assignment_is_skimages_before_connectivity(iters):
    """Same seeds, windows, distances and tie rule: the raw k-means labels (seed index per pixel) agree
    with skimage's pixel for pixel up to float32 rounding near ties."""
    image = data.astronaut()[::2, ::2].copy()
    kw = dict(n_segments=150, compactness=6.0, sigma=3.0, max_num_iter=iters)
    ref = slic(image, start_label=0, enforce_connectivity=False, **kw)
    ours = slic_torch(torch.from_numpy(image)[None], enforce_connectivity_=False, **kw)[0].numpy()
    assert (ref == ours).mean() > (0.9999 if iters == 1 else 0.998)


def test_rgb_features_and_no_smoothing_match_skimage():
    image = data.coffee()[::2, ::2].copy()
    kw = dict(n_segments=60, compactness=0.1, sigma=0.0, max_num_iter=5, convert2lab=False)
    ref = slic(image, start_label=0, enforce_connectivity=False, **kw)
    ours = slic_torch(torch.from_numpy(image)[None], enforce_connectivity_=False, **kw)[0].numpy()
    assert (ref == ours).mean() > 0.995


def test_connectivity_rule_matches_skimage_on_the_same_assignment():
    """Given skimage's own raw labels, our parallel connectivity pass and skimage's sequential one give
    segment maps of the same quality and count."""
    from skimage.segmentation._slic import _enforce_label_connectivity_cython

    image = data.rocket()
    truth = felzenszwalb(image, scale=300, sigma=0.8, min_size=200)
    raw = slic(image, n_segments=150, compactness=6, sigma=3, start_label=0, enforce_connectivity=False)
    g = slic_grid(*image.shape[:2], 150)
    seg = raw.size / g.n
    lo, hi = int(0.5 * seg), int(3 * seg)
    ref = _enforce_label_connectivity_cython(raw[None].astype(np.intp), lo, hi, start_label=0)[0]
    ours = enforce_connectivity(torch.from_numpy(raw)[None], lo, hi)[0].numpy()
    _check_valid(ours, raw.shape)
    assert abs(ours.max() - ref.max()) <= 0.05 * ref.max()
    assert np.abs(np.subtract(_quality(ours, truth), _quality(ref, truth))).max() <= 0.01
    assert np.bincount(ours.ravel()).min() >= lo


def test_max_size_cuts_large_components():
    labels = torch.zeros(1, 40, 60, dtype=torch.int64)
    labels[0, :, 30:] = 1
    out = enforce_connectivity(labels, 10, 300)[0].numpy()
    _check_valid(out, (40, 60))
    assert np.bincount(out.ravel()).max() <= 300 and out.max() + 1 >= 8


def test_batch_equals_single_and_runs_are_identical():
    rng = np.random.default_rng(0)
    images = [data.chelsea()[:120, :160].copy(), data.coffee()[:120, :160].copy(),
              rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)]
    batch = slic_superpixels_batch(images, 40, 6.0, 1.0, backend="torch", device="cpu")
    again = slic_superpixels_batch(images, 40, 6.0, 1.0, backend="torch", device="cpu")
    for i, im in enumerate(images):
        single = slic_superpixels(im, 40, 6.0, 1.0, backend="torch", device="cpu")
        np.testing.assert_array_equal(batch[i], single)
        np.testing.assert_array_equal(batch[i], again[i])
        _check_valid(batch[i], im.shape[:2])


@pytest.mark.parametrize("shape,n", [((5, 7), 3), ((6, 4), 100), ((1, 50), 5), ((64, 64), 1)])
def test_degenerate_sizes_and_uniform_images(shape, n):
    for image in (np.zeros((*shape, 3), np.uint8), np.full((*shape, 3), 77, np.uint8),
                  np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)):
        ref = slic_superpixels(image, n, 6.0, 0.0)
        ours = slic_superpixels(image, n, 6.0, 0.0, backend="torch", device="cpu")
        _check_valid(ours, shape)
        assert abs(int(ours.max()) - int(ref.max())) <= max(1, 0.1 * ref.max())


def test_bad_arguments_are_clear_errors():
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="backend"):
        slic_superpixels(image, backend="gpu")
    with pytest.raises(ValueError, match="device"):
        slic_superpixels(image, backend="torch", device="tpu")
    with pytest.raises(ValueError, match="uint8"):
        slic_superpixels(image.astype(np.float32), backend="torch")
    with pytest.raises(ValueError, match="compactness"):
        slic_superpixels(image, compactness=0.0, backend="torch", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            slic_superpixels(image, backend="torch", device="cuda")


def test_manifest_accepts_torch_backend_and_builds_valid_shards(synth_nuscenes, tmp_path):
    from distillkit.pipelines.inspect import verify
    from distillkit.pipelines.manifest import ManifestError
    from distillkit.pipelines.runner import build
    from distillkit.pipelines.shards import iter_samples, load_index
    from distillkit.sensors.images import decode_labels

    from .conftest import slidr_manifest

    with pytest.raises(ManifestError, match="backend"):
        slidr_manifest(synth_nuscenes, tmp_path / "x", "stages.superpixels.backend=gpu")
    with pytest.raises(ManifestError, match="device"):
        slidr_manifest(synth_nuscenes, tmp_path / "x", "stages.superpixels.device=tpu")
    m = slidr_manifest(synth_nuscenes, tmp_path / "shards", "stages.superpixels.backend=torch",
                       "stages.superpixels.device=cpu", "source.scenes=[\"scene-0061\"]", "output.shuffle=false")
    build(m, scheduler="serial", progress=False)
    index = load_index(tmp_path / "shards")
    assert index["counts"]["written"] == 3 and index["counts"]["rejected"] == 0
    assert verify(tmp_path / "shards").ok
    _, sample = next(iter_samples(tmp_path / "shards" / index["shards"][0]["file"]))
    labels = decode_labels(sample["cam0.sp.png"])
    _check_valid(labels.astype(np.int32), labels.shape)


@pytest.mark.slow
def test_quality_matches_skimage_at_nuscenes_resolution():
    """One synthetic camera rendered at 1600 x 900 (the "medium" size) with its class map."""
    image, truth = render_camera(0, "medium", 0, 0, 0)
    res = _compare([image], [truth], **SLIDR_SLIC)
    _assert_close(res)


def test_triton_host_side_combines_partial_sums_exactly():
    """The CUDA kernel returns per-block, per-candidate-slot partial sums (and a lane for pixels no window
    covered); the host turns them into seed sums. Emulate the kernel's output from labels on the CPU and
    check the host code gives exactly the direct per-label sums (the kernel itself needs a GPU)."""
    from distillkit.preprocess.slic_torch import _pixel_table, assign_torch, candidates, initial_seeds
    from distillkit.preprocess.slic_triton import combine_partial_sums

    b, h, w = 2, 50, 70
    grid = slic_grid(h, w, 20)
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-2**20, 2**20, (b, 3, h, w), dtype=torch.int32, generator=gen)
    seeds = initial_seeds(grid, b, torch.device("cpu"))
    labels = assign_torch(q.float() * 2.0**-8, seeds, grid, torch.zeros(b, h, w, dtype=torch.int32))
    cand = candidates(seeds, grid)
    exc = torch.rand(b, h, w, generator=gen) < 0.05  # pretend these were outside every window ...
    labels[exc] = torch.randint(0, grid.n, (int(exc.sum()),), dtype=torch.int32, generator=gen)  # ... kept
    lanes = 1 << cand.shape[-1].bit_length()
    yy, xx = torch.meshgrid(torch.arange(h) // grid.sy, torch.arange(w) // grid.sx, indexing="ij")
    cb = cand[torch.arange(b)[:, None, None], yy, xx]  # (b, h, w, C)
    hit = cb == labels[..., None].long()
    assert hit[~exc].any(-1).all()  # a label the assignment gave is always one of its block's candidates
    slot = torch.where(exc, lanes - 1, hit.int().argmax(-1))
    block = (torch.arange(b)[:, None, None] * grid.nby + yy) * grid.nbx + xx
    part = torch.zeros(b * grid.nby * grid.nbx * lanes, 6, dtype=torch.int64)
    part.index_add_(0, (block * lanes + slot).reshape(-1), _pixel_table(q))
    part = part.view(b, grid.nby, grid.nbx, lanes, 6)
    got = combine_partial_sums(part, cand, exc.to(torch.int8), labels, q, grid.n)
    gl = (labels.long() + (torch.arange(b) * grid.n).view(b, 1, 1)).reshape(-1)
    want = torch.zeros(b * grid.n, 6, dtype=torch.int64).index_add_(0, gl, _pixel_table(q)).view(b, grid.n, 6)
    assert torch.equal(got, want)
