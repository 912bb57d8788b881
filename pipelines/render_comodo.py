"""The picture of a comodo sample: the window's frames above its six IMU channels, frame instants marked."""

from __future__ import annotations

from typing import Any

import numpy as np

from distillkit.pipelines.codecs import SampleView

CHANNEL_NAMES = ("accel x", "accel y", "accel z", "gyro x", "gyro y", "gyro z")


def offset_text(times: dict[str, Any]) -> str:
    """Where the window's video-to-IMU clock offset came from, in words (``offset_source``, ``offset_peak``).

    Args:
        times: the sample's ``times.json``.
    """
    source = times.get("offset_source")
    if source == "estimated":
        peak = times.get("offset_peak")
        how = "estimated from video motion vs. gyroscope"
        return f"{how}, correlation {peak:.2f}" if isinstance(peak, int | float) else how
    if source == "given":
        return "given with the recording"
    return f"source: {source}" if source else "source unknown"


def render_comodo(sample: SampleView) -> Any:
    """A matplotlib figure: one row of the F frames (numbered, titled with their video time), then
    accelerometer (m/s^2) and gyroscope (rad/s) panels over the window's seconds on the IMU clock, with a
    dashed, numbered line at each frame's presentation time moved onto the IMU clock (video time - offset).

    Args:
        sample: a decoded comodo sample (``frame{j:02d}.jpg``, ``imu.npy``, ``times.json``, optional
            ``label.txt``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = sample["times.json"]
    imu = sample["imu.npy"]
    frame_ms = np.asarray(times["frame_ms"], np.float64)
    n = len(frame_ms)
    fig = plt.figure(figsize=(max(2.0 * n, 10.0), 8.0), layout="constrained")
    grid = fig.add_gridspec(3, n, height_ratios=[1.2, 1, 1])
    t = np.arange(imu.shape[1]) / times["rate_hz"]
    marks = (frame_ms - times["offset_ms"] - times["t0_ms"]) / 1000.0
    for j in range(n):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(sample.image(f"frame{j:02d}.jpg"))
        ax.set_title(f"frame {j + 1}: video {frame_ms[j] / 1000:.3f} s", fontsize=8)
        ax.set_axis_off()
    panels = ((0, "accelerometer", "acceleration (m/s²)"), (3, "gyroscope", "angular velocity (rad/s)"))
    for row, (lo, what, unit) in enumerate(panels, start=1):
        ax = fig.add_subplot(grid[row, :])
        for c in range(lo, lo + 3):
            ax.plot(t, imu[c], lw=0.8, label=CHANNEL_NAMES[c])
        for j, x in enumerate(marks):
            ax.axvline(x, color="k", ls="--", lw=0.6, alpha=0.6)
            if row == 1:  # number the lines once, so each frame above can be found on the time axis
                ax.text(x, 1.0, f" {j + 1}", transform=ax.get_xaxis_transform(), fontsize=8, va="bottom")
        ax.set_title(f"{what} ({imu.shape[1]} readings at {times['rate_hz']:g} Hz)", fontsize=9, loc="left")
        ax.set_ylabel(unit)
        ax.set_xlim(0, t[-1] if len(t) else 1)
        ax.legend(loc="upper right", fontsize=7, ncol=3)
    ax.set_xlabel("seconds since the window starts (IMU clock); dashed lines: the instants of frames 1-"
                  f"{n} above")
    label = bytes(sample["label.txt"]).decode() if "label.txt" in sample else "none"
    t0, t1 = times["t0_ms"] / 1000, times["t1_ms"] / 1000
    fig.suptitle(
        f"recording {times['uid']}, window {times.get('window', '?')}: {n} video frames and the IMU (motion "
        f"sensor) readings of the same {t1 - t0:.2f} s; activity label: {label}"
        + (f"; split: {times['split']}" if "split" in times else "") + "\n"
        f"IMU clock {t0:.2f} to {t1:.2f} s; a frame's instant = its video time minus the video-to-IMU clock "
        f"offset ({times['offset_ms']:+.1f} ms, {offset_text(times)})",
        fontsize=10)
    return fig
