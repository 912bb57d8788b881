"""Video frames by presentation time, IMU CSV reading/resampling and the synthetic Ego4D source (``synth ego``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from distillkit.sensors.imu import CHANNELS, read_imu_csv, resample_imu
from distillkit.sensors.synth.ego import ACTIVITIES, make_ego, read_frame_index
from distillkit.sensors.video import DecodeStats, VideoReader, frame_times_ms, frames_at, probe_video


@pytest.fixture(scope="module")
def ego(tmp_path_factory) -> tuple[Path, dict]:
    """Synthetic Ego4D (small, seed 0) and its ground truth, read-only."""
    root = make_ego(tmp_path_factory.mktemp("ego") / "v2", seed=0, size="small")
    return root, json.loads((root / "synth_truth.json").read_text())


def _by_kind(truth: dict, kind: str) -> tuple[str, dict]:
    return next((uid, t) for uid, t in truth.items() if t["kind"] == kind)


def _video(root: Path, uid: str) -> Path:
    return root / "full_scale" / f"{uid}.mp4"


# ---------------------------------------------------------------- video: timestamps


def test_frame_times_equal_the_pts_the_writer_set(ego):
    root, truth = ego
    assert {t["kind"] for t in truth.values()} == {"cfr", "vfr", "start"}
    for uid, t in truth.items():
        got = frame_times_ms(_video(root, uid))
        np.testing.assert_array_equal(got, np.asarray(t["frame_pts_ms"], np.float64), err_msg=t["kind"])


def test_probe_reports_start_end_rate_and_streams(ego):
    root, truth = ego
    for uid, t in truth.items():
        info = probe_video(_video(root, uid))
        pts = t["frame_pts_ms"]
        assert (info.width, info.height) == (t["width"], t["height"])
        assert info.n_frames == len(pts)
        assert info.start_ms == pts[0]
        assert pts[-1] < info.end_ms <= pts[-1] + 67
        assert info.duration_ms == pytest.approx(info.end_ms - info.start_ms)
        assert info.variable_frame_rate == (t["kind"] == "vfr")
        assert info.has_audio == t["has_audio"]
        assert info.codec == "h264" and info.rotation_deg == 0
    _, start = _by_kind(truth, "start")
    assert start["frame_pts_ms"][0] >= 1000  # the non-zero start time is really exercised
    _, vfr = _by_kind(truth, "vfr")
    assert max(np.diff(vfr["frame_pts_ms"])) == 400  # and the dropout


@pytest.mark.parametrize("matrix,expected", [((0, 1, -1, 0), 270), ((0, -1, 1, 0), 90), ((-1, 0, 0, -1), 180)],
                         ids=["phone-upright", "phone-other-way", "upside-down"])
def test_rotation_is_counter_clockwise_degrees_in_0_360(ego, tmp_path, matrix, expected):
    """A phone video held upright carries a display matrix that FFmpeg's legacy tag called ``rotate=90``
    (clockwise); ``rotation_deg`` is counter-clockwise, so 270, and ``np.rot90(frame, 3)`` shows it upright."""
    import struct

    root, truth = ego
    data = bytearray(_video(root, next(iter(truth))).read_bytes())
    i = data.find(b"tkhd")
    version = data[i + 4]
    # the 3x3 matrix follows version/flags, times, track id, duration, reserved, layer, group, volume
    at = i + 4 + (4 + 4 * 5 + 8 + 8 if version == 0 else 4 + 8 + 8 + 4 + 4 + 8 + 8 + 8)
    a, b, c, d = (v * 65536 for v in matrix)
    data[at : at + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 0x40000000)
    (tmp_path / "turned.mp4").write_bytes(data)
    assert probe_video(tmp_path / "turned.mp4").rotation_deg == expected


def test_a_recording_is_demuxed_once_for_probe_times_and_reader(ego, tmp_path, monkeypatch):
    """Probing, listing frame times and reading windows each need every packet's time; the file is read for
    them once (a long video is several GB), and again only when it is replaced or touched."""
    import distillkit.sensors.video as video

    root, truth = ego
    path = tmp_path / "v.mp4"
    shutil.copy(_video(root, next(iter(truth))), path)
    scans = []
    real = video._demux_ticks
    monkeypatch.setattr(video, "_demux_ticks", lambda c, p: scans.append(p) or real(c, p))
    info = probe_video(path)
    times = frame_times_ms(path)
    with VideoReader(path) as reader:
        frames, _ = reader.frames_at([times[3]])
    assert len(scans) == 1 and frames.shape[0] == 1 and info.n_frames == len(times)
    mtime = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(mtime, mtime))
    probe_video(path)
    assert len(scans) == 2


# ---------------------------------------------------------------- video: which frame comes back


@pytest.mark.parametrize("kind", ["cfr", "vfr", "start"])
def test_frames_at_returns_the_frame_presented_at_each_time(ego, kind):
    root, truth = ego
    uid, t = _by_kind(truth, kind)
    pts = np.asarray(t["frame_pts_ms"], np.float64)
    info = probe_video(_video(root, uid))
    rng = np.random.default_rng(1)
    k = rng.integers(0, len(pts) - 1, size=6)
    gap = int(np.argmax(np.diff(pts)))
    times = np.concatenate([
        pts[k],                               # exactly at a PTS: that frame
        pts[k + 1] - 0.01,                    # just before the next PTS: still frame k
        [pts[0], info.end_ms - 0.01],         # first instant, last instant of the last frame
        [pts[gap] + 0.5 * (pts[gap + 1] - pts[gap])],  # inside the longest interval (VFR dropout)
        rng.uniform(pts[0], info.end_ms, size=8),
    ])
    times = times[rng.permutation(len(times))]
    times = np.concatenate([times, times[:3]])  # repeats
    frames, got_pts = frames_at(_video(root, uid), times)
    expect = np.searchsorted(pts, times, side="right") - 1  # last frame with PTS <= t
    assert frames.shape == (len(times), t["height"], t["width"], 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(got_pts, pts[expect])
    assert [read_frame_index(f) for f in frames] == expect.tolist()


def test_frames_at_resizes_and_rejects_times_outside_the_video(ego):
    root, truth = ego
    uid, t = _by_kind(truth, "start")
    path = _video(root, uid)
    frames, _ = frames_at(path, [t["frame_pts_ms"][5]], size=(64, 48))
    assert frames.shape == (1, 48, 64, 3)
    with pytest.raises(ValueError, match="before the first frame"):
        frames_at(path, [t["frame_pts_ms"][0] - 1])
    with pytest.raises(ValueError, match="after the end"):
        frames_at(path, [probe_video(path).end_ms])
    with pytest.raises(ValueError, match="non-finite"):
        frames_at(path, [np.nan])
    assert frames_at(path, []) [0].shape == (0, t["height"], t["width"], 3)


def test_seeking_decodes_only_the_window(ego):
    root, truth = ego
    uid, t = _by_kind(truth, "cfr")
    pts = np.asarray(t["frame_pts_ms"], np.float64)
    assert len(pts) == 360  # 12 s at 30 fps, 1 s GOPs
    stats = DecodeStats()
    window = np.linspace(9000, 9900, 8)
    frames, got = frames_at(_video(root, uid), window, stats=stats)
    assert [read_frame_index(f) for f in frames] == (np.searchsorted(pts, window, side="right") - 1).tolist()
    # From the keyframe at or before 9000 ms (<= 1 GOP = 30 frames early) to one frame past 9900 ms.
    assert stats.seeks == 1
    assert 28 <= stats.decoded <= 30 + 28 + 3, stats
    assert stats.converted == 8

    # Consecutive windows through one reader: forward decoding, about one pass over the file in total.
    stats = DecodeStats()
    with VideoReader(_video(root, uid)) as reader:
        for t0 in range(0, 11000, 1000):
            _, got = reader.frames_at(np.linspace(t0, t0 + 900, 4), stats=stats)
            assert got[0] <= t0 and got[-1] <= t0 + 900
        # A jump backwards seeks again and still returns the right frame.
        frames, _ = reader.frames_at([1500.0], stats=stats)
    assert read_frame_index(frames[0]) == int(np.searchsorted(pts, 1500.0, side="right") - 1)
    assert stats.seeks == 2
    assert stats.decoded <= len(pts) + 30 + 3, stats


def test_truncated_and_missing_files_raise_value_error_naming_the_file(ego, tmp_path):
    root, truth = ego
    uid, t = _by_kind(truth, "cfr")
    data = _video(root, uid).read_bytes()
    cut = tmp_path / "cut.mp4"  # moov atom at the end (the writer's default): the index is gone
    cut.write_bytes(data[: len(data) // 2])
    for call in (frame_times_ms, probe_video, lambda p: frames_at(p, [100.0])):
        with pytest.raises(ValueError, match="cut.mp4"):
            call(cut)
    with pytest.raises(ValueError, match="nope.mp4"):
        probe_video(tmp_path / "nope.mp4")

    # Index first ("faststart"), then the media data cut: the index lists frames the file no longer holds.
    fast = tmp_path / "fast.mp4"
    with av.open(str(_video(root, uid))) as src, av.open(str(fast), "w", options={"movflags": "faststart"}) as dst:
        template = src.streams.video[0]  # add_stream_from_template: PyAV >= 14; add_stream(template=): 13
        out = (dst.add_stream_from_template(template) if hasattr(dst, "add_stream_from_template")
               else dst.add_stream(template=template))
        for packet in src.demux(src.streams.video[0]):
            if packet.size:
                packet.stream = out
                dst.mux(packet)
    np.testing.assert_array_equal(frame_times_ms(fast), t["frame_pts_ms"])
    fast_cut = tmp_path / "fast_cut.mp4"
    fast_cut.write_bytes(fast.read_bytes()[: fast.stat().st_size // 2])
    frames, _ = frames_at(fast_cut, [1000.0])  # the first half still decodes
    assert read_frame_index(frames[0]) == 30
    with pytest.raises(ValueError, match="fast_cut.mp4"):
        frames_at(fast_cut, [11000.0])


# ---------------------------------------------------------------- IMU reader


def _write(path: Path, text: str, crlf: bool = False) -> Path:
    path.write_bytes(text.replace("\n", "\r\n" if crlf else "\n").encode())
    return path


def test_imu_reader_finds_columns_by_name_with_crlf_and_extra_columns(tmp_path):
    text = (" Gyro_X , ACCL_Z,component_name, accl_x,gyro_z ,Canonical_Timestamp_MS,accl_y,gyro_y\n"
            "0.1,9.8,head,1.0,0.3,1000.0,2.0,0.2\n"
            "0.4,9.7,head,1.5,0.6,1005.0,2.5,0.5\n")
    rec = read_imu_csv(_write(tmp_path / "imu.csv", text, crlf=True))
    np.testing.assert_array_equal(rec.t_ms, [1000.0, 1005.0])
    assert rec.t_ms.dtype == np.float64 and rec.x.dtype == np.float32 and rec.x.shape == (6, 2)
    np.testing.assert_allclose(rec.x[:, 0], [1.0, 2.0, 9.8, 0.1, 0.2, 0.3], rtol=1e-6)  # CHANNELS order
    assert CHANNELS == ("accl_x", "accl_y", "accl_z", "gyro_x", "gyro_y", "gyro_z")
    assert (rec.n_rows, rec.n_nan, rec.n_duplicates, rec.n_out_of_order) == (2, 0, 0, 0)
    assert rec.rate_hz == pytest.approx(200.0)


def test_imu_reader_sorts_drops_duplicates_and_nan_rows(tmp_path):
    header = "canonical_timestamp_ms,accl_x,accl_y,accl_z,gyro_x,gyro_y,gyro_z\n"
    rows = [
        "10,1,0,0,0,0,0",
        "0,2,0,0,0,0,0",
        "5,3,0,0,0,0,0",
        "5,4,0,0,0,0,0",      # duplicate time: the first (after a stable sort) is kept
        "15,,0,0,0,0,0",      # empty field
        "20,nan,0,0,0,0,0",   # NaN
        ",5,0,0,0,0,0",       # no timestamp
        "25,6,0,0,0,0,0",
    ]
    rec = read_imu_csv(_write(tmp_path / "imu.csv", header + "\n".join(rows) + "\n"))
    np.testing.assert_array_equal(rec.t_ms, [0, 5, 10, 25])
    np.testing.assert_array_equal(rec.x[0], [2, 3, 1, 6])
    # Displaced rows: 0, 5 and 5 all come after 10 in the file (below the running maximum).
    assert (rec.n_rows, rec.n_nan, rec.n_duplicates, rec.n_out_of_order) == (8, 3, 1, 3)
    assert rec.max_backstep_ms == 10.0 and rec.backstep_at_ms == 10.0


def test_imu_reader_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"a\.csv.*gyro_z"):
        read_imu_csv(_write(tmp_path / "a.csv",
                            "canonical_timestamp_ms,accl_x,accl_y,accl_z,gyro_x,gyro_y\n1,2,3,4,5,6\n"))
    header = "canonical_timestamp_ms,accl_x,accl_y,accl_z,gyro_x,gyro_y,gyro_z\n"
    with pytest.raises(ValueError, match=r"b\.csv.*non-numeric"):
        read_imu_csv(_write(tmp_path / "b.csv", header + "1,2,3,4,5,6,x\n"))
    with pytest.raises(ValueError, match=r"c\.csv.*no valid"):
        read_imu_csv(_write(tmp_path / "c.csv", header + "1,,3,4,5,6,7\n"))
    with pytest.raises(ValueError, match=r"d\.csv"):
        read_imu_csv(tmp_path / "d.csv")


# ---------------------------------------------------------------- IMU resampling


def _jittered(rng: np.random.Generator, t0: float, t1: float) -> np.ndarray:
    t = np.arange(t0, t1, 5.0)
    return t + rng.uniform(-0.4, 0.4, size=len(t))


def test_resample_recovers_a_sine_on_the_uniform_grid():
    rng = np.random.default_rng(0)
    t = _jittered(rng, 0, 20_000)
    f = 1.3  # Hz
    x = np.stack([np.sin(2 * np.pi * f * t / 1000 + c) for c in range(6)]).astype(np.float32)
    w = resample_imu(t, x, t0_ms=3000.0, rate_hz=200.0, n=1000)
    assert w.x.shape == (6, 1000) and w.x.dtype == np.float32
    np.testing.assert_allclose(w.grid_ms[[0, 1, -1]], [3000.0, 3005.0, 3000.0 + 999 * 5])
    truth = np.stack([np.sin(2 * np.pi * f * w.grid_ms / 1000 + c) for c in range(6)])
    # Linear interpolation error <= (omega h)^2 / 8 ~ 2e-4 for 5 ms steps, plus float32 rounding.
    assert np.abs(w.x - truth).max() < 5e-4
    assert 4.2 <= w.max_gap_ms <= 5.8


def test_resample_reports_the_largest_gap_in_the_window():
    rng = np.random.default_rng(0)
    t = _jittered(rng, 0, 20_000)
    keep = (t < 8000) | (t >= 8300)
    t = t[keep]
    x = np.zeros((6, len(t)), np.float32)
    assert 300 <= resample_imu(t, x, 5000.0, 200.0, 1000).max_gap_ms <= 306      # gap inside the window
    assert 300 <= resample_imu(t, x, 8100.0, 200.0, 10).max_gap_ms <= 306        # window inside the gap
    assert resample_imu(t, x, 9000.0, 200.0, 1000).max_gap_ms < 6                 # no gap
    assert resample_imu(t, x, 2999.0, 200.0, 1000).max_gap_ms < 6                 # ends just before it
    assert resample_imu(t, x, 17_000.0, 200.0, 1000).max_gap_ms == np.inf         # runs past the end
    assert resample_imu(t, x, -1.0, 200.0, 10).max_gap_ms == np.inf               # starts before the start
    with pytest.raises(ValueError):
        resample_imu(t, x[:, :-1], 0.0, 200.0, 10)


# ---------------------------------------------------------------- synthetic Ego4D


def test_synthetic_imu_matches_its_truth(ego):
    root, truth = ego
    offsets = json.loads((root / "clock_offsets.json").read_text())
    assert set(offsets) == {u for u, t in truth.items() if t["offset_given"]}
    assert 0 < len(offsets) < len(truth)  # some given, some left to estimate
    for uid, t in truth.items():
        rec = read_imu_csv(root / "imu" / f"{uid}.csv")
        assert rec.rate_hz == pytest.approx(200.0, rel=0.01)
        assert rec.n_duplicates == rec.n_out_of_order == 0
        # The rows written with a nan accelerometer value are dropped, counted and placed in time.
        assert rec.n_nan == len(t["imu_nan_ms"]) > 0
        np.testing.assert_allclose(rec.nan_t_ms, t["imu_nan_ms"], atol=1e-3)
        # The IMU covers the video (IMU time + offset = video time) with ~1 s to spare on each side.
        assert rec.t_ms[0] + t["offset_ms"] < t["frame_pts_ms"][0] - 900
        assert rec.t_ms[-1] + t["offset_ms"] > t["frame_pts_ms"][-1] + 900
        gaps = np.diff(rec.t_ms)
        if t["imu_gap_ms"]:
            assert 395 < gaps.max() < 416  # (+ one ~5 ms row if a nan row borders the gap)
        else:
            assert gaps.max() < 11  # a dropped nan row doubles one ~5 ms interval


def test_synthetic_labels_cover_the_videos(ego):
    root, truth = ego
    lines = (root / "labels.csv").read_text().splitlines()
    assert lines[0] == "uid,start_ms,end_ms,label"
    rows = [line.split(",") for line in lines[1:]]
    assert {r[3] for r in rows} <= set(ACTIVITIES)
    assert len({r[3] for r in rows}) >= 3
    for uid, t in truth.items():
        segs = sorted((float(a), float(b)) for u, a, b, _ in rows if u == uid)
        assert segs[0][0] == t["frame_pts_ms"][0]
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(segs, segs[1:], strict=False))  # contiguous


def test_video_motion_follows_the_gyro_at_the_true_offset(ego):
    """The same motion drives both streams: frame-difference energy per ms correlates best with gyro magnitude
    when the IMU is shifted by (about) the true clock offset, on every recording (VFR included)."""
    root, truth = ego
    for uid, t in truth.items():
        pts = np.asarray(t["frame_pts_ms"], np.float64)
        frames, _ = frames_at(_video(root, uid), pts)
        gray = frames[:, 8:].astype(np.float32).mean(axis=3)  # below the barcode rows
        energy = np.abs(np.diff(gray, axis=0)).mean(axis=(1, 2)) / np.diff(pts)
        rec = read_imu_csv(root / "imu" / f"{uid}.csv")
        gyro = np.linalg.norm(rec.x[3:], axis=0)
        mid = (pts[1:] + pts[:-1]) / 2
        offsets = np.arange(-1000.0, 1001.0, 10.0)
        corr = [np.corrcoef(np.interp(mid - o, rec.t_ms, gyro), energy)[0, 1] for o in offsets]
        best = offsets[int(np.argmax(corr))]
        assert max(corr) > 0.7, (t["kind"], max(corr))
        assert abs(best - t["offset_ms"]) <= 80, (t["kind"], best, t["offset_ms"])


def test_synthetic_content_is_deterministic(ego, tmp_path):
    root, truth = ego
    again = make_ego(tmp_path / "again", seed=0, size="small")
    other = make_ego(tmp_path / "other", seed=1, size="small")
    assert json.loads((again / "synth_truth.json").read_text()) == truth
    assert (again / "labels.csv").read_bytes() == (root / "labels.csv").read_bytes()
    assert (again / "clock_offsets.json").read_bytes() == (root / "clock_offsets.json").read_bytes()
    for uid, t in truth.items():
        assert (again / "imu" / f"{uid}.csv").read_bytes() == (root / "imu" / f"{uid}.csv").read_bytes()
        a, b = _video(root, uid), _video(again, uid)
        np.testing.assert_array_equal(frame_times_ms(a), frame_times_ms(b))
        times = np.asarray(t["frame_pts_ms"], np.float64)
        fa, pa = frames_at(a, times)
        fb, pb = frames_at(b, times)
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(fa, fb)
    assert set(json.loads((other / "synth_truth.json").read_text())) != set(truth)  # seed changes the uids


def test_cli_synth_ego_writes_the_documented_tree(tmp_path):
    exe = Path(sys.executable).with_name("distillkit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "distillkit"]
    out = tmp_path / "ego4d" / "v2"
    done = subprocess.run([*cmd, "synth", "ego", str(out), "--seed", "3"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    truth = json.loads((out / "synth_truth.json").read_text())
    assert len(truth) == 3
    assert sorted(p.name for p in (out / "full_scale").iterdir()) == sorted(f"{u}.mp4" for u in truth)
    assert sorted(p.name for p in (out / "imu").iterdir()) == sorted(f"{u}.csv" for u in truth)
    assert (out / "labels.csv").is_file() and (out / "clock_offsets.json").is_file()
    bad = subprocess.run([*cmd, "synth", "ego", str(tmp_path / "x"), "--size", "huge"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "huge" in (bad.stderr + bad.stdout)
    shutil.rmtree(out)
