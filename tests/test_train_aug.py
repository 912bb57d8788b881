"""SLidR augmentations: crop pair remapping, horizontal flip mapping, DropCuboids revert, collate."""

from __future__ import annotations

import numpy as np
import torch

from distillkit.train.slidr_aug import (
    crop_resize_image,
    crop_resize_labels,
    drop_cuboid,
    remap_pixels,
    resized_crop_params,
    slidr_collate,
    slidr_train_transform,
)


def test_crop_without_scaling_pair_pixel_is_exact():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    pix = np.column_stack([rng.integers(0, 90, 500), rng.integers(0, 160, 500)])
    i, j, h, w = 10, 30, 50, 90
    p, ok = remap_pixels(pix, i, j, h, w, (h, w))  # crop size == region size: pure translation
    out = crop_resize_image(img, i, j, h, w, (h, w))
    assert ok.sum() > 50
    src = pix[ok]
    torch.testing.assert_close(
        out[:, p[ok, 0], p[ok, 1]], torch.from_numpy(img[src[:, 0], src[:, 1]].T).float() / 255
    )
    inside = (pix[:, 0] >= i) & (pix[:, 0] < i + h) & (pix[:, 1] >= j) & (pix[:, 1] < j + w)
    assert (ok == inside).all()


def test_crop_with_scaling_lands_on_resized_pixel():
    rng = np.random.default_rng(1)
    h_img, w_img, crop = 180, 320, (56, 104)
    labels = np.arange(h_img * w_img, dtype=np.int64).reshape(h_img, w_img)  # a unique id per source pixel
    pix = np.column_stack([rng.integers(1, h_img - 1, 2000), rng.integers(1, w_img - 1, 2000)])
    for _ in range(20):
        i, j, h, w = resized_crop_params(h_img, w_img, rng)
        assert 14 / 9 - 0.05 < w / h < 17 / 9 + 0.05 and 0.29 * h_img * w_img < h * w <= h_img * w_img
        p, ok = remap_pixels(pix, i, j, h, w, crop)
        assert (p[ok] >= 0).all() and (p[ok, 0] < crop[0]).all() and (p[ok, 1] < crop[1]).all()
        res = crop_resize_labels(labels.astype(np.float32), i, j, h, w, crop).numpy()
        src = res[p[ok, 0], p[ok, 1]]
        src_rc = np.column_stack([src // w_img, src % w_img])
        err = np.abs(src_rc - pix[ok])
        assert (err[:, 0] <= 0.5 * h / crop[0] + 1).all() and (err[:, 1] <= 0.5 * w / crop[1] + 1).all()


def _coded_sample(rng, n=3000, hw=(120, 240)):
    """Images whose red/green channels encode row/col and blue the camera; pairs at random pixels."""
    h, w = hw
    xyz = rng.normal(0, 10, (n, 3)).astype(np.float32)
    sample = {
        "__key__": "s",
        "lidar.npy": np.column_stack([xyz, rng.uniform(0, 1, n)]).astype(np.float32),
        "cams.json": [{} for _ in range(6)],
    }
    pairs = []
    for c in range(6):
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        sample[f"cam{c}.jpg"] = np.stack([rows, cols, np.full_like(rows, 40 * c)], -1).astype(np.uint8)
        sample[f"cam{c}.sp.png"] = (rows // 20 * 12 + cols // 20).astype(np.uint8)
        m = 400
        pairs.append(
            np.column_stack(
                [
                    rng.choice(n, m, replace=False),
                    np.full(m, c),
                    rng.integers(1, h - 1, m),
                    rng.integers(1, w - 1, m),
                ]
            )
        )
    sample["pairs.npy"] = np.concatenate(pairs).astype(np.int32)
    return sample


def test_transform_pairs_follow_crop_and_flip():
    crop = (60, 120)
    flips = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        sample = _coded_sample(rng)
        ex = slidr_train_transform(sample, rng, crop=crop, min_pairs=100)
        assert ex["images"].shape == (6, 3, *crop) and ex["superpixels"].shape == (6, *crop)
        slot, r, c = ex["pairing_images"].unbind(1)
        vals = ex["images"][slot, :, r, c] * 255  # (P, 3): the source row/col/cam under each remapped pair
        cams = torch.round(vals[:, 2] / 40).long()
        # Recover the original pixel of each pair: voxel -> first point is ambiguous, so compare through
        # the coded image: the pixel under a pair must be a source pixel close to *some* pair of that camera.
        pairs = torch.from_numpy(sample["pairs.npy"]).long()
        for s in range(6):
            sel = slot == s
            cam = int(torch.mode(cams[sel]).values)
            assert (cams[sel] == cam).all()
            src = pairs[pairs[:, 1] == cam][:, 2:].float()
            d = torch.cdist(vals[sel, :2], src).min(1).values
            assert (d < 3.0).all(), float(d.max())
            # A flipped image has decreasing col values along a row.
            flips += int(ex["images"][s, 1, 0, 0] > ex["images"][s, 1, 0, -1])
    assert 0 < flips < 24


def test_dropcuboid_revert_and_reindex():
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-10, 10, (5000, 3)).astype(np.float32)
    pairs = np.column_stack([np.arange(5000), np.arange(5000) % 2, np.zeros(5000), np.zeros(5000)]).astype(
        np.int64
    )
    for seed in range(10):
        keep, new_pairs = drop_cuboid(xyz, pairs, np.random.default_rng(seed), 2, min_pairs=10_000)
        assert keep.all() and new_pairs is pairs  # every camera would fall below min_pairs: reverted
    dropped = 0
    for seed in range(10):
        keep, new_pairs = drop_cuboid(xyz, pairs, np.random.default_rng(seed), 2, min_pairs=0)
        dropped += int((~keep).sum())
        kept_xyz = xyz[keep]
        np.testing.assert_array_equal(kept_xyz[new_pairs[:, 0]], xyz[pairs[keep[pairs[:, 0]], 0]])
    assert dropped > 0


def test_collate_offsets():
    rng = np.random.default_rng(3)
    exs = [
        slidr_train_transform(_coded_sample(rng, n=500), rng, crop=(30, 60), min_pairs=10) for _ in range(2)
    ]
    b = slidr_collate(exs)
    v0 = len(exs[0]["coords"])
    assert b["coords"].shape[1] == 4 and (b["coords"][:v0, 0] == 0).all() and (b["coords"][v0:, 0] == 1).all()
    n0 = len(exs[0]["pairing_points"])
    assert torch.equal(b["pairing_points"][n0:], exs[1]["pairing_points"] + v0)
    assert torch.equal(b["pairing_images"][n0:, 0], exs[1]["pairing_images"][:, 0] + 6)
    assert b["images"].shape[0] == 12 and b["batch_n_pairings"].tolist() == [
        n0,
        len(exs[1]["pairing_points"]),
    ]
