"""The picture of a slidr sample: six images, superpixel boundaries, points by depth."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from distillkit.pipelines.base import SHOW_DPI  # the resolution ``distillkit show`` saves at
from distillkit.pipelines.codecs import SampleView

PANEL_INCHES = 5.0  # width of one camera panel
# Diameter of a projected lidar point on the saved picture, in pixels: at least 3.5 px, so single points
# stay visible on the ~1600 px wide picture of six 1600x900 cameras (each panel ~1/3 scale), and at most
# 6.5 px, so sparse sweeps are not drawn as blobs. Between the two it follows the points' spacing.
POINT_PX = (3.5, 6.5)


def point_size(n_points: int, width: int, height: int) -> float:
    """Marker area (points^2) for ``n_points`` lidar points on one camera panel: about half their mean
    spacing across, within ``POINT_PX``.

    Args:
        n_points: points drawn on the panel.
        width: image width in pixels.
        height: image height in pixels.
    """
    panel_px = PANEL_INCHES * SHOW_DPI
    area = panel_px * panel_px * height / width
    diameter = float(np.clip(0.5 * np.sqrt(area / max(n_points, 1)), *POINT_PX))
    return (diameter * 72.0 / SHOW_DPI) ** 2


def render_slidr(sample: SampleView, max_depth: float = 50.0) -> Any:
    """A 2x3 matplotlib figure, one panel per camera: the JPEG, SLIC superpixel boundaries in white and
    the lidar points that project into the image, coloured by depth (metres, turbo colour map
    without its darkest ends).

    Args:
        sample: a decoded slidr sample (``cam{i}.jpg``, ``cam{i}.sp.png``, ``cams.json``, ``pairs*.npy``,
            ``lidar.npy``, optional ``meta.json``).
        max_depth: depth (m) at the top of the colour scale; farther points share its colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from skimage.segmentation import find_boundaries

    cams = sample["cams.json"]
    pairs = sample["pairs.npy"]
    uvd = sample["pairs_uvd.npy"]
    n_points = len(sample["lidar.npy"])
    cols = 3
    rows = (len(cams) + cols - 1) // cols
    w0, h0 = cams[0]["width"], cams[0]["height"]
    # turbo without its darkest ends: near (dark blue) and far (dark red) points vanished on dark asphalt
    cmap = ListedColormap(plt.get_cmap("turbo")(np.linspace(0.1, 0.93, 256)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES * h0 / w0 + 0.8),
                             squeeze=False, layout="constrained")
    scatter = None
    for i, cam in enumerate(cams):
        ax = axes.flat[i]
        image = sample.image(f"cam{i}.jpg").astype(np.float32) / 255
        labels = sample[f"cam{i}.sp.png"]
        image[find_boundaries(labels, mode="inner")] = 1.0
        ax.imshow(image)
        sel = pairs[:, 1] == i
        size = point_size(int(sel.sum()), cam["width"], cam["height"])
        scatter = ax.scatter(uvd[sel, 0], uvd[sel, 1], c=uvd[sel, 2], s=size, cmap=cmap, vmin=0, vmax=max_depth,
                             linewidths=0)
        ax.set_title(f"{cam['channel']} ({cam['width']}x{cam['height']} px): {int(sel.sum())} lidar points, "
                     f"{labels.max() + 1} superpixels", fontsize=9)
        ax.set_axis_off()
    for ax in axes.flat[len(cams):]:
        ax.set_axis_off()
    meta = sample["meta.json"] if "meta.json" in sample else {}
    when = ""
    if isinstance(meta.get("timestamp"), int | float):  # nuScenes timestamps: microseconds since the epoch
        when = datetime.fromtimestamp(meta["timestamp"] / 1e6, tz=UTC).strftime(" at %Y-%m-%d %H:%M:%S UTC")
    where = f"{meta['scene']}{when}: " if "scene" in meta else ""
    fig.suptitle(
        f"{where}one lidar sweep ({n_points} points) and the {len(cams)} camera images taken with it; "
        f"{len(pairs)} point-to-pixel pairs\n"
        "dots: lidar points projected into each image, coloured by depth; white outlines: superpixels "
        "(SLIC segments of similar colour). SLidR pools image and lidar features over each superpixel.",
        fontsize=10)
    if scatter is not None:
        fig.colorbar(scatter, ax=axes, fraction=0.02, pad=0.01, label=f"depth along the camera axis (m; "
                     f"{max_depth:g}+ in red)")
    return fig
