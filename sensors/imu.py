"""IMU recordings: read Ego4D-style CSV files and resample them onto uniform windows (pure numpy).

Units: timestamps are float64 **milliseconds** on the IMU's own clock (Ego4D's ``canonical_timestamp_ms``);
accelerometer in m/s^2 and gyroscope in rad/s, as stored (nothing is rescaled). Samples are float32 arrays
of shape (6, N), channels in :data:`CHANNELS` order (accel x/y/z, gyro x/y/z), the layout of the COMODO
shards' ``imu.npy``.
"""

from __future__ import annotations

import csv
import io
import math
import pathlib
from dataclasses import dataclass, field

import numpy as np

TIME_COLUMN = "canonical_timestamp_ms"
CHANNELS: tuple[str, ...] = ("accl_x", "accl_y", "accl_z", "gyro_x", "gyro_y", "gyro_z")


@dataclass(frozen=True)
class ImuRecord:
    """One IMU recording after cleaning.

    Attributes:
        path: the source file.
        t_ms: float64 (N,) strictly increasing timestamps, ms.
        x: float32 (6, N) samples, rows in :data:`CHANNELS` order.
        n_rows: data rows in the file (before cleaning).
        n_nan: rows dropped because the timestamp or a channel was NaN/empty.
        n_duplicates: rows dropped because their timestamp equalled an earlier row's (the first is kept).
        n_out_of_order: rows whose timestamp was below the previous row's (the rows were then sorted).
        nan_t_ms: float64 (K,) sorted timestamps of the rows dropped for a NaN/empty channel value (rows whose
            timestamp itself is missing cannot be placed and are only counted), so a window can count them.
    """

    path: str
    t_ms: np.ndarray
    x: np.ndarray
    n_rows: int
    n_nan: int
    n_duplicates: int
    n_out_of_order: int
    nan_t_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))

    @property
    def rate_hz(self) -> float:
        """Median sampling rate (Hz), from the median interval; NaN with fewer than two samples."""
        return 1000.0 / float(np.median(np.diff(self.t_ms))) if len(self.t_ms) > 1 else math.nan


def _normalise(name: str) -> str:
    return name.strip().strip('"').strip("'").strip().lower().replace(" ", "_")


def read_imu_csv(path: str | pathlib.Path) -> ImuRecord:
    """Read an Ego4D-style IMU CSV into timestamps and samples.

    Columns are found by name (``canonical_timestamp_ms`` and :data:`CHANNELS`), so their order may change and
    extra columns (Ego4D's ``component_*``, ...) are ignored; header names are compared after stripping spaces
    and quotes and lower-casing (inner spaces become ``_``). Windows line endings and a UTF-8 BOM are accepted.
    Rows with a NaN or empty value in a used column are dropped and counted; rows are sorted by time (stable)
    if not monotonic; of rows with exactly equal timestamps the first (after sorting) is kept.

    Args:
        path: the CSV file.

    Returns:
        :class:`ImuRecord`.

    Raises:
        ValueError: unreadable file, a missing column, a non-numeric value or no valid row, naming the file.
    """
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8-sig")  # -sig: drop a BOM if present
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read IMU file ({exc})") from exc
    lines = io.StringIO(text, newline=None)  # universal newlines: CRLF and CR become \n
    header_line = lines.readline()
    header = [_normalise(h) for h in next(csv.reader([header_line]), [])]
    wanted = (TIME_COLUMN, *CHANNELS)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ValueError(f"{path}: missing IMU column(s) {missing} (header: {header})")
    cols = [header.index(c) for c in wanted]
    body = lines.read()
    if not body.strip():
        raise ValueError(f"{path}: no IMU rows")
    try:
        # Fast path: numpy's C parser, reading only the wanted columns (extra columns may be text).
        data = np.loadtxt(io.StringIO(body), delimiter=",", usecols=cols, dtype=np.float64, ndmin=2)
    except ValueError:
        data = _parse_slow(body, cols, path)  # empty fields (missing values) or quoted numbers
    if data.size == 0:
        data = np.zeros((0, len(wanted)), np.float64)
    n_rows = len(data)
    finite = np.isfinite(data).all(axis=1)
    nan_t = np.sort(data[~finite & np.isfinite(data[:, 0]), 0])
    data = data[finite]
    n_out_of_order = int(np.count_nonzero(np.diff(data[:, 0]) < 0))
    if n_out_of_order:
        data = data[np.argsort(data[:, 0], kind="stable")]
    keep = np.ones(len(data), bool)
    keep[1:] = np.diff(data[:, 0]) != 0
    data = data[keep]
    if len(data) == 0:
        raise ValueError(f"{path}: no valid IMU row ({n_rows} rows, {n_rows - int(finite.sum())} with NaN)")
    return ImuRecord(
        path=str(path), t_ms=np.ascontiguousarray(data[:, 0]), x=np.ascontiguousarray(data[:, 1:].T, np.float32),
        n_rows=n_rows, n_nan=n_rows - int(finite.sum()), n_duplicates=int((~keep).sum()),
        n_out_of_order=n_out_of_order, nan_t_ms=nan_t,
    )


def _parse_slow(body: str, cols: list[int], path: str | pathlib.Path) -> np.ndarray:
    """The csv module's parser, for what ``np.loadtxt`` refuses: empty fields read as NaN, quoted numbers."""
    rows = []
    for lineno, row in enumerate(csv.reader(io.StringIO(body)), start=2):
        if not row or all(not f.strip() for f in row):
            continue  # blank line
        try:
            rows.append([float(row[c]) if c < len(row) and row[c].strip() else math.nan for c in cols])
        except ValueError as exc:
            raise ValueError(f"{path}: line {lineno}: non-numeric IMU value ({exc})") from exc
    return np.asarray(rows, np.float64).reshape(-1, len(cols))


@dataclass(frozen=True)
class ImuWindow:
    """IMU resampled onto a uniform grid.

    Attributes:
        x: float32 (6, n) samples at ``grid_ms`` (linear interpolation between the two nearest samples).
        grid_ms: float64 (n,) ``t0_ms + k * 1000 / rate_hz``.
        max_gap_ms: the longest interval between consecutive source samples that overlaps
            ``[grid_ms[0], grid_ms[-1]]``; ``inf`` when the grid reaches beyond the recording (those grid points
            hold the first/last sample's value, nothing is extrapolated).
    """

    x: np.ndarray
    grid_ms: np.ndarray
    max_gap_ms: float


def resample_imu(t_ms: np.ndarray, x: np.ndarray, t0_ms: float, rate_hz: float, n: int) -> ImuWindow:
    """Linearly interpolate IMU samples onto ``n`` uniform times from ``t0_ms`` at ``rate_hz``.

    The COMODO default is 200 Hz for 5 s (``n = 1000``). Only the source samples around the window are touched,
    so windows of a long recording cost O(n) each (plus a binary search). The caller rejects windows whose
    ``max_gap_ms`` exceeds its limit: interpolation across a gap invents a straight line.

    Args:
        t_ms: float64 (N,) strictly increasing timestamps, ms (e.g. :attr:`ImuRecord.t_ms`).
        x: (C, N) samples (C = 6 for :data:`CHANNELS`).
        t0_ms: time of the first grid point, ms, on the same clock as ``t_ms``.
        rate_hz: grid rate, Hz (> 0).
        n: number of grid points (> 0).

    Returns:
        :class:`ImuWindow` with ``x`` float32 (C, n).

    Raises:
        ValueError: empty input, mismatched shapes, or a non-positive rate or ``n``.
    """
    t_ms = np.asarray(t_ms, np.float64)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != len(t_ms) or len(t_ms) == 0:
        raise ValueError(f"resample_imu: need x of shape (C, N) with N = len(t_ms) > 0, got {x.shape}, {len(t_ms)}")
    if rate_hz <= 0 or n <= 0:
        raise ValueError(f"resample_imu: rate_hz and n must be positive, got {rate_hz}, {n}")
    grid = t0_ms + np.arange(n, dtype=np.float64) * (1000.0 / rate_hz)
    t1 = grid[-1]
    # The source samples that bracket the grid: the last one at or before t0 to the first one at or after t1.
    lo = max(int(np.searchsorted(t_ms, t0_ms, side="right")) - 1, 0)
    hi = min(int(np.searchsorted(t_ms, t1, side="left")) + 1, len(t_ms))
    ts, xs = t_ms[lo:hi], x[:, lo:hi].astype(np.float64)
    if t0_ms < t_ms[0] or t1 > t_ms[-1]:
        max_gap = math.inf
    else:
        max_gap = float(np.diff(ts).max()) if len(ts) > 1 else 0.0
    out = np.empty((x.shape[0], n), np.float32)
    for c in range(x.shape[0]):
        out[c] = np.interp(grid, ts, xs[c])
    return ImuWindow(x=out, grid_ms=grid, max_gap_ms=max_gap)
