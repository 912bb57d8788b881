"""IMU recordings: read Ego4D-style CSV files and resample them onto uniform windows (pure numpy).

Units: timestamps are float64 **milliseconds** on the IMU's own clock (Ego4D's ``canonical_timestamp_ms``);
accelerometer in m/s^2 and gyroscope in rad/s, as stored (nothing is rescaled). Samples are float32 arrays
of shape (6, N), channels in :data:`CHANNELS` order (accel x/y/z, gyro x/y/z), the layout of the COMODO
shards' ``imu.npy``.
"""

from __future__ import annotations

import csv
import itertools
import math
import pathlib
from dataclasses import dataclass, field
from typing import TextIO

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
        n_duplicates: rows dropped because their timestamp equalled an earlier row's while their values differ
            (the first, in file order, is kept): two different readings claim one instant.
        n_out_of_order: displaced rows: rows whose timestamp is below the largest timestamp of the rows before
            them in the file (the rows were then sorted). A clock that steps back displaces every row until it
            catches up again, not just the one row at the step.
        nan_t_ms: float64 (K,) sorted timestamps of the rows dropped for a NaN/empty channel value (rows whose
            timestamp itself is missing cannot be placed and are only counted), so a window can count them.
        n_exact_duplicates: rows dropped because an earlier row had the same timestamp *and* the same values (a
            logger writing a row twice): harmless, so not counted in ``n_duplicates`` nor ``n_out_of_order``.
        max_backstep_ms: the largest step back in time between consecutive rows in file order (0 when the
            timestamps never decrease), ms.
        backstep_at_ms: the timestamp of the row just before that step (NaN when there is none), ms.
    """

    path: str
    t_ms: np.ndarray
    x: np.ndarray
    n_rows: int
    n_nan: int
    n_duplicates: int
    n_out_of_order: int
    nan_t_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    n_exact_duplicates: int = 0
    max_backstep_ms: float = 0.0
    backstep_at_ms: float = math.nan

    @property
    def rate_hz(self) -> float:
        """Median sampling rate (Hz), from the median interval; NaN with fewer than two samples."""
        return 1000.0 / self.median_interval_ms

    @property
    def median_interval_ms(self) -> float:
        """Median interval between consecutive (sorted) samples, ms; NaN with fewer than two samples."""
        return float(np.median(np.diff(self.t_ms))) if len(self.t_ms) > 1 else math.nan


def _normalise(name: str) -> str:
    return name.strip().strip('"').strip("'").strip().lower().replace(" ", "_")


# Data lines parsed per block: bounds the text held at once (~10 MB of Python strings for an Ego4D CSV) while
# numpy's C parser still does the work; a block numpy refuses (an empty field, quoted numbers) goes through the csv
# module on its own.
CSV_BLOCK_LINES = 65536


def read_imu_csv(path: str | pathlib.Path) -> ImuRecord:
    """Read an Ego4D-style IMU CSV into timestamps and samples.

    Columns are found by name (``canonical_timestamp_ms`` and :data:`CHANNELS`), so their order may change and
    extra columns (Ego4D's ``component_*``, ...) are ignored; header names are compared after stripping spaces
    and quotes and lower-casing (inner spaces become ``_``). Windows line endings and a UTF-8 BOM are accepted.
    The file is streamed in blocks of :data:`CSV_BLOCK_LINES` lines, so memory holds the parsed numbers and one
    block of text, never the whole text. Cleaning: rows with a NaN or empty value in a used column are dropped
    and counted; rows repeating an earlier row exactly (time and values) are dropped as harmless; rows are
    sorted by time (stable) if not monotonic, counting the displaced rows and the largest step back; of rows
    with equal timestamps but different values the first (in file order) is kept and the others counted.

    Args:
        path: the CSV file.

    Returns:
        :class:`ImuRecord`.

    Raises:
        ValueError: unreadable file, a missing column, a non-numeric value or no valid row, naming the file.
    """
    try:
        # -sig: drop a BOM if present; newline=None: universal newlines (CRLF and CR become \n).
        with open(path, encoding="utf-8-sig", newline=None) as fh:
            header = [_normalise(h) for h in next(csv.reader([fh.readline()]), [])]
            wanted = (TIME_COLUMN, *CHANNELS)
            missing = [c for c in wanted if c not in header]
            if missing:
                raise ValueError(f"{path}: missing IMU column(s) {missing} (header: {header})")
            data = _read_blocks(fh, [header.index(c) for c in wanted], path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read IMU file ({exc})") from exc
    n_rows = len(data)
    finite = np.isfinite(data).all(axis=1)
    nan_t = np.sort(data[~finite & np.isfinite(data[:, 0]), 0])
    data, n_exact = _drop_exact_duplicates(data[finite])
    n_displaced, backstep, back_at = _clock_steps(data[:, 0])
    if n_displaced:
        data = data[np.argsort(data[:, 0], kind="stable")]
    keep = np.ones(len(data), bool)
    keep[1:] = np.diff(data[:, 0]) != 0
    data = data[keep]
    if len(data) == 0:
        raise ValueError(f"{path}: no valid IMU row ({n_rows} rows, {n_rows - int(finite.sum())} with NaN)")
    return ImuRecord(
        path=str(path), t_ms=np.ascontiguousarray(data[:, 0]), x=np.ascontiguousarray(data[:, 1:].T, np.float32),
        n_rows=n_rows, n_nan=n_rows - int(finite.sum()), n_duplicates=int((~keep).sum()),
        n_out_of_order=n_displaced, nan_t_ms=nan_t, n_exact_duplicates=n_exact, max_backstep_ms=backstep,
        backstep_at_ms=back_at,
    )


def _read_blocks(fh: TextIO, cols: list[int], path: str | pathlib.Path) -> np.ndarray:
    """(rows, len(cols)) float64 of the data lines left in ``fh``, block by block.

    Args:
        fh: the open text file, positioned after the header line.
        cols: the column indices to read, in output order.
        path: the file, for messages.
    """
    blocks, lineno, seen_text = [], 2, False
    while True:
        lines = list(itertools.islice(fh, CSV_BLOCK_LINES))
        if not lines:
            break
        if not any(line.strip() for line in lines):
            lineno += len(lines)
            continue  # only blank lines (np.loadtxt would warn about an empty input)
        seen_text = True
        try:
            # Fast path: numpy's C parser, reading only the wanted columns (extra columns may be text).
            block = np.loadtxt(lines, delimiter=",", usecols=cols, dtype=np.float64, ndmin=2)
        except ValueError:
            block = _parse_slow(lines, cols, path, lineno)  # empty fields (missing values) or quoted numbers
        blocks.append(block.reshape(-1, len(cols)))
        lineno += len(lines)
    if not seen_text:
        raise ValueError(f"{path}: no IMU rows")
    return np.concatenate(blocks) if blocks else np.zeros((0, len(cols)), np.float64)


def _parse_slow(lines: list[str], cols: list[int], path: str | pathlib.Path, first_lineno: int) -> np.ndarray:
    """The csv module's parser, for what ``np.loadtxt`` refuses: empty fields read as NaN, quoted numbers.

    Args:
        lines: one block of data lines.
        cols: the column indices to read.
        path: the file, for messages.
        first_lineno: the file line number of ``lines[0]`` (the header is line 1).
    """
    rows = []
    for lineno, row in enumerate(csv.reader(lines), start=first_lineno):
        if not row or all(not f.strip() for f in row):
            continue  # blank line
        try:
            rows.append([float(row[c]) if c < len(row) and row[c].strip() else math.nan for c in cols])
        except ValueError as exc:
            raise ValueError(f"{path}: line {lineno}: non-numeric IMU value ({exc})") from exc
    return np.asarray(rows, np.float64).reshape(-1, len(cols))


def _drop_exact_duplicates(data: np.ndarray) -> tuple[np.ndarray, int]:
    """``data`` (rows: time, channels) without the rows that repeat an earlier row exactly; (rows, dropped).

    Only rows sharing their timestamp with another row are compared (usually none), so this costs one sort.

    Args:
        data: (N, 7) finite rows in file order.
    """
    t = data[:, 0]
    order = np.argsort(t, kind="stable")
    same = t[order][1:] == t[order][:-1]
    if not same.any():
        return data, 0
    shared = np.zeros(len(t), bool)
    shared[1:] |= same
    shared[:-1] |= same
    idx = order[shared]  # rows in a group of equal times; within a group still in file order (stable sort)
    _, first = np.unique(data[idx], axis=0, return_index=True)  # first occurrence of each distinct row
    repeat = np.ones(len(idx), bool)
    repeat[first] = False
    return np.delete(data, idx[repeat], axis=0), int(repeat.sum())


def _clock_steps(t: np.ndarray) -> tuple[int, float, float]:
    """(displaced rows, largest step back ms, time before that step ms) of timestamps in file order.

    A displaced row is one below the running maximum of the rows before it: counting only the rows below their
    predecessor would count a clock that jumps back by 10 s as *one* bad row, though every row until the clock
    catches up interleaves with rows already seen.

    Args:
        t: float64 (N,) finite timestamps in file order.
    """
    if len(t) < 2:
        return 0, 0.0, math.nan
    displaced = int(np.count_nonzero(t[1:] < np.maximum.accumulate(t)[:-1]))
    steps = np.diff(t)
    worst = int(np.argmin(steps))
    if steps[worst] >= 0:
        return displaced, 0.0, math.nan
    return displaced, float(-steps[worst]), float(t[worst])


@dataclass(frozen=True)
class ImuWindow:
    """IMU resampled onto a uniform grid.

    Attributes:
        x: float32 (6, n) samples at ``grid_ms`` (linear interpolation between the two nearest samples, of the
            low-passed source when it is much faster than the grid: :func:`resample_imu`).
        grid_ms: float64 (n,) ``t0_ms + k * 1000 / rate_hz``.
        max_gap_ms: the longest interval between consecutive source samples that overlaps
            ``[grid_ms[0], grid_ms[-1]]``; ``inf`` when the grid reaches beyond the recording (those grid points
            hold the first/last sample's value, nothing is extrapolated).
    """

    x: np.ndarray
    grid_ms: np.ndarray
    max_gap_ms: float


# Anti-aliasing (see resample_imu). The source is low-passed when its rate exceeds the target's by this factor:
# below it (Ego4D's ~200 Hz jittering around a 200 Hz grid) interpolation only moves samples by a fraction of an
# interval and a filter would just smear them.
ANTIALIAS_RATIO = 1.2
PASSBAND_EDGE = 0.8  # share of the target Nyquist kept flat (80 Hz for a 200 Hz grid)
STOPBAND_DB = 60.0  # attenuation from the target Nyquist on: an aliased component ends 1000x weaker
FILTER_GAP_INTERVALS = 4.0  # a longer interval between source samples splits the filtering (no filter across it)


def lowpass_taps(source_hz: float, target_hz: float) -> np.ndarray:
    """Zero-phase (odd-length, symmetric) Kaiser-windowed sinc low-pass for resampling ``source_hz`` to
    ``target_hz``: flat to ``PASSBAND_EDGE`` x the target Nyquist, ``STOPBAND_DB`` down from the target Nyquist.

    Args:
        source_hz: the (uniform) rate the filter runs at, Hz.
        target_hz: the rate the output will be sampled at, Hz (< ``source_hz``).

    Returns:
        float64 (L,) taps summing to 1 (a constant passes exactly).
    """
    nyquist = target_hz / 2.0
    width = (1.0 - PASSBAND_EDGE) * nyquist / source_hz  # transition band, cycles per source sample
    cutoff = (1.0 + PASSBAND_EDGE) / 2.0 * nyquist / source_hz  # -6 dB point, cycles per sample
    # Kaiser's design formulas for the length and the window's beta.
    n = int(math.ceil((STOPBAND_DB - 7.95) / (2.285 * 2.0 * math.pi * width))) + 1
    n += 1 - n % 2  # odd: a whole-sample delay, removed by centring, so the filter has zero phase
    beta = 0.1102 * (STOPBAND_DB - 8.7)
    k = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    taps = 2.0 * cutoff * np.sinc(2.0 * cutoff * k) * np.kaiser(n, beta)
    return taps / taps.sum()


def _lowpassed(ts: np.ndarray, xs: np.ndarray, step_ms: float, taps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``xs`` low-passed: each run of samples without a gap is interpolated onto a uniform ``step_ms`` grid,
    padded by odd reflection at its ends and filtered with ``taps``; runs are filtered separately, so nothing
    leaks across a hole in the recording. Returns the runs' uniform times and filtered values, concatenated.

    Args:
        ts: float64 (M,) increasing source times, ms.
        xs: float64 (C, M) source samples.
        step_ms: the source's median interval, ms.
        taps: :func:`lowpass_taps` for the source rate ``1000 / step_ms``.
    """
    half = len(taps) // 2
    breaks = np.flatnonzero(np.diff(ts) > FILTER_GAP_INTERVALS * step_ms) + 1
    out_t, out_x = [], []
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(ts)], strict=True):
        run_t = ts[a:b]
        grid = run_t[0] + np.arange(int(math.floor((run_t[-1] - run_t[0]) / step_ms + 1e-9)) + 1) * step_ms
        filtered = np.empty((xs.shape[0], len(grid)))
        for c in range(xs.shape[0]):
            v = np.interp(grid, run_t, xs[c, a:b])
            # Odd reflection continues the run's level and slope past its ends (zero padding would add a step).
            padded = np.pad(v, half, mode="reflect", reflect_type="odd") if len(v) > 1 else np.full(2 * half + 1, v)
            filtered[c] = np.convolve(padded, taps, mode="valid")
        out_t.append(grid)
        out_x.append(filtered)
    return np.concatenate(out_t), np.concatenate(out_x, axis=1)


def resample_imu(t_ms: np.ndarray, x: np.ndarray, t0_ms: float, rate_hz: float, n: int) -> ImuWindow:
    """Resample IMU samples onto ``n`` uniform times from ``t0_ms`` at ``rate_hz``.

    The COMODO default is 200 Hz for 5 s (``n = 1000``). Only the source samples around the window are touched,
    so windows of a long recording cost O(n) each (plus a binary search). The caller rejects windows whose
    ``max_gap_ms`` exceeds its limit: interpolation across a gap invents a straight line.

    Near the target rate (source <= ``ANTIALIAS_RATIO`` x ``rate_hz``, e.g. Ego4D's ~200 Hz) this is linear
    interpolation between the two nearest source samples. A faster source (e.g. a 1 kHz Aria IMU) is first
    low-passed below the target Nyquist (:func:`lowpass_taps`: zero phase, flat to 0.8 x Nyquist, -60 dB from
    it), as COMODO's ``torchaudio.functional.resample`` does, because decimating by interpolation alone folds
    vibration above the target Nyquist (130 Hz in 1 kHz data shows up at 70 Hz in 200 Hz data). The filter reads
    the source samples up to half its length beyond the window and never filters across an interval longer
    than ``FILTER_GAP_INTERVALS`` source intervals (the runs on either side are filtered separately).

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
    ts = t_ms[lo:hi]
    if t0_ms < t_ms[0] or t1 > t_ms[-1]:
        max_gap = math.inf
    else:
        max_gap = float(np.diff(ts).max()) if len(ts) > 1 else 0.0
    step = float(np.median(np.diff(ts))) if len(ts) > 2 else math.inf
    if 1000.0 / step > ANTIALIAS_RATIO * rate_hz:
        taps = lowpass_taps(1000.0 / step, rate_hz)
        a, b = max(lo - len(taps) // 2 - 1, 0), min(hi + len(taps) // 2 + 1, len(t_ms))
        ts, xs = _lowpassed(t_ms[a:b], x[:, a:b].astype(np.float64), step, taps)
    else:
        xs = x[:, lo:hi].astype(np.float64)
    out = np.empty((x.shape[0], n), np.float32)
    for c in range(x.shape[0]):
        out[c] = np.interp(grid, ts, xs[c])
    return ImuWindow(x=out, grid_ms=grid, max_gap_ms=max_gap)
