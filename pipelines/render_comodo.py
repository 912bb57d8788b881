"""The picture of a comodo sample: the window's frames above its six IMU channels, frame instants marked."""

from __future__ import annotations

from typing import Any

import numpy as np

from distillkit.pipelines.codecs import SampleView

CHANNEL_NAMES = ("accel x", "accel y", "accel z", "gyro x", "gyro y", "gyro z")


def render_comodo(sample: SampleView) -> Any:
    """A matplotlib figure: one row of the F frames (titled with their video time), then accelerometer (m/s^2)
    and gyroscope (rad/s) panels over the window's seconds on the IMU clock, with a dashed line at each frame's
    presentation time moved onto the IMU clock (video time - offset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = sample["times.json"]
    imu = sample["imu.npy"]
    frame_ms = np.asarray(times["frame_ms"], np.float64)
    n = len(frame_ms)
    fig = plt.figure(figsize=(max(2.0 * n, 10.0), 7.5))
    grid = fig.add_gridspec(3, n, height_ratios=[1.2, 1, 1])
    t = np.arange(imu.shape[1]) / times["rate_hz"]
    marks = (frame_ms - times["offset_ms"] - times["t0_ms"]) / 1000.0
    for j in range(n):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(sample.image(f"frame{j:02d}.jpg"))
        ax.set_title(f"{frame_ms[j] / 1000:.3f} s", fontsize=8)
        ax.set_axis_off()
    for row, (lo, unit) in enumerate(((0, "m/s²"), (3, "rad/s")), start=1):
        ax = fig.add_subplot(grid[row, :])
        for c in range(lo, lo + 3):
            ax.plot(t, imu[c], lw=0.8, label=CHANNEL_NAMES[c])
        for x in marks:
            ax.axvline(x, color="k", ls="--", lw=0.6, alpha=0.6)
        ax.set_ylabel(unit)
        ax.set_xlim(0, t[-1] if len(t) else 1)
        ax.legend(loc="upper right", fontsize=7, ncol=3)
    ax.set_xlabel("s since window start (IMU clock); dashed: frame instants")
    label = bytes(sample["label.txt"]).decode() if "label.txt" in sample else "unlabelled"
    source = times.get("offset_source", "?")
    fig.suptitle(f"{times['uid']} window {times.get('window', '?')}  [{times['t0_ms'] / 1000:.2f}, "
                 f"{times['t1_ms'] / 1000:.2f}) s IMU clock, offset {times['offset_ms']:+.1f} ms ({source}), {label}",
                 fontsize=10)
    fig.tight_layout()
    return fig
