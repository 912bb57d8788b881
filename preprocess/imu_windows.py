"""IMU windows: where windows fall in a recording, and one window resampled and checked (pure numpy).

Times are float64 milliseconds on the IMU clock; samples are float32 (6, T) in ``sensors.imu.CHANNELS`` order
(accel x/y/z in m/s^2, gyro x/y/z in rad/s), COMODO's layout (5 s at 200 Hz: T = 1000).

Resampling (``sensors.imu.resample_imu``) is linear interpolation between the two source samples around each
grid time when the source is near the grid rate: Ego4D's IMU is already ~200 Hz with jitter, so the grid moves
samples by at most half an interval and a filter would only smear them. A faster source (more than 1.2x the grid
rate, e.g. Aria's 1 kHz IMU in EgoExo4D) is low-passed first (zero-phase windowed sinc, flat to 0.8x the grid's
Nyquist, -60 dB from it, never across a hole), since decimating by interpolation alone folds everything above
the grid's Nyquist into the window. COMODO's published preparation resamples whole recordings with
``torchaudio.functional.resample`` (which also low-passes) from a rate estimated as ``int(1000 / mean(diff))``,
which smears the jitter and every gap over the recording instead of reporting them.
"""

from __future__ import annotations

import math

import numpy as np

from distillkit.sensors.imu import ImuRecord, resample_imu


class WindowError(ValueError):
    """One window cannot be used; the message is the reason (the pipeline records it and goes on)."""


def window_starts(begin_ms: float, end_ms: float, window_ms: float, stride_ms: float) -> np.ndarray:
    """Start times of the windows ``[s, s + window_ms)`` that fit in ``[begin_ms, end_ms]``.

    Windows start at ``begin_ms + k * stride_ms``; a tail shorter than a window is dropped, as COMODO does.

    Args:
        begin_ms, end_ms: the usable span on the IMU clock, ms.
        window_ms: window length, ms (> 0).
        stride_ms: distance between consecutive starts, ms (> 0; equal to ``window_ms`` for no overlap).

    Returns:
        float64 (K,) start times, K >= 0.
    """
    if window_ms <= 0 or stride_ms <= 0:
        raise ValueError(f"window and stride must be positive, got {window_ms} and {stride_ms} ms")
    span = end_ms - begin_ms
    if not math.isfinite(span) or span < window_ms:
        return np.zeros(0, np.float64)
    count = int(math.floor((span - window_ms) / stride_ms + 1e-9)) + 1
    return begin_ms + np.arange(count, dtype=np.float64) * stride_ms


def imu_window(
    rec: ImuRecord,
    t0_ms: float,
    rate_hz: float = 200.0,
    n: int = 1000,
    max_gap_ms: float = 100.0,
    max_nan_fraction: float = 0.01,
) -> np.ndarray:
    """One window of ``rec`` on the uniform grid ``t0_ms + k * 1000 / rate_hz``, k < n, checked.

    Args:
        rec: a cleaned recording (``sensors.imu.read_imu_csv``).
        t0_ms: window start on the IMU clock, ms.
        rate_hz: grid rate, Hz.
        n: grid points (window length = ``n / rate_hz`` s).
        max_gap_ms: the longest interval between consecutive source samples allowed inside the window;
            interpolating across a longer hole would invent a straight line.
        max_nan_fraction: the largest share of the window's ``n`` grid samples that may have been source rows
            dropped for a NaN value (counted by their timestamps, ``ImuRecord.nan_t_ms``).

    Returns:
        float32 (6, n).

    Raises:
        WindowError: the window runs past the recording, crosses a gap longer than ``max_gap_ms`` or holds
            too many NaN rows; the message says which and by how much.
    """
    win = resample_imu(rec.t_ms, rec.x, t0_ms, rate_hz, n)
    t1_ms = t0_ms + n * 1000.0 / rate_hz
    if math.isinf(win.max_gap_ms):
        raise WindowError(f"window [{t0_ms:.1f}, {t1_ms:.1f}) ms runs past the IMU recording "
                          f"[{rec.t_ms[0]:.1f}, {rec.t_ms[-1]:.1f}] ms")
    if win.max_gap_ms > max_gap_ms:
        raise WindowError(f"IMU gap of {win.max_gap_ms:.1f} ms in window [{t0_ms:.1f}, {t1_ms:.1f}) ms "
                          f"(limit {max_gap_ms:.1f} ms)")
    n_nan = int(np.searchsorted(rec.nan_t_ms, t1_ms) - np.searchsorted(rec.nan_t_ms, t0_ms))
    if n_nan > max_nan_fraction * n:
        raise WindowError(f"{n_nan} IMU rows with NaN values in window [{t0_ms:.1f}, {t1_ms:.1f}) ms "
                          f"(limit {max_nan_fraction:.1%} of {n})")
    return win.x
