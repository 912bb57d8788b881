"""Video frames by presentation time (PyAV): probe a file, list frame times, decode the frames shown at given times.

Every time in this module is a float in **milliseconds on the video's own presentation clock**: a frame's
PTS times the stream's time base, times 1000, *not* shifted by the stream's start time. A file whose first
frame is presented at 1.5 s has frame times starting at 1500.0 (``VideoInfo.start_ms``). This is the clock
the COMODO pipeline aligns IMU to (IMU time + offset = video time); nothing here ever computes a time as
``index / nominal fps`` (real recordings drop frames, have variable frame rates and B-frames).

Which frame is "the frame at time t": the one being **presented** at t, i.e. the last frame whose PTS is
``<= t``. Its presentation interval is ``[pts_i, pts_{i+1})``; the last frame's interval ends at its PTS
plus its packet duration (else the median frame interval), ``VideoInfo.end_ms``. Times before the first
frame or at/after ``end_ms`` raise ``ValueError``: a window that needs them cannot be built.

Timestamps: a packet or decoded frame whose PTS is missing (``None``: some raw or badly muxed streams) is
placed by its DTS; a decoded frame with neither gets the previous frame's time plus the median frame interval
(an estimate, so that it is not dropped); a packet with neither is not listed by :func:`frame_times_ms`.
Decoded frames whose time does not advance past the previous one (a broken file) are skipped and counted
(``DecodeStats.skipped``).

Rotation: frames are returned as stored; ``VideoInfo.rotation_deg`` reports the display-matrix rotation
(counter-clockwise degrees, e.g. phone videos recorded upright) for the caller to apply with ``np.rot90``.

Audio and other streams are ignored. Unreadable, corrupt or truncated files raise ``ValueError`` naming the
file.
"""

from __future__ import annotations

import math
import os
import pathlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

# Frame intervals that differ from the median by more than this are "variable". 1 ms tolerates the 33/34 ms
# alternation of 29.97 fps in a millisecond time base, which is a constant rate.
VFR_TOLERANCE_MS = 1.0

# How far beyond the last decoded frame a request may start and still be served by decoding forward instead
# of seeking (consecutive windows of one recording). A seek costs at most one GOP of decoding.
CONTINUE_MS = 1000.0

# A seek may land after the requested time: MPEG-TS seeks by DTS and may land on a non-keyframe (decoding then
# starts at the next keyframe), and an open-GOP keyframe's DTS precedes frames presented before it. Such a request
# seeks again this much earlier, doubling the distance each time (up to SEEK_RETRIES seeks), before decoding from
# the start of the file, which on a long file would make overlapping windows cost O(file) each.
SEEK_BACKOFF_MS = 1000.0
SEEK_RETRIES = 6


@dataclass(frozen=True)
class VideoInfo:
    """What a video file says about its first video stream. Times in ms on the presentation clock.

    Attributes:
        path: the file.
        width, height: coded frame size in pixels (before rotation).
        time_base: the stream's time base (seconds per PTS tick).
        start_ms: time of the first presented frame.
        end_ms: end of the last frame's presentation interval.
        duration_ms: ``end_ms - start_ms``.
        n_frames: number of timestamped video packets (= frames) in the file.
        average_fps: frames per second averaged over the stream (container metadata), ``None`` if unknown.
        real_fps: FFmpeg's guess of the lowest rate all timestamps fit (``guessed_rate``), ``None`` if unknown.
        variable_frame_rate: whether frame intervals differ from their median by more than ``VFR_TOLERANCE_MS``.
        rotation_deg: display rotation, counter-clockwise degrees in [0, 360) (0 when absent; a phone held
            upright, FFmpeg's ``rotate=90``, is 270); frames are *not* rotated.
        codec: decoder name, e.g. ``"h264"``.
        has_audio: whether the container also holds an audio stream (ignored by this module).
    """

    path: str
    width: int
    height: int
    time_base: Fraction
    start_ms: float
    end_ms: float
    duration_ms: float
    n_frames: int
    average_fps: float | None
    real_fps: float | None
    variable_frame_rate: bool
    rotation_deg: int
    codec: str
    has_audio: bool


@dataclass
class DecodeStats:
    """Counters a caller may pass to :func:`frames_at` / :meth:`VideoReader.frames_at` to see what a request cost.

    Attributes:
        decoded: frames that came out of the decoder (converted to RGB or not).
        converted: frames converted to RGB arrays (one per distinct returned frame).
        seeks: container seeks.
        skipped: decoded frames dropped because their time did not advance.
    """

    decoded: int = 0
    converted: int = 0
    seeks: int = 0
    skipped: int = 0


def _open(path: str | pathlib.Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:  # missing file: OSError; truncated MP4 (no moov): InvalidDataError
        raise ValueError(f"{path}: cannot open video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: no video stream")
    return container


def _ms(ticks: int, time_base: Fraction) -> float:
    return float(ticks * time_base * 1000)


_SCANNED: OrderedDict[tuple[str, int, int, int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
_KEEP_SCANS = 8
_SCAN_LOCK = threading.Lock()


def _packet_ticks(container: av.container.InputContainer, path: str) -> tuple[np.ndarray, np.ndarray]:
    """PTS (DTS when PTS is missing) and duration, in ticks, of every video packet, sorted by PTS (read-only).

    Probing, listing frame times and opening a reader each need them; the packet scan reads the whole file,
    so the last few files' scans are kept, keyed by path, inode, size, modification and change times (a
    replaced file is scanned again, even one copied with its old size and modification time)."""
    try:
        st = os.stat(path)
        key: tuple[str, int, int, int, int] | None = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns,
                                                      st.st_ctime_ns)
    except OSError:
        key = None
    with _SCAN_LOCK:
        if key is not None and key in _SCANNED:
            _SCANNED.move_to_end(key)
            return _SCANNED[key]
    ticks, durations = _demux_ticks(container, path)
    ticks.flags.writeable = durations.flags.writeable = False
    if key is not None:
        with _SCAN_LOCK:
            _SCANNED[key] = (ticks, durations)
            while len(_SCANNED) > _KEEP_SCANS:
                _SCANNED.popitem(last=False)
    return ticks, durations


def _demux_ticks(container: av.container.InputContainer, path: str) -> tuple[np.ndarray, np.ndarray]:
    stream = container.streams.video[0]
    ticks, durations = [], []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the empty flush packet at the end
                continue
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None:
                continue  # no timestamp at all: nothing to place it by
            ticks.append(t)
            durations.append(packet.duration or 0)
    except av.FFmpegError as exc:
        raise ValueError(f"{path}: corrupt or truncated video ({exc})") from exc
    ticks_a = np.asarray(ticks, np.int64)
    order = np.argsort(ticks_a, kind="stable")  # B-frames: packets come in decode order, not presentation order
    return ticks_a[order], np.asarray(durations, np.int64)[order]


def _end_tick(ticks: np.ndarray, durations: np.ndarray) -> int:
    """End of the last frame's presentation interval: its PTS plus its duration (else the median interval)."""
    last = int(durations[-1])
    if last <= 0:
        last = int(np.median(np.diff(ticks))) if len(ticks) > 1 else 1
    return int(ticks[-1]) + last


def frame_times_ms(path: str | pathlib.Path) -> np.ndarray:
    """Presentation time of every video frame, from the container's packets (no image is decoded).

    Args:
        path: a video file (any container/codec FFmpeg reads).

    Returns:
        float64 (N,) strictly increasing times in ms on the presentation clock (PTS x time base, not shifted by
        the start time). A packet without PTS is placed by its DTS; one with neither is left out; duplicate
        times are listed once.

    Raises:
        ValueError: the file cannot be opened, has no video stream or its packets cannot be read.
    """
    container = _open(path)
    try:
        tb = container.streams.video[0].time_base
        ticks, _ = _packet_ticks(container, str(path))
        return np.array([_ms(int(t), tb) for t in np.unique(ticks)], np.float64)
    finally:
        container.close()


def probe_video(path: str | pathlib.Path) -> VideoInfo:
    """Read a video's stream parameters and frame timing, decoding at most one frame.

    Demuxes every packet (cheap: no decoding) for the exact start, end, frame count and whether the rate is
    variable, rather than trusting container metadata, often absent or wrong for phone recordings.

    Args:
        path: a video file.

    Returns:
        :class:`VideoInfo`.

    Raises:
        ValueError: unreadable/truncated file, no video stream or no timestamped frame.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        tb = stream.time_base
        ticks, durations = _packet_ticks(container, str(path))
        if len(ticks) == 0:
            raise ValueError(f"{path}: video stream has no timestamped frames")
        intervals = np.diff(ticks) * float(tb) * 1000
        vfr = bool(len(intervals) and np.abs(intervals - np.median(intervals)).max() > VFR_TOLERANCE_MS)
        start, end = _ms(int(ticks[0]), tb), _ms(_end_tick(ticks, durations), tb)
        avg = stream.average_rate
        guessed = getattr(stream, "guessed_rate", None)
        return VideoInfo(
            path=str(path), width=stream.codec_context.width, height=stream.codec_context.height, time_base=tb,
            start_ms=start, end_ms=end, duration_ms=end - start, n_frames=len(ticks),
            average_fps=float(avg) if avg else None, real_fps=float(guessed) if guessed else None,
            variable_frame_rate=vfr, rotation_deg=_rotation(container, stream), codec=stream.codec_context.name,
            has_audio=bool(container.streams.audio),
        )
    finally:
        container.close()


def _rotation(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Display rotation, counter-clockwise degrees in [0, 360): the legacy ``rotate`` metadata tag (older
    FFmpeg), else the first frame's display matrix (``VideoFrame.rotation``, recent PyAV). Decodes at most one
    frame.

    The tag counts clockwise (``rotate=90`` is a phone held upright, shown turned 90 degrees clockwise) and the
    display matrix counter-clockwise (the same file gives -90), so the tag is negated."""
    tag = stream.metadata.get("rotate")
    if tag is not None:
        try:
            return -int(float(tag)) % 360 or 0
        except ValueError:
            pass
    try:
        container.seek(0, stream=stream, backward=True)
        for frame in container.decode(stream):
            return int(round(getattr(frame, "rotation", 0) or 0)) % 360
    except av.FFmpegError:
        pass  # rotation is informational; a decoding problem surfaces in frames_at
    return 0


class VideoReader:
    """An open video serving many :meth:`frames_at` requests (e.g. consecutive windows of one recording).

    Keeps the container and decoder open: a request whose earliest time is at or up to ``CONTINUE_MS`` after
    the last decoded frame continues decoding forward; any other request seeks. Not thread-safe.

    Args:
        path: a video file.

    Raises:
        ValueError: the file cannot be opened or has no video stream.
    """

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = str(path)
        self._container = _open(path)
        self._stream = self._container.streams.video[0]
        self._tb = self._stream.time_base
        self._frames: Iterator[tuple[float, av.VideoFrame]] | None = None  # the decoding in progress
        self._last: tuple[float, av.VideoFrame] | None = None  # last frame taken from self._frames
        self._end_ms: float | None = None
        self._first_pts_ms = 0.0
        self._last_pts_ms = 0.0
        self._interval_ms = 0.0

    def close(self) -> None:
        """Close the file."""
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timing(self) -> float:
        """End of the last frame's interval in ms; also sets the last packet's time and the median frame
        interval (one packet scan on a second handle, so our decoding position is untouched; cached)."""
        if self._end_ms is None:
            container = _open(self.path)
            try:
                ticks, durations = _packet_ticks(container, self.path)
            finally:
                container.close()
            if len(ticks) == 0:
                raise ValueError(f"{self.path}: video stream has no timestamped frames")
            self._end_ms = _ms(_end_tick(ticks, durations), self._tb)
            self._first_pts_ms = _ms(int(ticks[0]), self._tb)
            self._last_pts_ms = _ms(int(ticks[-1]), self._tb)
            self._interval_ms = float(np.median(np.diff(ticks))) * float(self._tb) * 1000 if len(ticks) > 1 else 0.0
        return self._end_ms

    def _decode_from(self, t_ms: float, stats: DecodeStats) -> Iterator[tuple[float, av.VideoFrame]]:
        """Seek to the keyframe at or before ``t_ms`` (``-inf``: the start) and yield (time ms, frame) in
        presentation order."""
        if math.isinf(t_ms):  # the very first frame (start times may be negative with edit lists)
            offset = min(0, self._stream.start_time or 0)
        else:
            offset = math.floor(t_ms / 1000 / self._tb)
        try:
            self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
        except av.FFmpegError as exc:
            raise ValueError(f"{self.path}: seek to {t_ms:.1f} ms failed ({exc})") from exc
        stats.seeks += 1
        prev: float | None = None
        try:
            # The decoder emits frames in presentation order (it reorders B-frames itself).
            for frame in self._container.decode(self._stream):
                stats.decoded += 1
                ticks = frame.pts if frame.pts is not None else getattr(frame, "dts", None)
                if ticks is not None:
                    t = _ms(ticks, self._tb)
                elif prev is not None:
                    t = prev + self._interval_ms  # no timestamp at all: the next slot after the previous frame
                else:
                    stats.skipped += 1  # nothing to place it by
                    continue
                if prev is not None and t <= prev:
                    stats.skipped += 1
                    continue
                prev = t
                yield t, frame
        except av.FFmpegError as exc:
            raise ValueError(f"{self.path}: corrupt or truncated video after {prev} ms ({exc})") from exc

    def frames_at(
        self,
        times_ms: Sequence[float] | np.ndarray,
        size: tuple[int, int] | None = None,
        stats: DecodeStats | None = None,
        pixel_format: str = "rgb24",
    ) -> tuple[np.ndarray, np.ndarray]:
        """The frames presented at the given times: for each t, the last frame with PTS <= t.

        Decodes only from the keyframe at or before the earliest time to the first frame after the latest
        one; each returned frame is converted to RGB once, however many times map to it. A seek that lands after
        the earliest time (MPEG-TS, open GOPs) seeks again ``SEEK_BACKOFF_MS`` earlier, then twice that, ...,
        and decodes from the start of the file only as the last resort; the frames returned do not depend on
        where decoding started.

        Args:
            times_ms: (F,) times in ms on the presentation clock, any order, repeats allowed.
            size: ``(width, height)`` to resize to (swscale, bicubic), or ``None`` for the stored size.
            stats: optional :class:`DecodeStats` whose counters are incremented.
            pixel_format: ``"rgb24"`` or ``"gray"`` (the luma plane only: cheaper when colour is not needed).

        Returns:
            frames: uint8 (F, H, W, 3) RGB (``(F, H, W)`` for ``"gray"``), in the order of ``times_ms``.
            pts_ms: float64 (F,) presentation time of each returned frame (``<=`` the requested time).

        Raises:
            ValueError: a time is non-finite, before the first frame or at/after the end of the last one, or the
                file is corrupt/truncated before the requested frames.
        """
        stats = stats if stats is not None else DecodeStats()
        times = np.asarray(times_ms, np.float64).reshape(-1)
        if len(times) == 0:
            cc = self._stream.codec_context
            h, w = (size[1], size[0]) if size else (cc.height, cc.width)
            shape = (0, h, w) if pixel_format == "gray" else (0, h, w, 3)
            return np.zeros(shape, np.uint8), np.zeros(0, np.float64)
        if not np.all(np.isfinite(times)):
            raise ValueError(f"{self.path}: non-finite requested time")
        end_ms = self._timing()
        if times.max() >= end_ms:
            raise ValueError(f"{self.path}: time {times.max():.1f} ms is at/after the end of the video "
                             f"({end_ms:.1f} ms)")
        order = np.argsort(times, kind="stable")
        chosen = self._assign(times[order], stats)
        if chosen is None:  # the seek landed after the earliest time: seek earlier
            chosen = self._seek_earlier(times[order], stats)
        cache: dict[float, np.ndarray] = {}
        frames: list[np.ndarray] = [np.empty(0, np.uint8)] * len(times)
        pts = np.empty(len(times), np.float64)
        kw = {"width": size[0], "height": size[1], "interpolation": "BICUBIC"} if size else {}
        for k, (t, frame) in zip(order, chosen, strict=True):
            if t not in cache:
                cache[t] = _luma(frame) if pixel_format == "gray" and not size else frame.to_ndarray(
                    format=pixel_format, **kw)
                stats.converted += 1
            pts[k] = t
            frames[k] = cache[t]
        return np.stack(frames), pts

    def _seek_earlier(self, times: np.ndarray, stats: DecodeStats) -> list[tuple[float, av.VideoFrame]]:
        """For sorted ``times`` whose seek landed too late: seek ``SEEK_BACKOFF_MS`` before the earliest time,
        doubling the distance while the decoder still starts too late, and decode from the start of the file
        after ``SEEK_RETRIES`` tries or once the target is before the first frame.

        Args:
            times: sorted requested times, ms.
            stats: counters to increment.

        Raises:
            ValueError: even decoding from the start gives no frame at the earliest time.
        """
        back = SEEK_BACKOFF_MS
        for _ in range(SEEK_RETRIES):
            target = float(times[0]) - back
            if target <= self._first_pts_ms:
                break
            self._frames, self._last = self._decode_from(target, stats), None
            chosen = self._assign(times, stats, resume=True)
            if chosen is not None:
                return chosen
            back *= 2
        self._frames, self._last = self._decode_from(-math.inf, stats), None
        chosen = self._assign(times, stats, resume=True)
        if chosen is None:
            raise ValueError(f"{self.path}: no frame is presented at {times[0]:.1f} ms "
                             "(before the first frame, or no decodable frame)")
        return chosen

    def _assign(
        self, times: np.ndarray, stats: DecodeStats, resume: bool = False
    ) -> list[tuple[float, av.VideoFrame]] | None:
        """For sorted ``times``, the (time, frame) presented at each; ``None`` when decoding started too late."""
        first = float(times[0])
        if not resume:
            resume = self._frames is not None and self._last is not None and 0 <= first - self._last[0] <= CONTINUE_MS
        if not resume:
            self._frames, self._last = self._decode_from(first, stats), None
        prev = self._last
        out: list[tuple[float, av.VideoFrame]] = []
        i = 0
        for t, frame in self._frames:
            # ``prev`` is presented on [prev.t, t): every requested time below t belongs to it.
            while i < len(times) and times[i] < t:
                if prev is None:
                    return None
                out.append(prev)
                i += 1
            prev = (t, frame)
            self._last = prev
            if i == len(times):
                return out
        # End of stream. The last frame is presented until end_ms (checked by frames_at), but only if the
        # decoder really reached the last packet; otherwise the file is corrupt or truncated.
        self._frames = None
        if prev is None:
            return None
        if prev[0] < self._last_pts_ms:
            raise ValueError(f"{self.path}: decoding stopped at {prev[0]:.1f} ms before the requested "
                             f"{times[-1]:.1f} ms (truncated or corrupt file)")
        out.extend([prev] * (len(times) - i))
        return out


# Planar YUV layouts whose first plane is the luma at full size: gray frames are a copy of it, no swscale pass.
_PLANAR_YUV = ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "nv21")


def _luma(frame: av.VideoFrame) -> np.ndarray:
    """(H, W) uint8 luma of ``frame``: its Y plane when 8-bit planar YUV (full-range or not, as stored), else a
    conversion."""
    if frame.format.name not in _PLANAR_YUV:
        return frame.to_ndarray(format="gray")
    plane = frame.planes[0]
    rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width].copy()


def frames_at(
    path: str | pathlib.Path,
    times_ms: Sequence[float] | np.ndarray,
    size: tuple[int, int] | None = None,
    stats: DecodeStats | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The frames presented at the given times, from one file (opens, decodes what is needed, closes).

    For many windows of one recording use :class:`VideoReader`, which opens the file once.

    Args:
        path: a video file.
        times_ms: (F,) times in ms on the presentation clock: for each t, the last frame with PTS <= t.
        size: ``(width, height)`` to resize to, or ``None``.
        stats: optional :class:`DecodeStats` counting decoded frames and seeks.

    Returns:
        frames: uint8 (F, H, W, 3) RGB; pts_ms: float64 (F,) the presentation time of each returned frame.

    Raises:
        ValueError: see :meth:`VideoReader.frames_at`.
    """
    with VideoReader(path) as reader:
        return reader.frames_at(times_ms, size=size, stats=stats)
