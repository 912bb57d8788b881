"""COMODO on awkward real-world input: IMU clock jumps and repeated rows, clock offsets beyond the searched range,
fast IMUs (anti-aliasing), holes in the video, late seeks (MPEG-TS, open GOPs), GoPro/phone file names, a bad
crop, a retrained teacher checkpoint, and the trainer's evaluation normalisation and queue memory."""

from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from distillkit.pipelines.base import Rejected, Rejection, Sample, SampleRef
from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.codecs import load_npy
from distillkit.pipelines.comodo import ComodoPipeline, _check_imu_clock, square_crop
from distillkit.pipelines.manifest import ManifestError
from distillkit.pipelines.runner import build
from distillkit.pipelines.shards import iter_samples
from distillkit.preprocess.alignment import estimate_offset, frame_instants, nearest_frames
from distillkit.preprocess.imu_windows import window_starts
from distillkit.sensors.imu import read_imu_csv, resample_imu
from distillkit.sensors.synth.ego import draw_barcode, make_ego
from distillkit.sensors.video import DecodeStats, VideoReader, frame_times_ms
from distillkit.train.streaming import shard_files

HEADER = "canonical_timestamp_ms,accl_x,accl_y,accl_z,gyro_x,gyro_y,gyro_z\n"


@pytest.fixture(scope="module")
def ego(tmp_path_factory) -> tuple[Path, dict]:
    """Synthetic Ego4D (small, seed 1) with planted offsets -123.4, +51.7, -16.5 ms, read-only."""
    root = make_ego(tmp_path_factory.mktemp("ego") / "v2", seed=1, size="small", offsets_ms=[-123.4, 51.7, -16.5])
    return root, json.loads((root / "synth_truth.json").read_text())


def _manifest(root: Path, out: Path, *extra: str):
    return load_manifest("demo-comodo", [f"source.root={root}", f"output.dir={out}", "cluster.scheduler=serial",
                                         "stages.teacher.enabled=false", "stages.frames.size=64", *extra])


def _ref(uid: str, video: Path, imu: Path, offset_ms: float | None = None) -> SampleRef:
    return SampleRef(uid, f"full_scale/{video.name}", {"uid": uid, "files": [str(video), str(imu)],
                                                       "offset_ms": offset_ms, "labels": []})


def _write_imu(path: Path, t_ms: np.ndarray, values: np.ndarray) -> Path:
    """A CSV with accl_x = ``values`` (gravity on z) at ``t_ms``, in the given (file) order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(HEADER)
        fh.writelines(f"{t:.3f},{v:.5f},0,9.8,{np.sin(t / 300):.4f},0.01,0.02\n" for t, v in zip(t_ms, values,
                                                                                               strict=True))
    return path


def _write_video(path: Path, pts_ms: np.ndarray, fmt: str = "mp4", size: tuple[int, int] = (160, 120),
                 x264: str = "keyint=30:min-keyint=30:scenecut=0:bframes=3") -> Path:
    """H.264 frames with their index as a barcode (``read_frame_index``), presented at ``pts_ms``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tb = Fraction(1, 90000)
    w, h = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt) as out:
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.time_base = s.codec_context.time_base = tb
        s.codec_context.thread_count = 1
        s.options = {"crf": "20", "preset": "veryfast", "x264-params": x264 + ":threads=1"}
        for k, t in enumerate(pts_ms):
            img = np.full((h, w, 3), (k * 7) % 255, np.uint8)
            img[20:] = rng.integers(0, 255, (h - 20, w, 3), dtype=np.uint8) // 4 + 100
            draw_barcode(img, k)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = int(round(t / 1000 / tb)), tb
            out.mux(s.encode(frame))
        out.mux(s.encode(None))
    return path


def _items(ref: SampleRef, m) -> list[Sample | Rejection]:
    return list(ComodoPipeline().samples(ref, m))


# ---------------------------------------------------------------- 1. IMU clock: jumps back, repeated rows


def test_a_backward_clock_jump_displaces_every_row_until_the_clock_catches_up(tmp_path):
    t = np.arange(12_000) * 5.0
    t[6000:] -= 10_002.5  # 60 s at 200 Hz; after 30 s the logger's clock steps back 10 s
    rec = read_imu_csv(_write_imu(tmp_path / "jump.csv", t, np.zeros(len(t))))
    assert rec.n_out_of_order == 2000  # rows 6000..7999 are below 29 995 ms, the largest time before them
    assert rec.max_backstep_ms == pytest.approx(9997.5) and rec.backstep_at_ms == pytest.approx(29_995.0)
    with pytest.raises(Rejected) as err:
        _check_imu_clock(rec, "jump", str(tmp_path / "jump.csv"))
    assert err.value.stage == "imu" and "\n" not in err.value.reason
    assert "steps back 9997.5 ms after 29995.0 ms" in err.value.reason and "jump.csv" in err.value.reason


def test_a_short_clock_jump_in_a_long_recording_is_rejected_though_few_rows_are_displaced(tmp_path):
    t = np.arange(80_000) * 5.0
    t[40_000:] -= 2002.5  # 400 s; one 2 s step back displaces 400 rows, 0.5% (under the 1% limit)
    rec = read_imu_csv(_write_imu(tmp_path / "jump.csv", t, np.zeros(len(t))))
    assert rec.n_out_of_order == 400 < 0.01 * rec.n_rows
    with pytest.raises(Rejected, match="steps back 1997.5 ms"):
        _check_imu_clock(rec, "jump", "jump.csv")


@pytest.mark.parametrize("unit,scale", [("s", 1e-3), ("us", 1e3), ("ns", 1e6)])
def test_timestamps_in_another_unit_are_one_rejection_naming_the_column(tmp_path, unit, scale):
    t = np.arange(2000) * 5.0 * scale  # a 200 Hz IMU logged in seconds, microseconds or nanoseconds
    rec = read_imu_csv(_write_imu(tmp_path / f"{unit}.csv", t, np.zeros(len(t))))
    with pytest.raises(Rejected) as err:
        _check_imu_clock(rec, unit, f"{unit}.csv")
    assert "canonical_timestamp_ms must be milliseconds" in err.value.reason and "\n" not in err.value.reason
    ok = read_imu_csv(_write_imu(tmp_path / "ms.csv", np.arange(2000) * 1.0, np.zeros(2000)))  # 1 kHz in ms
    _check_imu_clock(ok, "ms", "ms.csv")


def test_logger_jitter_swapping_neighbours_is_sorted_and_accepted(tmp_path):
    t = np.arange(2000) * 5.0
    t[[100, 101]] = t[[101, 100]]  # two rows written in the wrong order
    rec = read_imu_csv(_write_imu(tmp_path / "swap.csv", t, np.arange(2000.0)))
    assert rec.n_out_of_order == 1 and rec.max_backstep_ms == 5.0
    _check_imu_clock(rec, "swap", "swap.csv")  # one interval back: jitter, not a jump
    np.testing.assert_array_equal(rec.t_ms, np.arange(2000) * 5.0)


def test_exact_duplicate_rows_are_dropped_harmlessly_and_conflicting_ones_counted(tmp_path):
    t = np.arange(2000) * 5.0
    v = np.round(np.random.default_rng(0).standard_normal(2000), 5)
    again = set(range(0, 2000, 20))  # 5% of the rows written twice: half right away, half re-sent at the end
    order = [i for k in range(2000) for i in ([k, k] if k in again and k % 40 else [k])]
    order += [k for k in sorted(again) if not k % 40]
    rec = read_imu_csv(_write_imu(tmp_path / "twice.csv", t[order], v[order]))
    assert (rec.n_exact_duplicates, rec.n_duplicates, rec.n_out_of_order, rec.max_backstep_ms) == (100, 0, 0, 0.0)
    np.testing.assert_array_equal(rec.t_ms, t)
    np.testing.assert_allclose(rec.x[0], v, atol=1e-5)
    _check_imu_clock(rec, "twice", "twice.csv")  # 5% repeated rows: not a reason to reject the recording
    # The same timestamps with other values: two readings claim one instant, counted (the first is kept).
    rows = [k for k in range(2000) for _ in range(2 if k in again else 1)]
    vals = [v[k] + (1.0 if j else 0.0) for k in range(2000) for j in range(2 if k in again else 1)]
    rec = read_imu_csv(_write_imu(tmp_path / "conflict.csv", t[rows], np.asarray(vals)))
    assert (rec.n_exact_duplicates, rec.n_duplicates, rec.n_out_of_order) == (0, 100, 0)
    np.testing.assert_allclose(rec.x[0], v, atol=1e-5)
    with pytest.raises(Rejected, match="100 of 2100 IMU timestamps .* duplicated with different values"):
        _check_imu_clock(rec, "conflict", "conflict.csv")


def test_imu_csv_is_read_in_blocks_with_the_slow_parser_only_where_needed(tmp_path, monkeypatch):
    """A file longer than one block with one empty field: the same rows as one pass, the csv module used on one
    block only."""
    import distillkit.sensors.imu as imu

    n = 3 * imu.CSV_BLOCK_LINES // 2
    t = np.arange(n) * 5.0
    lines = [f"{x:.3f},{k % 7},0,9.8,0,0,{k % 3}" for k, x in enumerate(t)]
    lines[n - 10] = f"{t[n - 10]:.3f},,0,9.8,0,0,0"  # a missing value in the second block
    path = tmp_path / "long.csv"
    path.write_text(HEADER + "\n".join(lines) + "\n")
    slow_rows = []
    real = imu._parse_slow
    monkeypatch.setattr(imu, "_parse_slow", lambda lines, *a: slow_rows.append(len(lines)) or real(lines, *a))
    rec = read_imu_csv(path)
    assert slow_rows == [n - imu.CSV_BLOCK_LINES]  # only the block with the empty field
    assert (rec.n_rows, rec.n_nan, len(rec.t_ms)) == (n, 1, n - 1)
    np.testing.assert_array_equal(rec.t_ms, np.delete(t, n - 10))
    np.testing.assert_array_equal(rec.x[0], np.delete(np.arange(n) % 7, n - 10))


# ---------------------------------------------------------------- 2. offsets beyond the searched range


def _planted(offset_ms: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """IMU (200 Hz, 60 s) and frame motion energy (30 fps) of one angular-speed signal, IMU + offset = video."""
    rng = np.random.default_rng(seed)
    t = np.arange(0, 60_000, 5.0)
    speed = np.convolve(np.abs(rng.standard_normal(len(t) + 200)), np.ones(100) / 100, "same")[100:-100]
    gyro = np.stack([speed, np.zeros_like(speed), np.zeros_like(speed)])
    pts = np.arange(2000.0, 58_000.0, 1000 / 30)
    integral = np.concatenate([[0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * 5.0)])
    a, b = pts[:-1] - offset_ms, pts[1:] - offset_ms
    energy = (np.interp(b, t, integral) - np.interp(a, t, integral)) / (b - a)
    return t, gyro, pts, energy + rng.normal(0, 0.01 * energy.std(), len(energy))


@pytest.mark.parametrize("true_ms", [1400.0, -1250.0])
def test_an_offset_beyond_the_search_range_is_flagged_not_returned_as_the_edge(true_ms):
    t, gyro, pts, energy = _planted(true_ms)
    est = estimate_offset(t, gyro, pts, energy, max_offset_ms=1000.0)
    assert est.at_edge and abs(est.offset_ms) >= 990  # the search stopped at its end, with a passing peak
    wide = estimate_offset(t, gyro, pts, energy, max_offset_ms=2000.0)
    assert not wide.at_edge and abs(wide.offset_ms - true_ms) < 5 and wide.peak > 0.9


def test_the_pipeline_rejects_an_edge_estimate_and_names_the_manifest_key(ego, tmp_path):
    root, truth = ego
    uid = next(u for u, tr in truth.items() if tr["offset_ms"] == -123.4)
    m = _manifest(root, tmp_path / "out", "stages.offset.mode=estimate", "stages.offset.max_offset_ms=100")
    ref = next(r for r in ComodoPipeline().plan(m)[0] if r.payload["uid"] == uid)
    with pytest.raises(Rejected) as err:
        _items(ref, m)
    assert err.value.stage == "offset" and "\n" not in err.value.reason
    assert "edge of the searched +-100 ms" in err.value.reason and "stages.offset.max_offset_ms" in err.value.reason
    assert f"{uid}.mp4" in err.value.reason


# ---------------------------------------------------------------- 3. anti-aliasing a fast IMU


def _amplitude(x: np.ndarray, rate_hz: float, f_hz: float) -> float:
    spec = np.abs(np.fft.rfft(x - x.mean())) * 2 / len(x)
    return float(spec[np.argmin(np.abs(np.fft.rfftfreq(len(x), 1 / rate_hz) - f_hz))])


@pytest.mark.parametrize("jitter_ms", [0.0, 0.1])
def test_a_1khz_imu_is_low_passed_before_decimation_to_200hz(jitter_ms):
    """1 kHz (Aria-like): a 130 Hz vibration must not fold to 70 Hz in the 200 Hz windows (it did, at full
    amplitude, with interpolation alone), and the 10 Hz motion must pass unchanged."""
    rng = np.random.default_rng(0)
    t = np.arange(20_000) * 1.0 + rng.uniform(-jitter_ms, jitter_ms, 20_000)
    motion = np.sin(2 * np.pi * 10 * t / 1000)
    x = np.stack([motion + 0.5 * np.sin(2 * np.pi * 130 * t / 1000)] + [motion] * 5)
    w = resample_imu(t, x, 5000.0, 200.0, 1000)
    assert _amplitude(w.x[0], 200, 70) < 0.5e-3  # was 0.5: the vibration attenuated > 60 dB
    assert _amplitude(w.x[0], 200, 10) == pytest.approx(1.0, abs=2e-3)
    np.testing.assert_allclose(w.x[1], np.sin(2 * np.pi * 10 * w.grid_ms / 1000), atol=2e-3)


def test_the_low_pass_does_not_filter_across_a_hole():
    t = np.concatenate([np.arange(0, 5000.0), np.arange(5060.0, 12_000.0)])  # 60 ms without samples at 5 s
    x = np.where(t < 5000, 0.0, 1.0)[None].repeat(6, 0)
    w = resample_imu(t, x, 5060.0, 200.0, 400)  # starts right after the hole
    np.testing.assert_allclose(w.x, 1.0, atol=1e-6)  # nothing of the 0 before the hole leaks in
    w = resample_imu(t, x, 3000.0, 200.0, 400)  # ends just before the hole
    np.testing.assert_allclose(w.x, 0.0, atol=1e-6)


def test_a_200hz_imu_is_only_interpolated():
    rng = np.random.default_rng(0)
    t = np.arange(0, 20_000, 5.0) + rng.uniform(-0.4, 0.4, 4000)
    x = rng.standard_normal((6, 4000))
    w = resample_imu(t, x, 3000.0, 200.0, 1000)
    np.testing.assert_allclose(w.x, np.stack([np.interp(w.grid_ms, t, c) for c in x]), atol=1e-6)


# ---------------------------------------------------------------- 4. holes in the video


def test_windows_across_a_hole_in_the_video_are_rejected_not_given_stale_frames(tmp_path):
    root = tmp_path / "v2"
    pts = np.concatenate([np.arange(0, 8000, 1000 / 30), np.arange(11_000, 20_000, 1000 / 30)])  # 3 s hole
    video = _write_video(root / "full_scale" / "rec.mp4", pts)
    t = np.arange(-500, 20_500, 5.0)
    imu = _write_imu(root / "imu" / "rec.csv", t, np.zeros(len(t)))
    m = _manifest(root, tmp_path / "out", "stages.frames.crop_top_px=0", "stages.offset.mode=zero")
    items = _items(_ref("rec", video, imu), m)
    period = float(np.median(np.diff(frame_times_ms(video))))
    accepted = [json.loads(s.fields["times.json"]) for s in items if isinstance(s, Sample)]
    rejected = [r for r in items if isinstance(r, Rejection)]
    for tj in accepted:
        want = frame_instants(tj["t0_ms"], tj["t1_ms"] - tj["t0_ms"], 8) + tj["offset_ms"]
        assert np.abs(np.asarray(tj["frame_ms"]) - want).max() <= 1.5 * period, tj
    assert len(accepted) >= 12
    assert rejected and all(r.stage == "video" and "hole in the video" in r.reason for r in rejected)
    assert all("\n" not in r.reason for r in rejected)
    # Every window with an instant inside the hole (8 to 11 s, with 50 ms of slack) is among the rejected.
    starts = [float(r.source.rsplit("@", 1)[1][:-2]) for r in rejected]
    holed = [s for s in window_starts(0, 20_000, 2000, 1000)
             if np.any((frame_instants(s, 2000, 8) > 8050) & (frame_instants(s, 2000, 8) < 10_950))]
    assert len(holed) == 4 and {round(s) for s in holed} <= {round(s) for s in starts}


# ---------------------------------------------------------------- 5. late seeks


def _reference_frames(path: Path) -> dict[float, np.ndarray]:
    """Every frame by presentation time (ms), decoded in one pass from the start."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return {float(f.pts * s.time_base * 1000): f.to_ndarray(format="rgb24") for f in c.decode(s)}


@pytest.mark.parametrize("fmt", ["mpegts", "mp4"])
def test_a_late_seek_backs_off_instead_of_decoding_from_the_start(tmp_path, fmt):
    """Open-GOP H.264 in MPEG-TS (seeks by DTS, often onto a non-keyframe) and MP4: overlapping windows of a 20 s
    file each seek; a seek that lands late seeks again 1 s, 2 s, ... earlier. Each request decodes at most its
    own frames plus a few GOPs (from the start it was up to the whole file), and returns exactly the frames of a
    sequential decode."""
    path = _write_video(tmp_path / f"og.{'ts' if fmt == 'mpegts' else 'mp4'}", np.arange(600) * 1000 / 30, fmt,
                        x264="keyint=30:min-keyint=30:scenecut=0:bframes=3:open-gop=1")
    pts = frame_times_ms(path)
    reference = _reference_frames(path)
    assert sorted(reference) == pts.tolist()
    requests = [pts[nearest_frames(pts, frame_instants(t0, 2000, 8))]
                for t0 in window_starts(pts[0], pts[-1], 2000, 1000)]
    requests += [pts[[k, k + 20]] for k in range(29, 570, 30)]  # from the frame just before each keyframe
    with VideoReader(path) as reader:
        for want in requests:
            stats = DecodeStats()
            reader._frames = None  # as after a rejected window: every request seeks
            frames, got = reader.frames_at(want, stats=stats)
            np.testing.assert_array_equal(got, want)
            for f, t in zip(frames, got, strict=True):
                np.testing.assert_array_equal(f, reference[float(t)])
            span = int(np.searchsorted(pts, want.max()) - np.searchsorted(pts, want.min()))
            assert stats.decoded <= span + 3 * 30 + 5, (want[0], stats)  # from the start: up to 600


# ---------------------------------------------------------------- 6. file names, 7. crop


def test_plan_finds_videos_by_any_case_suffix_and_names_the_recordings_it_rejects(ego, tmp_path):
    root, truth = ego
    uid = next(u for u, tr in truth.items() if tr["kind"] == "cfr")
    src = root / "full_scale" / f"{uid}.mp4"
    (tmp_path / "v2" / "full_scale").mkdir(parents=True)
    (tmp_path / "v2" / "imu").mkdir()
    for name in ("GX010001.MP4", "lonely.mov", "twice.mp4", "twice.MOV"):
        shutil.copy(src, tmp_path / "v2" / "full_scale" / name)
    for name in ("GX010001.csv", "orphan.CSV", "twice.csv"):
        shutil.copy(root / "imu" / f"{uid}.csv", tmp_path / "v2" / "imu" / name)
    (tmp_path / "v2" / "full_scale" / "notes.txt").write_text("not a video")
    m = _manifest(tmp_path / "v2", tmp_path / "out", "stages.offset.mode=zero")
    refs, rejected = ComodoPipeline().plan(m)
    assert [(r.payload["uid"], r.source) for r in refs] == [("GX010001", "full_scale/GX010001.MP4")]
    reasons = {r["source"]: r["reason"] for r in rejected}
    assert set(reasons) == {"full_scale/lonely.mov", "imu/orphan.CSV", "full_scale/twice.MOV"}  # sorted: M < m
    assert "no imu/lonely.csv" in reasons["full_scale/lonely.mov"]
    assert "orphan" in reasons["imu/orphan.CSV"] and "full_scale/orphan.mp4" in reasons["imu/orphan.CSV"]
    assert "several files" in reasons["full_scale/twice.MOV"] and "twice.mp4" in reasons["full_scale/twice.MOV"]
    assert not any("{" in r for r in reasons.values())
    assert any(isinstance(s, Sample) for s in _items(refs[0], m))  # the .MP4 builds windows


def test_crop_top_px_is_checked(ego, tmp_path):
    root, truth = ego
    with pytest.raises(ManifestError, match="crop_top_px"):
        _manifest(root, tmp_path / "out", "stages.frames.crop_top_px=-1")
    uid = next(u for u, tr in truth.items() if tr["kind"] == "cfr")
    m = _manifest(root, tmp_path / "out", "stages.frames.crop_top_px=120", "stages.offset.mode=zero")
    ref = next(r for r in ComodoPipeline().plan(m)[0] if r.payload["uid"] == uid)
    with pytest.raises(Rejected) as err:  # was OpenCV's multi-line assertion from the first window
        _items(ref, m)
    assert err.value.stage == "video" and "\n" not in err.value.reason
    assert "crop_top_px = 120" in err.value.reason and "120 px high" in err.value.reason
    with pytest.raises(ValueError, match="crop_top_px 130"):
        square_crop(np.zeros((120, 160, 3), np.uint8), 64, 130)


# ---------------------------------------------------------------- 8. the teacher checkpoint stamps the inputs


def _save_teacher(path: Path, seed: int) -> None:
    from distillkit.preprocess.video_encoder import load_video_teacher

    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        model, _ = load_video_teacher("conv3d", "", seed)
    torch.save({"model": model.state_dict()}, path)


def _teacher_npy(shards: Path) -> dict[str, np.ndarray]:
    return {k: load_npy(s["teacher.npy"]) for p in shard_files(shards) for k, s in iter_samples(p)}


def test_a_retrained_teacher_checkpoint_rebuilds_the_teacher_embeddings(ego, tmp_path):
    root, truth = ego
    uid = next(u for u, tr in truth.items() if tr["kind"] == "cfr")
    src = tmp_path / "v2"
    (src / "full_scale").mkdir(parents=True)
    (src / "imu").mkdir()
    shutil.copy(root / "full_scale" / f"{uid}.mp4", src / "full_scale")
    shutil.copy(root / "imu" / f"{uid}.csv", src / "imu")
    ckpt = tmp_path / "teacher.pt"
    _save_teacher(ckpt, seed=1)
    m = _manifest(src, tmp_path / "shards", "stages.offset.mode=zero", "stages.teacher.enabled=true",
                  f"stages.teacher.checkpoint={ckpt}")
    (ref,), _ = ComodoPipeline().plan(m)
    assert str(ckpt) in ComodoPipeline().input_files(ref)
    build(m, progress=False)
    first = _teacher_npy(tmp_path / "shards")
    _save_teacher(ckpt, seed=2)  # retrained into the same path
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    build(m, progress=False)
    second = _teacher_npy(tmp_path / "shards")
    assert first.keys() == second.keys() and first
    assert all(not np.array_equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------- 9, 10. trainer


@pytest.fixture(scope="module")
def shards(ego, tmp_path_factory) -> Path:
    """Shards without teacher.npy (the trainer runs the teacher on the stored frames)."""
    root, _ = ego
    out = tmp_path_factory.mktemp("shards")
    build(_manifest(root, out, "stages.offset.mode=zero", "output.recordings_per_shard=1"), progress=False)
    return out


def test_evaluation_standardises_with_the_checkpoints_statistics(shards, tmp_path, monkeypatch):
    import distillkit.train.comodo as tc
    from distillkit.train.registry import TRAINERS

    config = TRAINERS.get("comodo").resolve_config({})
    student = tc.ImuStudent(tc.SIZES[config["size"]])
    mean, std = torch.arange(6.0) - 3, torch.arange(1.0, 7.0)  # not the shards' statistics
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state.update(mean=mean.view(1, -1, 1), std=std.view(1, -1, 1))
    torch.save({"model": state}, tmp_path / "ckpt.pt")
    seen = []

    class Stop(Exception):
        pass

    def capture(student, shard_dirs, m, s, device="cpu", **kw):
        seen.append((m.clone(), s.clone()))
        raise Stop

    monkeypatch.setattr(tc, "window_features", capture)
    with pytest.raises(Stop):
        tc.eval_main(tmp_path / "ckpt.pt", [shards], config)
    torch.testing.assert_close(seen[0][0].reshape(-1), mean)
    torch.testing.assert_close(seen[0][1].reshape(-1), std)
    info = tc.shard_info(shards)
    assert not np.allclose(info["mean"], mean.numpy())


def test_the_queue_pass_holds_one_window_at_a_time(shards, monkeypatch):
    """The queue's windows are drawn by key over the whole dataset and read one at a time; it used to fill a
    shuffle buffer of 4 x queue_size raw windows (every JPEG) before the first embedding."""
    import distillkit.train.comodo as tc
    from distillkit.preprocess.video_encoder import embed_clips, load_video_teacher
    from distillkit.sensors.images import decode_rgb
    from distillkit.train.streaming import ShardStream

    held = {"read": 0, "out": 0, "max": 0}
    raw_samples, decoded = ShardStream._raw_samples, ShardStream._decoded

    def counting_raw(self, shard_list, epoch=0):
        for raw in raw_samples(self, shard_list, epoch):
            held["read"] += 1
            held["max"] = max(held["max"], held["read"] - held["out"])
            yield raw

    def counting_decoded(self, raw):
        held["out"] += 1
        return decoded(self, raw)

    monkeypatch.setattr(ShardStream, "_raw_samples", counting_raw)
    monkeypatch.setattr(ShardStream, "_decoded", counting_decoded)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        teacher, _ = load_video_teacher("conv3d", "", 0)
    emb = tc.initial_teacher_embeddings(shards, 8, seed=0, video_teacher=teacher)
    assert held["max"] == 1 and held["read"] == 8
    assert emb.shape == (8, teacher.dim)
    monkeypatch.undo()
    windows = {k: s for p in shard_files(shards) for k, s in iter_samples(p)}
    every = embed_clips(teacher, np.stack([np.stack([decode_rgb(s[f"frame{j:02d}.jpg"]) for j in range(8)])
                                           for s in windows.values()]))
    for e in emb:  # each is one window's embedding, eight different windows
        assert torch.isclose(every, e, atol=1e-5).all(1).sum() == 1
    torch.testing.assert_close(tc.initial_teacher_embeddings(shards, 8, seed=0, video_teacher=teacher), emb)
