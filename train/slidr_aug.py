"""SLidR data augmentation and collate (reference/slidr.md §3), on decoded shard samples.

Training order: camera order shuffle, z-rotation U[0, 2pi), x/y flips (p=0.5 each), DropCuboids
(reverted if any camera would keep fewer than ``min_pairs`` pairs), per-image resized crop to
``crop`` (scale (0.3, 1), ratio (14/9, 17/9); pairs map as ``round((p - [i, j]) * [ch/h, cw/w])``,
out-of-crop pairs dropped; resampled until it keeps > ``min_pairs`` or > 75% of that camera's pairs),
per-image horizontal flip (``col -> cw - 1 - col``), then cylindrical voxelisation.
Images: the uint8 crop is converted to float in [0, 1] and resized bilinearly without antialias
(torchvision's tensor ``resized_crop`` as pinned by SLidR); superpixels are resized with nearest.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distillkit.train.models.sparse import cylindrical_voxelize

N_CAMS = 6


def slidr_required(n_cams: int = N_CAMS) -> list[str]:
    """Fields a slidr sample must have."""
    return ["lidar.npy", "cams.json", "pairs.npy"] + [
        f"cam{i}.{e}" for i in range(n_cams) for e in ("jpg", "sp.png")
    ]


def check_slidr(sample: dict[str, Any]) -> None:
    """Raise ValueError for a sample the trainer cannot use (shapes, index ranges, zero pairs)."""
    lidar, pairs = sample["lidar.npy"], sample["pairs.npy"]
    if lidar.ndim != 2 or lidar.shape[1] < 4:
        raise ValueError(f"lidar.npy has shape {lidar.shape}, expected (N, 4)")
    if pairs.ndim != 2 or pairs.shape[1] != 4:
        raise ValueError(f"pairs.npy has shape {pairs.shape}, expected (M, 4)")
    if pairs.shape[0] == 0:
        raise ValueError("zero point-pixel pairs")
    if pairs[:, 0].max() >= lidar.shape[0] or pairs[:, 0].min() < 0:
        raise ValueError("pairs.npy indexes points outside lidar.npy")
    n_cams = len(sample["cams.json"])
    if pairs[:, 1].max() >= n_cams:
        raise ValueError("pairs.npy indexes a camera outside cams.json")


# --------------------------------------------------------------------------- point-cloud augmentations


def rotate_z(xyz: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)
    return xyz @ rot.T


def drop_cuboid(
    xyz: np.ndarray, pairs: np.ndarray, rng: np.random.Generator, n_cams: int, min_pairs: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Remove points strictly inside a random cuboid; returns (kept point mask (N,), re-indexed pairs).

    Half-size = range_xyz * U[0, 0.2) / 2 centred on a random point. Reverted (all points kept) if any
    of the ``n_cams`` cameras would keep fewer than ``min_pairs`` pairs (so never when one has fewer
    to begin with), as reference/slidr.md §3 states it.
    """
    n = xyz.shape[0]
    half = (xyz.max(0) - xyz.min(0)) * rng.uniform(0, 0.2) / 2
    centre = xyz[rng.integers(n)]
    inside = np.all(np.abs(xyz - centre) < half, axis=1)
    keep = ~inside
    new_index = np.cumsum(keep) - 1
    kept_pairs = pairs[keep[pairs[:, 0]]]
    counts = np.bincount(kept_pairs[:, 1], minlength=n_cams)
    if np.any(counts < min_pairs):
        return np.ones(n, dtype=bool), pairs
    kept_pairs = kept_pairs.copy()
    kept_pairs[:, 0] = new_index[kept_pairs[:, 0]]
    return keep, kept_pairs


# --------------------------------------------------------------------------- image augmentations


def resized_crop_params(
    h_img: int,
    w_img: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (14 / 9, 17 / 9),
) -> tuple[int, int, int, int]:
    """(i, j, h, w) as ``torchvision RandomResizedCrop.get_params`` (10 tries, then a centre crop)."""
    area = h_img * w_img
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= w_img and 0 < h <= h_img:
            return int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1)), h, w
    in_ratio = w_img / h_img
    if in_ratio < ratio[0]:
        w, h = w_img, int(round(w_img / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = h_img, int(round(h_img * ratio[1]))
    else:
        w, h = w_img, h_img
    return (h_img - h) // 2, (w_img - w) // 2, h, w


def remap_pixels(
    pix: np.ndarray, i: int, j: int, h: int, w: int, crop: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (row, col) (M, 2) -> crop coordinates ``round((p - [i, j]) * [ch/h, cw/w])`` and in-crop mask."""
    p = np.round((pix - np.array([i, j])) * np.array([crop[0] / h, crop[1] / w])).astype(np.int64)
    ok = (p[:, 0] >= 0) & (p[:, 0] < crop[0]) & (p[:, 1] >= 0) & (p[:, 1] < crop[1])
    return p, ok


def crop_resize_image(img: np.ndarray, i: int, j: int, h: int, w: int, crop: tuple[int, int]) -> Tensor:
    """uint8 (H, W, 3) -> float32 (3, ch, cw) in [0, 1]; crop uint8 first, bilinear, no antialias."""
    region = (
        torch.from_numpy(np.ascontiguousarray(img[i : i + h, j : j + w])).permute(2, 0, 1).float().div_(255)
    )
    return F.interpolate(region[None], size=crop, mode="bilinear", align_corners=False, antialias=False)[0]


def crop_resize_labels(sp: np.ndarray, i: int, j: int, h: int, w: int, crop: tuple[int, int]) -> Tensor:
    """Superpixel labels (H, W) -> int64 (ch, cw), nearest (torch semantics)."""
    region = torch.from_numpy(sp[i : i + h, j : j + w].astype(np.float32))
    return F.interpolate(region[None, None], size=crop, mode="nearest")[0, 0].long()


# --------------------------------------------------------------------------- full transforms


def slidr_train_transform(
    sample: dict[str, Any],
    rng: np.random.Generator,
    gen: torch.Generator | None = None,
    *,
    crop: tuple[int, int] = (224, 416),
    min_pairs: int = 1024,
    max_crop_tries: int = 50,
    augment: bool = True,
) -> dict[str, Any]:
    """Decoded slidr sample -> one training example (see module docstring); ``augment=False``
    resizes the full images (SLidR validation) and leaves points untouched."""
    lidar = np.asarray(sample["lidar.npy"], dtype=np.float32)
    pairs = np.asarray(sample["pairs.npy"], dtype=np.int64)
    n_cams = len(sample["cams.json"])
    xyz = lidar[:, :3].copy()
    keep = np.ones(lidar.shape[0], dtype=bool)
    cam_order = np.arange(n_cams)
    if augment:
        cam_order = rng.permutation(n_cams)  # new image slot s shows camera cam_order[s]
        xyz = rotate_z(xyz, rng.uniform(0, 2 * math.pi))
        for ax in (0, 1):
            if rng.random() < 0.5:
                xyz[:, ax] = -xyz[:, ax]
        keep, pairs = drop_cuboid(xyz, pairs, rng, n_cams, min_pairs)
        xyz = xyz[keep]
    images, sps, pair_pts, pair_pix = [], [], [], []
    jpegs, boxes, flips = [], [], []  # deferred decoding: JPEG bytes stay undecoded (train.image_decode)
    for slot, cam in enumerate(cam_order):
        img = sample[f"cam{cam}.jpg"]
        sp = sample[f"cam{cam}.sp.png"]
        deferred = isinstance(img, bytes)
        if deferred:
            hi, wi = sample["cams.json"][cam]["height"], sample["cams.json"][cam]["width"]
        else:
            hi, wi = img.shape[:2]
        sel = pairs[:, 1] == cam
        pts, pix = pairs[sel, 0], pairs[sel, 2:4]
        if augment:
            for attempt in range(max_crop_tries):
                i, j, h, w = resized_crop_params(hi, wi, rng)
                p, ok = remap_pixels(pix, i, j, h, w, crop)
                n_ok = int(ok.sum())
                if n_ok > min_pairs or n_ok > 0.75 * len(ok) or len(ok) == 0:
                    break
                if attempt == max_crop_tries - 1:  # bounded: fall back to the whole image
                    i, j, h, w = 0, 0, hi, wi
                    p, ok = remap_pixels(pix, i, j, h, w, crop)
        else:
            i, j, h, w = 0, 0, hi, wi
            p, ok = remap_pixels(pix, i, j, h, w, crop)
            p = np.minimum(p, np.array([crop[0] - 1, crop[1] - 1]))
            ok = np.ones(len(p), dtype=bool)
        im_t = None if deferred else crop_resize_image(img, i, j, h, w, crop)
        sp_t = crop_resize_labels(sp, i, j, h, w, crop)
        p, pts = p[ok], pts[ok]
        flip = bool(augment and rng.random() < 0.5)
        if flip:
            sp_t = sp_t.flip(-1)
            im_t = None if im_t is None else im_t.flip(-1)
            p = p.copy()
            p[:, 1] = crop[1] - 1 - p[:, 1]
        if deferred:
            jpegs.append(img)
            boxes.append((i, j, h, w))
            flips.append(flip)
        else:
            images.append(im_t)
        sps.append(sp_t)
        pair_pts.append(pts)
        pair_pix.append(np.column_stack([np.full(len(p), slot), p]))
    coords, first, inverse = cylindrical_voxelize(torch.from_numpy(xyz))
    feats = torch.from_numpy(lidar[keep][:, 3:4]).index_select(0, first)  # raw intensity of the first point
    pts_all = torch.from_numpy(np.concatenate(pair_pts)).long()
    example = {
        "key": sample["__key__"],
        "coords": coords,
        "feats": feats.float(),
        "pairing_points": inverse[pts_all],
        "pairing_images": torch.from_numpy(np.concatenate(pair_pix)).long(),
        "superpixels": torch.stack(sps),
        "inverse": inverse,
    }
    if jpegs:
        example.update(jpegs=jpegs, boxes=torch.tensor(boxes, dtype=torch.long), flips=torch.tensor(flips))
    else:
        example["images"] = torch.stack(images)
    return example


def slidr_collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch variable-size clouds (reference §3 Collate): coords get a batch column, pair voxel indices
    are offset by the cumulative voxel count, pair image indices by ``b * n_cams``."""
    coords, feats, pp, pi, imgs, sps, inv, n_pairs = [], [], [], [], [], [], [], []
    v_off = 0
    for b, ex in enumerate(examples):
        c = ex["coords"]
        coords.append(torch.cat([torch.full((c.shape[0], 1), b, dtype=torch.long), c], dim=1))
        feats.append(ex["feats"])
        pp.append(ex["pairing_points"] + v_off)
        q = ex["pairing_images"].clone()
        q[:, 0] += b * ex["superpixels"].shape[0]
        pi.append(q)
        if "images" in ex:
            imgs.append(ex["images"])
        sps.append(ex["superpixels"])
        inv.append(ex["inverse"])
        n_pairs.append(len(ex["pairing_points"]))
        v_off += c.shape[0]
    batch = {
        "coords": torch.cat(coords),
        "feats": torch.cat(feats),
        "pairing_points": torch.cat(pp),
        "pairing_images": torch.cat(pi),
        "superpixels": torch.cat(sps),
        "inverse_indexes": inv,
        "batch_n_pairings": torch.tensor(n_pairs),
        "keys": [ex["key"] for ex in examples],
    }
    if imgs:
        batch["images"] = torch.cat(imgs)
    else:  # deferred decoding: decoded on the training device by train.image_decode.decode_crops
        batch["jpegs"] = [jpeg for ex in examples for jpeg in ex["jpegs"]]
        batch["boxes"] = torch.cat([ex["boxes"] for ex in examples])
        batch["flips"] = torch.cat([ex["flips"] for ex in examples])
    return batch
