"""The picture of a slidr sample: six images, superpixel boundaries, points by depth."""

from __future__ import annotations

from typing import Any

import numpy as np

from distillkit.pipelines.codecs import SampleView


def render_slidr(sample: SampleView, max_depth: float = 50.0) -> Any:
    """A 2x3 matplotlib figure, one panel per camera: the JPEG, SLIC boundaries in white and
    the projected lidar points coloured by depth (metres, turbo colour map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    cams = sample["cams.json"]
    pairs = sample["pairs.npy"]
    uvd = sample["pairs_uvd.npy"]
    n_points = len(sample["lidar.npy"])
    cols = 3
    rows = (len(cams) + cols - 1) // cols
    w0, h0 = cams[0]["width"], cams[0]["height"]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.0, rows * 5.0 * h0 / w0 + 0.6), squeeze=False)
    scatter = None
    for i, cam in enumerate(cams):
        ax = axes.flat[i]
        image = sample.image(f"cam{i}.jpg").astype(np.float32) / 255
        labels = sample[f"cam{i}.sp.png"]
        image[find_boundaries(labels, mode="inner")] = 1.0
        ax.imshow(image)
        sel = pairs[:, 1] == i
        scatter = ax.scatter(uvd[sel, 0], uvd[sel, 1], c=uvd[sel, 2], s=2.0, cmap="turbo",
                             vmin=0, vmax=max_depth, linewidths=0)
        ax.set_title(f"{cam['channel']}: {int(sel.sum())} pairs, {labels.max() + 1} superpixels", fontsize=9)
        ax.set_axis_off()
    for ax in axes.flat[len(cams):]:
        ax.set_axis_off()
    fig.suptitle(f"{n_points} lidar points, {len(pairs)} point-pixel pairs", fontsize=11)
    if scatter is not None:
        fig.colorbar(scatter, ax=axes, fraction=0.02, pad=0.01, label="depth (m)")
    return fig
