"""Video/IMU alignment: which frames belong to an IMU window, and the clock offset between the two streams.

Clocks: IMU windows live on the IMU clock; frames on the video presentation clock (``sensors.video``). The
offset ``o`` maps one to the other: **IMU time + o = video time** (Ego4D's convention for its metadata, and
``clock_offsets.json``'s). All times are float64 milliseconds.

Frames of a window: the F instants are the centres of F equal parts of the window (never its edges, so a
window's frames never coincide with the next window's), shifted by ``o``; each takes the frame whose
presentation time is **nearest** (ties to the earlier frame). COMODO's published code instead pairs IMU window
i with video seconds [5i, 5i + 5) by index, ignoring the timestamps it saved.

Offset estimation: the camera's angular speed shows in both streams, as gyro magnitude ``|w|`` (rad/s) and as
frame-difference energy (mean absolute grey-level change per ms between consecutive frames). For each
candidate offset the gyro magnitude is averaged over exactly the IMU-clock interval between two frames
(``[p_i - o, p_{i+1} - o]``, from its running integral), and the Pearson correlation with the frames' motion
energy is taken over the frame pairs the IMU covers; the best candidate on a ``step_ms`` grid is refined by a
parabola through its neighbours. The correlation peak (r in [-1, 1]) says how much to trust it, except when the
best candidate is at the edge of the searched range (``OffsetEstimate.at_edge``): the true offset is then likely
beyond the range and the peak is just the correlation's value where the search stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def frame_instants(t0_ms: float, window_ms: float, n_frames: int) -> np.ndarray:
    """The ``n_frames`` instants of a window: centres of equal parts of ``[t0_ms, t0_ms + window_ms)``.

    Args:
        t0_ms: window start (IMU clock), ms.
        window_ms: window length, ms.
        n_frames: F >= 1.

    Returns:
        float64 (F,) times on the IMU clock (add the offset for the video clock).
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    return t0_ms + (np.arange(n_frames, dtype=np.float64) + 0.5) * (window_ms / n_frames)


def nearest_frames(frame_pts_ms: np.ndarray, times_ms: np.ndarray) -> np.ndarray:
    """Index of the frame presented nearest to each time (ties to the earlier frame).

    Args:
        frame_pts_ms: float64 (N,) strictly increasing presentation times (``sensors.video.frame_times_ms``).
        times_ms: (F,) times on the video clock.

    Returns:
        int64 (F,) indices into ``frame_pts_ms``.
    """
    pts = np.asarray(frame_pts_ms, np.float64)
    t = np.asarray(times_ms, np.float64)
    if len(pts) == 0:
        raise ValueError("no frames")
    right = np.clip(np.searchsorted(pts, t, side="left"), 1, len(pts) - 1) if len(pts) > 1 else np.zeros(len(t), int)
    if len(pts) == 1:
        return right.astype(np.int64)
    left = right - 1
    take_right = (pts[right] - t) < (t - pts[left])
    return np.where(take_right, right, left).astype(np.int64)


def motion_energy(gray: np.ndarray, pts_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame-difference motion energy between consecutive frames.

    Args:
        gray: (N, H, W) grey frames (any real dtype), N >= 2, in presentation order.
        pts_ms: float64 (N,) their presentation times, strictly increasing.

    Returns:
        energy: float64 (N-1,) mean absolute grey difference per ms between frame i and i+1 (a frame rate
            change does not change the energy of a steady motion).
        pts_ms: the same times (returned for convenience of chaining).
    """
    g = np.asarray(gray)
    pts = np.asarray(pts_ms, np.float64)
    if g.ndim != 3 or len(g) != len(pts) or len(g) < 2:
        raise ValueError(f"motion_energy: need (N, H, W) frames with N = len(pts_ms) >= 2, got {g.shape}")
    g = g.astype(np.int16) if g.dtype == np.uint8 else g.astype(np.float32)  # exact, and half the memory
    diff = np.abs(np.diff(g, axis=0)).mean(axis=(1, 2), dtype=np.float64)
    return diff / np.diff(pts), pts


@dataclass(frozen=True)
class OffsetEstimate:
    """Result of :func:`estimate_offset`.

    Attributes:
        offset_ms: IMU time + offset = video time, ms.
        peak: Pearson correlation at the offset (1 = the two motion signals agree perfectly).
        n_pairs: frame pairs the correlation used at the peak.
        at_edge: the best candidate is the first or last scored one, or next to it: the score may still rise
            beyond the searched range, so the true offset may lie outside it and ``offset_ms`` (whatever its
            ``peak``) is only where the search stopped. The caller should not use the estimate.
    """

    offset_ms: float
    peak: float
    n_pairs: int
    at_edge: bool = False


def estimate_offset(
    imu_t_ms: np.ndarray,
    gyro: np.ndarray,
    frame_pts_ms: np.ndarray,
    energy: np.ndarray,
    max_offset_ms: float = 1000.0,
    step_ms: float = 5.0,
    min_pairs: int = 30,
) -> OffsetEstimate:
    """Estimate the IMU-to-video clock offset by correlating gyro magnitude with frame motion energy.

    Args:
        imu_t_ms: float64 (M,) IMU timestamps (IMU clock), strictly increasing.
        gyro: (3, M) angular rate, rad/s.
        frame_pts_ms: float64 (N,) presentation times of the frames ``energy`` was computed from.
        energy: (N-1,) motion energy between frame i and i+1 (:func:`motion_energy`).
        max_offset_ms: search offsets in ``[-max_offset_ms, max_offset_ms]``.
        step_ms: candidate spacing before the parabolic refinement.
        min_pairs: fewest frame pairs inside the IMU recording for a candidate to count.

    Returns:
        :class:`OffsetEstimate`; ``at_edge`` when the best candidate is within one ``step_ms`` of either end of
        the scored candidates (``+-max_offset_ms``, or nearer where fewer than ``min_pairs`` pairs are left).

    Raises:
        ValueError: no candidate offset leaves ``min_pairs`` frame pairs inside the IMU recording, or
            either signal is constant (nothing to correlate).
    """
    t = np.asarray(imu_t_ms, np.float64)
    speed = np.linalg.norm(np.asarray(gyro, np.float64), axis=0)
    pts = np.asarray(frame_pts_ms, np.float64)
    e = np.asarray(energy, np.float64)
    if len(e) != len(pts) - 1:
        raise ValueError(f"estimate_offset: energy has {len(e)} values for {len(pts)} frames")
    # Running integral of |w| (trapezoid) at the IMU samples: the mean over any interval is two lookups.
    integral = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * np.diff(t))])
    lags = np.arange(-max_offset_ms, max_offset_ms + step_ms / 2, step_ms)
    scores = np.full(len(lags), -np.inf)
    counts = np.zeros(len(lags), int)
    for i, o in enumerate(lags):
        scores[i], counts[i] = _score(t, integral, pts, e, o, min_pairs)
    if not np.isfinite(scores).any():
        raise ValueError(f"no offset within +-{max_offset_ms:.0f} ms leaves {min_pairs} frame pairs inside the "
                         "IMU recording with motion in both streams")
    best = int(np.argmax(scores))
    scored = np.flatnonzero(np.isfinite(scores))
    at_edge = bool(best <= scored[0] + 1 or best >= scored[-1] - 1)
    offset = float(lags[best])
    if 0 < best < len(lags) - 1 and np.isfinite(scores[best - 1]) and np.isfinite(scores[best + 1]):
        a, b, c = scores[best - 1], scores[best], scores[best + 1]
        denom = a - 2 * b + c
        if denom < 0:
            offset += 0.5 * (a - c) / denom * step_ms
    peak, n_pairs = _score(t, integral, pts, e, offset, min_pairs)
    if not np.isfinite(peak):
        peak, n_pairs = float(scores[best]), int(counts[best])
    return OffsetEstimate(offset_ms=offset, peak=float(peak), n_pairs=int(n_pairs), at_edge=at_edge)


def _score(t: np.ndarray, integral: np.ndarray, pts: np.ndarray, e: np.ndarray, o: float,
           min_pairs: int) -> tuple[float, int]:
    """Pearson r between per-interval mean gyro speed (IMU clock, shifted by ``o``) and motion energy."""
    a, b = pts[:-1] - o, pts[1:] - o
    inside = (a >= t[0]) & (b <= t[-1])
    n = int(inside.sum())
    if n < min_pairs:
        return -np.inf, n
    mean_speed = (np.interp(b[inside], t, integral) - np.interp(a[inside], t, integral)) / (b[inside] - a[inside])
    x, y = mean_speed - mean_speed.mean(), e[inside] - e[inside].mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    if denom == 0:
        return -np.inf, n
    return float((x * y).sum() / denom), n
