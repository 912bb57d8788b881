"""The picture of a uniseg sample: the image, then each UniAP level's regions as coloured overlays."""

from __future__ import annotations

from typing import Any

import numpy as np

from distillkit.pipelines.codecs import SampleView


def region_colours(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) float RGB colours in [0.15, 1], fixed per region index (seeded, so a level's picture is stable).

    Args:
        n: number of regions.
        seed: colour table seed.
    """
    rng = np.random.default_rng(seed)
    return rng.uniform(0.15, 1.0, size=(max(n, 1), 3))


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The image with regions of a label grid blended in colour and their boundaries in white.

    Args:
        image: (H, W, 3) float RGB in [0, 1].
        labels: (h, w) int region ids on the patch grid, -1 = dropped (drawn darkened).
        alpha: colour weight.
    """
    import cv2
    from skimage.segmentation import find_boundaries

    H, W = image.shape[:2]
    up = cv2.resize(labels.astype(np.int32), (W, H), interpolation=cv2.INTER_NEAREST)
    colours = region_colours(int(up.max(initial=-1)) + 1)
    out = image.copy()
    valid = up >= 0
    out[valid] = (1 - alpha) * image[valid] + alpha * colours[up[valid]]
    out[~valid] = image[~valid] * 0.3
    out[find_boundaries(up, mode="inner")] = 1.0
    return out


def render_uniseg(sample: SampleView) -> Any:
    """A matplotlib figure: the image, ground truth (when stored) and one panel per UniAP level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distillkit.pipelines.uniseg import image_field

    meta = sample["uniap.json"]
    levels = sample["uniap.npy"]
    image = sample.image(image_field(sample)).astype(np.float32) / 255
    panels: list[tuple[str, np.ndarray]] = [(f"{meta['source']} ({image.shape[1]}x{image.shape[0]})", image)]
    for kind in ("inst", "sem"):
        name = f"gt.{kind}.png"
        if name in sample:
            gt = sample[name].astype(np.int64)
            colours = np.vstack([[0.0, 0.0, 0.0], region_colours(int(gt.max()) + 1, seed=1)])
            panels.append((f"ground truth {kind} ({len(np.unique(gt[gt > 0]))} ids)", colours[gt]))
    for name, lvl, n in zip(meta["levels"], levels, meta["regions"], strict=True):
        dropped = float((lvl < 0).mean())
        panels.append((f"{name}: {n} regions, {dropped:.0%} dropped", overlay(image, lvl)))
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    h, w = image.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 3.2 * h / w + 0.6), squeeze=False)
    for ax, (title, pic) in zip(axes.flat, panels, strict=False):
        ax.imshow(np.clip(pic, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    bb = meta["backbone"]
    fig.suptitle(f"UniAP on a {meta['grid'][0]}x{meta['grid'][1]} grid of {bb['kind']} features "
                 f"(patch {meta['patch']}, update {meta.get('update', 'sum')})", fontsize=10)
    return fig
