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


def level_caption(name: str, index: int, count: int) -> str:
    """A level name as stored (``instance@0.8``, ``semantic@0.6``) in words a reader of the picture follows.

    Args:
        name: the level's name in ``uniap.json``.
        index: its 0-based position among the levels.
        count: the number of levels.
    """
    kind, _, tau = name.partition("@")
    what = {"instance": "neighbour regions merged", "semantic": "similar regions grouped image-wide"}.get(kind, kind)
    return f"level {index + 1}/{count}: {what} at similarity > {tau}" if tau else f"level {index + 1}/{count}: {name}"


def render_uniseg(sample: SampleView) -> Any:
    """A matplotlib figure: the image, ground truth (when stored) and one panel per UniAP level.

    The caption and legend say what a level is (patches merged while their feature similarity is above the
    level's threshold), what the colours, white lines and darkened patches mean, so the picture reads
    without the pipeline's code.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from distillkit.pipelines.uniseg import image_field

    meta = sample["uniap.json"]
    levels = sample["uniap.npy"]
    image = sample.image(image_field(sample)).astype(np.float32) / 255
    panels: list[tuple[str, np.ndarray]] = [(f"input image ({image.shape[1]}x{image.shape[0]} px)", image)]
    for kind, one, many in (("inst", "object", "objects"), ("sem", "class", "classes")):
        name = f"gt.{kind}.png"
        if name in sample:
            gt = sample[name].astype(np.int64)
            colours = np.vstack([[0.0, 0.0, 0.0], region_colours(int(gt.max()) + 1, seed=1)])
            n = len(np.unique(gt[gt > 0]))
            panels.append((f"ground truth {many}: {n} {one if n == 1 else many}", colours[gt]))
    count = len(meta["levels"])
    for i, (name, lvl, n) in enumerate(zip(meta["levels"], levels, meta["regions"], strict=True)):
        dropped = float((lvl < 0).mean())
        panels.append((f"{level_caption(name, i, count)}\n{n} regions, {dropped:.0%} of patches dropped",
                       overlay(image, lvl)))
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    h, w = image.shape[:2]
    # constrained layout leaves room for the two-line panel titles and the legend below the panels
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.4, rows * (3.4 * h / w + 0.45) + 1.0), squeeze=False,
                             layout="constrained")
    for ax, (title, pic) in zip(axes.flat, panels, strict=False):
        ax.imshow(np.clip(pic, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    bb = meta["backbone"]
    patch = meta["patch"]
    features = {"stats": "colour and texture statistics"}.get(bb["kind"], f"{bb['kind']} network features")
    fig.suptitle(
        f"{meta['source']}: UniSeg's pseudo-labels (UniAP regions), {count} levels from fine to coarse\n"
        f"the image is cut into {patch}x{patch}-px patches ({meta['grid'][0]}x{meta['grid'][1]} grid) described "
        f"by {features}; a level merges neighbouring patches while their similarity exceeds its threshold",
        fontsize=9)
    min_size = meta.get("min_size")
    legend = [
        Patch(facecolor=region_colours(3)[2], edgecolor="none", label="tint: one region (colour = its number)"),
        Line2D([], [], color="white", lw=2, label="white line: region boundary"),
        Patch(facecolor=(0.08, 0.08, 0.08), edgecolor="none",
              label=f"darkened: dropped patches (their region has fewer than {min_size} patches, or covers the "
                    "whole image)" if min_size else "darkened: dropped patches"),
    ]
    if any(name.startswith("gt.") for name in sample):
        legend.append(Patch(facecolor="black", edgecolor="grey", label="black in ground truth: background"))
    # a mid-grey box, so both the white boundary line and the dark swatches stand out in the legend
    fig.legend(handles=legend, loc="outside lower center", ncol=2, fontsize=8, frameon=True,
               facecolor=(0.55, 0.55, 0.55), framealpha=1.0)
    return fig
