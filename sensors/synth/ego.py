"""Synthetic Ego4D ``v2``-style recordings: head-mounted video and IMU driven by one motion signal.

:func:`make_ego` writes::

    OUT/full_scale/{uid}.mp4     H.264 (libx264 through PyAV, B-frames, 1 s GOP), RGB scene seen by the camera
    OUT/imu/{uid}.csv            Ego4D columns (component_*, canonical_timestamp_ms, gyro_*, accl_*) at ~200 Hz
    OUT/clock_offsets.json       {uid: offset_ms} for every other recording (IMU time + offset = video time);
                                 the others are left out, so a pipeline has to estimate theirs
    OUT/labels.csv               uid,start_ms,end_ms,label: activity segments on the video clock
    OUT/ego4d_subset_ids.txt     every recording's uid, one a line (the released subset list's format)
    OUT/splits/{train,val,test}.txt
                                 uid<TAB>scenario a line (the released split files' format); the scenario is the
                                 activity covering most of the recording; about 70/10/20% of the recordings, at
                                 least one each from 3 recordings on, drawn from ``seed`` (:func:`split_of`)
    OUT/synth_truth.json         what the generator did, for tests only: every frame's PTS, every offset,
                                 IMU gaps, frame rate kind (a pipeline must not read it)

**One motion signal.** Each recording is a sequence of activities (:data:`ACTIVITIES`: still, walking,
turning, shaking, reaching, 1.5-3.5 s each) that define the head orientation (yaw, pitch, roll, rad) and a vertical
bob (m) on a 1 kHz grid of *true* (= video) time. The IMU is the body-frame specific force
``R^T (a + g)`` (m/s^2) and angular velocity (``R^T dR/dt``, rad/s) of that orientation ``R = Rz(yaw) Rx(pitch)
Ry(roll)`` (device axes: x right, y forward along the camera, z up), sampled every 5 ms +- jitter on the IMU
clock, with white noise and a small gyro bias, in the frame of the IMU, which each recording mounts turned by
up to 25 degrees about each body axis (~70 degrees in size "demo"; ``imu_mount`` in the truth file:
``v_imu = M^T v_body``).
The video frame at presentation time t is a 2-D view of a
large periodic procedural texture: the view is panned by ``-f * yaw`` horizontally, ``-f * pitch`` (plus the
bob) vertically and rotated by ``-roll`` (a pinhole camera turning in front of a distant wall, small angles).
So gyro energy and frame-difference energy rise and fall together, and a clock offset is recoverable by
cross-correlation. Signatures: still = tremor only; walking = ~2 Hz bob in accel z and pitch, sway in roll;
turning = steady yaw rate ~1 rad/s (pan); shaking = 3 Hz yaw oscillation (fast pans back and forth); reaching =
looking down at the hands and back up (~0.8 Hz pitch dips with a slight lean).

**Timing exercised.** Recording ``i``: ``i % 3 == 0`` constant 30 fps from PTS 0; ``i % 3 == 1`` variable frame
rate (intervals of 33-66 ms and a 400 ms dropout), an AAC audio stream and a 400 ms gap in its IMU at the same
moment (a device stall: the windows across it are rejected for the IMU gap and for the hole in the video);
``i % 3 == 2`` 30 fps from a non-zero start time. PTS are whole milliseconds in a 1/90000 time base. Every
recording has three IMU rows with a ``nan`` accelerometer value.

**Frame counter.** The top :data:`BARCODE_H` rows hold the frame's index as a :data:`BARCODE_BITS`-bit barcode
(white = 1), robust to H.264 loss; :func:`read_frame_index` decodes it. A pipeline should crop these rows.

Everything derives from ``seed``: timestamps, CSV and labels are byte-identical, and so are the decoded frames
and (with one PyAV/x264 build) the MP4 bytes. "small" (3 recordings x 12 s, 160x120) takes ~1.5 s on one core
and 1 MB; "medium" (6 x 30 s, 320x240) ~18 s and 12 MB; "large" and "demo" (12 x 60 s, 160x120) ~15 s.
"""

from __future__ import annotations

import csv
import hashlib
import json
import pathlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np

ACTIVITIES: tuple[str, ...] = ("still", "walking", "turning", "shaking", "reaching")
IMU_PERIOD_MS = 5.0  # ~200 Hz, as Ego4D's IMU
GRAVITY = 9.81
TIME_BASE = Fraction(1, 90000)
BARCODE_BITS = 16
BARCODE_H = 8
# Ego4D-like header: extra text columns, gyro before accel (readers must find columns by name).
IMU_HEADER = ("component_idx", "component_type", "component_name", "canonical_timestamp_ms",
              "component_timestamp_ms", "gyro_x", "gyro_y", "gyro_z", "accl_x", "accl_y", "accl_z")


@dataclass(frozen=True)
class EgoSize:
    """Dataset size: recordings, video duration (ms), frame width/height (px), texture side (px), and the largest
    turn (rad, about each body axis) of a recording's IMU mount."""

    n_recordings: int
    duration_ms: int
    width: int
    height: int
    texture: int
    mount_rad: float = 0.44


SIZES: dict[str, EgoSize] = {
    "small": EgoSize(n_recordings=3, duration_ms=12_000, width=160, height=120, texture=512),
    "medium": EgoSize(n_recordings=6, duration_ms=30_000, width=320, height=240, texture=1024),
    # Enough windows (~1400 of 1 s stride) for a probe to tell distilled from random students.
    "large": EgoSize(n_recordings=12, duration_ms=60_000, width=160, height=120, texture=512),
    # `distillkit demo`'s data: "large" with the IMU mounted turned by up to ~70 degrees about each axis, so raw IMU
    # axes differ a lot between recordings while the camera's view of the motion does not: the case video-to-IMU
    # distillation is for (docs/comodo.md "The demo": with "large"'s 25 degrees the gain was not reliable).
    "demo": EgoSize(n_recordings=12, duration_ms=60_000, width=160, height=120, texture=512, mount_rad=1.2),
}


def split_of(n: int, seed: int) -> list[str]:
    """The split ("train", "val", "test") of each of ``n`` recordings: ~70/10/20% as the released Ego4D split
    files (1110/162/316 videos, Breezelled/COMODO dataset/Ego4D/*.txt), at least one val and one test recording
    from 3 on, assigned by a permutation drawn from ``seed`` alone (the recordings' own draws stay as they were).

    Args:
        n: the number of recordings.
        seed: the dataset's seed.
    """
    n_test = max(1, round(0.2 * n)) if n >= 2 else 0
    n_val = max(1, round(0.1 * n)) if n >= 3 else 0
    order = np.random.default_rng([seed, 1000]).permutation(n)
    out = ["train"] * n
    for j, i in enumerate(order[: n_test + n_val]):
        out[int(i)] = "test" if j < n_test else "val"
    return out


def _uid(seed: int, i: int) -> str:
    return str(uuid.UUID(bytes=hashlib.md5(f"ego/{seed}/{i}".encode()).digest(), version=4))


def frame_times(kind: str, duration_ms: int, rng: np.random.Generator) -> np.ndarray:
    """Frame PTS in whole ms for a timing kind: "cfr" (30 fps from 0), "vfr" (33-66 ms steps, one 400 ms
    dropout, from 0) or "start" (30 fps from 1000-2000 ms). int64 (F,), strictly increasing."""
    if kind == "vfr":
        steps = rng.choice([33, 33, 33, 40, 50, 66], size=duration_ms // 33)
        steps[len(steps) // 2] = 400
        t = np.concatenate([[0], np.cumsum(steps)])
        return t[t < duration_ms].astype(np.int64)
    start = int(rng.integers(1000, 2000)) if kind == "start" else 0
    n = int(duration_ms * 30 // 1000)
    return start + np.floor(np.arange(n) * 1000 / 30).astype(np.int64)


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average of odd ``width`` samples, edges held (keeps the motion continuous across segments)."""
    pad = np.pad(x, (width // 2, width // 2), mode="edge")
    c = np.cumsum(np.concatenate([[0.0], pad]))
    return (c[width:] - c[:-width]) / width


def _schedule(t0: float, t1: float, rng: np.random.Generator) -> list[tuple[float, float, str]]:
    """Activity segments covering [t0, t1) ms, 1.5-3.5 s each, consecutive activities differ."""
    segs, t, last = [], t0, None
    while t < t1:
        act = str(rng.choice([a for a in ACTIVITIES if a != last]))
        d = float(rng.uniform(1500, 3500))
        segs.append((t, min(t + d, t1), act))
        t, last = t + d, act
    return segs


def motion(segs: list[tuple[float, float, str]], tt: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Head motion on the uniform ms grid ``tt`` (1 kHz): yaw/pitch/roll (rad) and bob (m, up), float64 (T,)."""
    ts = tt / 1000.0
    n = len(tt)
    yaw_rate, pitch, roll, yaw_osc, bob = (np.zeros(n) for _ in range(5))
    for a, b, act in segs:
        env = _smooth(((tt >= a) & (tt < b)).astype(np.float64), 201)  # 200 ms ramps between activities
        if act == "walking":
            f = rng.uniform(1.7, 2.2)
            ph = rng.uniform(0, 2 * np.pi)
            bob += env * 0.03 * np.sin(2 * np.pi * f * ts + ph)
            pitch += env * 0.03 * np.sin(2 * np.pi * f * ts + ph + 0.5)
            roll += env * 0.04 * np.sin(np.pi * f * ts + ph)
            yaw_rate += env * rng.uniform(-0.1, 0.1)
        elif act == "turning":
            yaw_rate += env * rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.2)
        elif act == "shaking":
            f = rng.uniform(2.5, 3.5)
            yaw_osc += env * 0.2 * np.sin(2 * np.pi * f * ts)
            pitch += env * 0.04 * np.sin(2 * np.pi * 0.7 * f * ts)
        elif act == "reaching":  # look down at the hands and back up, ~0.8 Hz, with a slight lean (bob)
            f = rng.uniform(0.6, 1.0)
            dip = 0.5 * (1 - np.cos(2 * np.pi * f * (ts - a / 1000.0)))
            pitch -= env * 0.25 * dip
            bob -= env * 0.02 * dip
    # Tremor and slow drift everywhere: low-passed noise (a still head is never perfectly still).
    # Three box passes ~ a Gaussian, whose derivative (the gyro) stays small: ~amp / width rad/ms.
    for arr, amp, w in ((pitch, 0.003, 61), (roll, 0.003, 61), (yaw_osc, 0.003, 61), (pitch, 0.03, 801)):
        noise = _smooth(_smooth(_smooth(rng.standard_normal(n), w), w), w)
        arr += amp * noise / (noise.std() + 1e-12)
    yaw = np.cumsum(yaw_rate) / 1000.0 + yaw_osc
    return {"yaw": yaw, "pitch": pitch, "roll": roll, "bob": bob}


def _rotations(m: dict[str, np.ndarray]) -> np.ndarray:
    """(T, 3, 3) body-to-world rotations R = Rz(yaw) Rx(pitch) Ry(roll)."""
    cy, sy = np.cos(m["yaw"]), np.sin(m["yaw"])
    cp, sp = np.cos(m["pitch"]), np.sin(m["pitch"])
    cr, sr = np.cos(m["roll"]), np.sin(m["roll"])
    o, z = np.ones_like(cy), np.zeros_like(cy)
    rz = np.stack([np.stack([cy, -sy, z], -1), np.stack([sy, cy, z], -1), np.stack([z, z, o], -1)], -2)
    rx = np.stack([np.stack([o, z, z], -1), np.stack([z, cp, -sp], -1), np.stack([z, sp, cp], -1)], -2)
    ry = np.stack([np.stack([cr, z, sr], -1), np.stack([z, o, z], -1), np.stack([-sr, z, cr], -1)], -2)
    return rz @ rx @ ry


def imu_signals(m: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ideal accelerometer (m/s^2) and gyroscope (rad/s) in the body frame on the 1 kHz grid, each (T, 3)."""
    r = _rotations(m)
    dt = 1e-3
    # Body angular velocity: R_k^T R_{k+1} = exp([w] dt); for small steps w = vee of its skew part / dt.
    rel = np.einsum("tji,tjk->tik", r[:-1], r[1:])
    w = np.stack([rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0], rel[:, 1, 0] - rel[:, 0, 1]], -1) / (2 * dt)
    w = np.concatenate([w, w[-1:]])
    acc_up = np.gradient(np.gradient(m["bob"], dt), dt)
    f_world = np.stack([np.zeros_like(acc_up), np.zeros_like(acc_up), acc_up + GRAVITY], -1)
    f_body = np.einsum("tji,tj->ti", r, f_world)  # R^T f
    return f_body, w


def make_texture(side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side, 3) uint8 periodic texture (tiles seamlessly): 1/f colour noise plus a quantised mosaic, so
    that views of it have both texture and strong edges."""
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.fftfreq(side)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    out = np.empty((side, side, 3), np.float64)
    spectrum_mosaic = np.fft.fft2(rng.standard_normal((side, side))) / f**1.8
    mosaic = np.real(np.fft.ifft2(spectrum_mosaic))
    levels = np.digitize(mosaic, np.quantile(mosaic, [0.2, 0.4, 0.6, 0.8]))
    palette = rng.uniform(30, 225, size=(5, 3))
    for c in range(3):
        noise = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((side, side))) / f**1.2))
        noise = (noise - noise.mean()) / (noise.std() + 1e-12)
        out[..., c] = 0.65 * palette[levels, c] + 0.35 * (128 + 45 * noise)
    return np.clip(out, 0, 255).astype(np.uint8)


def render_view(texture: np.ndarray, yaw: float, pitch: float, roll: float, bob: float,
                width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 view of the periodic ``texture`` for one head pose (angles in rad, bob in m)."""
    focal = 0.9 * width  # px per rad (small angles)
    side = texture.shape[0]
    u = side / 2 - focal * yaw
    v = side / 2 - focal * pitch + 2.5 * width * bob  # bob: the view moves down as the head rises
    c, s = np.cos(-roll), np.sin(-roll)
    cx, cy = width / 2, height / 2
    # dst -> src: src = (u, v) + Rot(-roll) (p - c); WARP_INVERSE_MAP makes warpAffine take that direction.
    mat = np.array([[c, -s, u - (c * cx - s * cy)], [s, c, v - (s * cx + c * cy)]], np.float64)
    return cv2.warpAffine(texture, mat, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_WRAP)


def draw_barcode(frame: np.ndarray, index: int) -> None:
    """Write ``index`` into the top :data:`BARCODE_H` rows of ``frame`` (in place), most significant bit left."""
    w = frame.shape[1] // BARCODE_BITS
    for b in range(BARCODE_BITS):
        bit = (index >> (BARCODE_BITS - 1 - b)) & 1
        frame[:BARCODE_H, b * w:(b + 1) * w] = 235 if bit else 16


def read_frame_index(frame: np.ndarray) -> int:
    """The frame index :func:`draw_barcode` wrote, read from a decoded (H, W, 3) RGB frame of the stored size."""
    w = frame.shape[1] // BARCODE_BITS
    strip = frame[1:BARCODE_H - 1].astype(np.float64).mean(axis=(0, 2))  # skip rows the codec blurs most
    index = 0
    for b in range(BARCODE_BITS):
        index = (index << 1) | int(strip[b * w + w // 4:(b + 1) * w - w // 4].mean() > 128)
    return index


def _write_video(path: pathlib.Path, frames_ms: np.ndarray, texture: np.ndarray, m: dict[str, np.ndarray],
                 t0_grid: int, sz: EgoSize, audio: bool, rng: np.random.Generator) -> None:
    """Encode one recording: frame k shows the pose at ``frames_ms[k]`` and carries barcode k."""
    out = av.open(str(path), "w", format="mp4")
    try:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = sz.width, sz.height, "yuv420p"
        stream.time_base = TIME_BASE
        stream.codec_context.time_base = TIME_BASE
        # B-frames on (decode order != presentation order), 1 s closed GOPs. Reproducible output needs one
        # thread set on the codec context and mbtree off: with either missing, x264's packets changed from run
        # to run in the same process (measured with PyAV 13 and 18; ~1 run in 3).
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "20", "preset": "veryfast",
                          "x264-params": "keyint=30:min-keyint=30:scenecut=0:bframes=2:threads=1:mbtree=0"}
        astream = out.add_stream("aac", rate=16000, layout="mono") if audio else None
        for k, t in enumerate(frames_ms):
            j = int(t) - t0_grid
            img = render_view(texture, m["yaw"][j], m["pitch"][j], m["roll"][j], m["bob"][j], sz.width, sz.height)
            draw_barcode(img, k)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = int(t) * 90, TIME_BASE
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if astream is not None:  # a quiet tone with noise: real recordings carry audio beside the video
            n = int((frames_ms[-1] - frames_ms[0] + 1000) * 16)
            wave = 0.05 * np.sin(2 * np.pi * 220 * np.arange(n) / 16000) + 0.005 * rng.standard_normal(n)
            wave = wave.astype(np.float32)
            for s0 in range(0, n - 1024 + 1, 1024):
                af = av.AudioFrame.from_ndarray(wave[None, s0:s0 + 1024], format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = 16000, s0, Fraction(1, 16000)
                out.mux(astream.encode(af))
            out.mux(astream.encode(None))
    finally:
        out.close()


def _write_imu(path: pathlib.Path, t_imu: np.ndarray, acc: np.ndarray, gyro: np.ndarray) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(IMU_HEADER)
        for k in range(len(t_imu)):
            w.writerow([k, "imu", "head_imu", f"{t_imu[k]:.3f}", f"{t_imu[k] + 7.0:.3f}",
                        *(f"{v:.6f}" for v in gyro[k]), *(f"{v:.6f}" for v in acc[k])])


def make_ego(out: pathlib.Path, seed: int = 0, size: str = "small",
             offsets_ms: Sequence[float] | None = None) -> pathlib.Path:
    """Write a synthetic Ego4D v2-style dataset at ``out`` (see the module docstring), return ``out``.

    Args:
        out: folder to create (existing files are overwritten).
        seed: seed of every random choice; equal seeds give equal content (decoded frames, timestamps, CSV).
        size: a key of :data:`SIZES` ("small", "medium", "large" or "demo").
        offsets_ms: the clock offset to plant in each recording (IMU time + offset = video time), ms; by default
            drawn from +-[50, 400] ms. Tests of offset estimation plant their own.

    Returns:
        ``out``.

    Raises:
        ValueError: unknown size.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (choose from {sorted(SIZES)})")
    out = pathlib.Path(out)
    sz = SIZES[size]
    if offsets_ms is not None and len(offsets_ms) != sz.n_recordings:
        raise ValueError(f"offsets_ms: need {sz.n_recordings} offsets for size {size!r}, got {len(offsets_ms)}")
    (out / "full_scale").mkdir(parents=True, exist_ok=True)
    (out / "imu").mkdir(parents=True, exist_ok=True)
    texture = make_texture(sz.texture, np.random.default_rng([seed, 999]))
    offsets, labels, truth = {}, [], {}
    splits = split_of(sz.n_recordings, seed)
    split_lines: dict[str, list[str]] = {name: [] for name in ("train", "val", "test")}
    for i in range(sz.n_recordings):
        rng = np.random.default_rng([seed, i])
        uid = _uid(seed, i)
        kind = ("cfr", "vfr", "start")[i % 3]
        frames_ms = frame_times(kind, sz.duration_ms, rng)
        offset = float(np.round(rng.uniform(50, 400) * rng.choice([-1, 1]), 3))  # IMU time + offset = video time
        if offsets_ms is not None:
            offset = float(offsets_ms[i])
        # The IMU runs from ~1 s before the first frame to ~1 s after the last (video clock).
        imu_v0, imu_v1 = float(frames_ms[0]) - 1000, float(frames_ms[-1]) + 1000
        t0_grid = int(np.floor(imu_v0)) - 10
        tt = np.arange(t0_grid, int(np.ceil(imu_v1)) + 11, dtype=np.float64)  # 1 kHz, video clock
        segs = _schedule(float(tt[0]), float(tt[-1]), rng)
        m = motion(segs, tt, rng)
        acc, gyro = imu_signals(m)
        # Each wearer mounts the device a little differently: the IMU axes are the body axes turned by up to
        # mount_rad about each axis (25 degrees; ~70 for "demo"; the camera is unchanged), so raw
        # axes differ between recordings while the motion seen by the camera does not.
        mount = _rotations({k: rng.uniform(-sz.mount_rad, sz.mount_rad, 1) for k in ("yaw", "pitch", "roll")})[0]
        acc, gyro = acc @ mount, gyro @ mount  # rows: v_imu = M^T v_body
        # IMU samples: every 5 ms +- jitter on the IMU clock; the signal is read at video time t + offset.
        t_imu = (imu_v0 - offset) + np.arange(int((imu_v1 - imu_v0) / IMU_PERIOD_MS)) * IMU_PERIOD_MS
        t_imu = t_imu + rng.uniform(-0.4, 0.4, size=len(t_imu))
        tv = t_imu + offset
        acc_s = np.stack([np.interp(tv, tt, acc[:, c]) for c in range(3)], -1)
        gyro_s = np.stack([np.interp(tv, tt, gyro[:, c]) for c in range(3)], -1)
        acc_s += rng.normal(0, 0.05, acc_s.shape)
        gyro_s += rng.normal(0, 0.004, gyro_s.shape) + rng.normal(0, 0.01, 3)  # noise + a constant bias
        # A few rows with a missing accelerometer value (written as "nan"), as real logs have.
        nan_rows = np.sort(rng.choice(len(t_imu), size=3, replace=False))
        acc_s[nan_rows, int(rng.integers(0, 3))] = np.nan
        nan_ms = t_imu[nan_rows]
        gap = None
        if kind == "vfr":  # a 400 ms hole in the IMU during the video's 400 ms dropout (one device stall)
            g0 = float(frames_ms[int(np.argmax(np.diff(frames_ms)))]) - offset
            gap = [g0, g0 + 400.0]
            keep = (t_imu < gap[0]) | (t_imu >= gap[1])
            t_imu, acc_s, gyro_s = t_imu[keep], acc_s[keep], gyro_s[keep]
            nan_ms = nan_ms[(nan_ms < gap[0]) | (nan_ms >= gap[1])]
        _write_video(out / "full_scale" / f"{uid}.mp4", frames_ms, texture, m, t0_grid, sz, kind == "vfr", rng)
        _write_imu(out / "imu" / f"{uid}.csv", t_imu, acc_s, gyro_s)
        if i % 2 == 0:
            offsets[uid] = offset
        end_ms = float(frames_ms[-1]) + (float(frames_ms[-1] - frames_ms[-2]) if len(frames_ms) > 1 else 33.0)
        cover: dict[str, float] = {}
        for a, b, act in segs:
            a, b = max(a, float(frames_ms[0])), min(b, end_ms)
            if b > a:
                labels.append((uid, round(a, 3), round(b, 3), act))
                cover[act] = cover.get(act, 0.0) + (b - a)
        split_lines[splits[i]].append(f"{uid}\t{max(sorted(cover), key=lambda act: cover[act])}\n")
        truth[uid] = {"index": i, "kind": kind, "offset_ms": offset, "offset_given": i % 2 == 0,
                      "frame_pts_ms": frames_ms.tolist(), "imu_gap_ms": gap,
                      "imu_nan_ms": [round(float(t), 3) for t in nan_ms],
                      "imu_mount": np.round(mount, 6).tolist(), "has_audio": kind == "vfr",
                      "width": sz.width, "height": sz.height}
    (out / "clock_offsets.json").write_text(json.dumps(offsets, indent=1, sort_keys=True) + "\n")
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(("uid", "start_ms", "end_ms", "label"))
        w.writerows(labels)
    (out / "ego4d_subset_ids.txt").write_text("".join(f"{_uid(seed, i)}\n" for i in range(sz.n_recordings)))
    (out / "splits").mkdir(exist_ok=True)
    for name, lines in split_lines.items():
        (out / "splits" / f"{name}.txt").write_text("".join(lines))
    (out / "synth_truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    return out
