"""Training examples of the uniseg trainer: a clean global view, augmented local crops and region masks.

One stored sample (``image.*``, ``uniap.npy``) becomes:

- ``global``: (3, G, G) float32, the whole image resized to G x G (aspect not kept: the teacher's
  view is the whole image, as in QuerySD), ImageNet-normalised;
- ``local``: (V, 3, S, S) float32, V random crops (area fraction drawn from ``scale``, aspect ratio
  log-uniform in [3/4, 4/3]) resized to S x S, each flipped horizontally with p = 0.5, colour-jittered
  with p = 0.8 and turned gray with p = 0.2 (DINO's ``ColorJitter(0.4, 0.4, 0.2, 0.1)``; DINO's blur and
  solarisation are left out), normalised;
- ``boxes``: (V, 4) float32 ``(y0, x0, y1, x1)`` of each crop in [0, 1] image coordinates, x0 > x1 for a
  flipped crop (student token column j then maps to x0 + (j + 0.5) / S_tokens * (x1 - x0) either way);
- ``masks``: (R, M, M) float32 0/1, the UniAP regions of every level (identical masks across levels kept
  once) resampled (nearest) from the patch grid to an M x M grid over the image; at most ``max_regions``,
  a seeded random subset when there are more; padded with zeros;
- ``valid``: (R,) bool, the real regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from distillkit.preprocess.patch_features import IMAGENET_MEAN, IMAGENET_STD

MASK_GRID = 32


@dataclass(frozen=True)
class ViewConfig:
    """Sizes and augmentation of the views.

    Attributes:
        global_size: side of the teacher's view in px.
        local_size: side of a student crop in px.
        local_crops: crops per image (V).
        scale: (min, max) crop area as a fraction of the image.
        max_regions: regions kept per image (R).
        mask_grid: side of the region-mask grid (M).
        levels: UniAP levels used (None = all).
    """

    global_size: int = 64
    local_size: int = 32
    local_crops: int = 2
    scale: tuple[float, float] = (0.05, 0.4)
    max_regions: int = 32
    mask_grid: int = MASK_GRID
    levels: tuple[int, ...] | None = None


def normalise(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 ImageNet-normalised.

    Args:
        rgb: the image.
    """
    x = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def region_masks(levels: np.ndarray, grid: int, max_regions: int, rng: np.random.Generator,
                 use: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct UniAP regions of all levels as (R, grid, grid) 0/1 masks over the image, and the valid flags.

    Args:
        levels: (L, h, w) int32 partitions (-1 = dropped).
        grid: side of the output mask grid.
        max_regions: R; a random subset (``rng``) when there are more distinct regions.
        rng: the sample's generator.
        use: level indices to use (None = all).
    """
    L, h, w = levels.shape
    rows = np.minimum(((np.arange(grid) + 0.5) * h / grid).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(grid) + 0.5) * w / grid).astype(np.int64), w - 1)
    seen: set[bytes] = set()
    masks = []
    for li in (range(L) if use is None else use):
        lvl = levels[li]
        for r in range(int(lvl.max(initial=-1)) + 1):
            m = lvl == r
            key = np.packbits(m).tobytes()
            if key in seen:
                continue
            seen.add(key)
            masks.append(m[rows][:, cols])
    if len(masks) > max_regions:
        pick = np.sort(rng.choice(len(masks), size=max_regions, replace=False))
        masks = [masks[i] for i in pick]
    out = np.zeros((max_regions, grid, grid), np.float32)
    valid = np.zeros(max_regions, bool)
    for i, m in enumerate(masks):
        out[i] = m
        valid[i] = True
    return out, valid


def _jitter(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """DINO's colour augmentation: with p = 0.8 brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 in a
    random order; gray with p = 0.2."""
    x = crop.astype(np.float32) / 255.0
    if rng.random() < 0.8:
        for op in rng.permutation(4):
            if op == 0:
                x = x * rng.uniform(0.6, 1.4)
            elif op == 1:
                m = x.mean()
                x = (x - m) * rng.uniform(0.6, 1.4) + m
            elif op == 2:
                g = x.mean(axis=2, keepdims=True)
                x = (x - g) * rng.uniform(0.8, 1.2) + g
            else:
                hsv = cv2.cvtColor(np.clip(x, 0, 1), cv2.COLOR_RGB2HSV)  # float: H in degrees
                hsv[..., 0] = (hsv[..., 0] + rng.uniform(-36.0, 36.0)) % 360.0
                x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
            x = np.clip(x, 0, 1)
    if rng.random() < 0.2:
        x = np.repeat(x.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(x * 255.0, 0, 255).astype(np.uint8)


def random_box(rng: np.random.Generator, scale: tuple[float, float], height: int, width: int
               ) -> tuple[float, float, float, float]:
    """A crop box (y0, x0, y1, x1) in [0, 1] with area fraction in ``scale`` and aspect in [3/4, 4/3] (pixels).

    Args:
        rng: generator.
        scale: (min, max) area fraction.
        height: image height in px (for the aspect ratio).
        width: image width in px.
    """
    area = rng.uniform(*scale)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))  # width / height in pixels
    bh = min(1.0, np.sqrt(area / aspect * width / height))
    bw = min(1.0, area / bh)
    y0 = rng.uniform(0, 1 - bh)
    x0 = rng.uniform(0, 1 - bw)
    return float(y0), float(x0), float(y0 + bh), float(x0 + bw)


def make_example(rgb: np.ndarray, levels: np.ndarray, cfg: ViewConfig, rng: np.random.Generator) -> dict[str, Any]:
    """One training example (module docstring) from an image and its UniAP levels.

    Args:
        rgb: (H, W, 3) uint8 image as stored.
        levels: (L, h, w) int32 UniAP partitions of it.
        cfg: view settings.
        rng: the sample's generator (``ShardStream`` seeds it from seed, epoch and key).
    """
    H, W = rgb.shape[:2]
    G, S = cfg.global_size, cfg.local_size
    glob = cv2.resize(rgb, (G, G), interpolation=cv2.INTER_AREA if min(H, W) > G else cv2.INTER_LINEAR)
    crops, boxes = [], []
    for _ in range(cfg.local_crops):
        y0, x0, y1, x1 = random_box(rng, cfg.scale, H, W)
        r0, r1 = int(round(y0 * H)), max(int(round(y1 * H)), int(round(y0 * H)) + 1)
        c0, c1 = int(round(x0 * W)), max(int(round(x1 * W)), int(round(x0 * W)) + 1)
        crop = cv2.resize(rgb[r0:r1, c0:c1], (S, S), interpolation=cv2.INTER_LINEAR)
        box = [r0 / H, c0 / W, r1 / H, c1 / W]  # the box actually cut, in image coordinates
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
            box = [box[0], box[3], box[2], box[1]]
        crops.append(normalise(_jitter(crop, rng)))
        boxes.append(box)
    masks, valid = region_masks(levels, cfg.mask_grid, cfg.max_regions, rng, cfg.levels)
    return {
        "global": normalise(glob),
        "local": torch.stack(crops),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "masks": torch.from_numpy(masks),
        "valid": torch.from_numpy(valid),
    }


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch (every tensor gains a leading B).

    Args:
        items: examples of ``make_example``.
    """
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
