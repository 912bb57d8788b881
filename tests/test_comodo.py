"""COMODO pipeline: IMU windows, frame alignment by presentation time, clock-offset estimation, teacher
embeddings, bad input, and the trainer's loss and queue. The conformance tests (tests/test_conformance.py)
cover build/verify/stats/show and train/resume/eval on the demo data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.codecs import load_npy
from distillkit.pipelines.comodo import square_crop, window_label
from distillkit.pipelines.runner import build
from distillkit.pipelines.shards import iter_samples, load_index
from distillkit.preprocess.alignment import frame_instants, nearest_frames
from distillkit.preprocess.imu_windows import WindowError, imu_window, window_starts
from distillkit.preprocess.video_encoder import embed_clips, load_video_teacher
from distillkit.sensors.imu import ImuRecord
from distillkit.sensors.synth.ego import make_ego
from distillkit.sensors.video import frames_at
from distillkit.train.base import ConfigError
from distillkit.train.comodo import SIZES, Comodo, comodo_loss
from distillkit.train.streaming import shard_files

# Planted offsets (IMU time + offset = video time): negative, positive, and off the 33.3 ms frame grid.
PLANTED = [-123.4, 51.7, -16.5]


@pytest.fixture(scope="module")
def ego(tmp_path_factory) -> tuple[Path, dict]:
    root = make_ego(tmp_path_factory.mktemp("ego") / "v2", seed=1, size="small", offsets_ms=PLANTED)
    return root, json.loads((root / "synth_truth.json").read_text())


def _manifest(root: Path, out: Path, *extra: str):
    return load_manifest("demo-comodo", [f"source.root={root}", f"output.dir={out}", "cluster.scheduler=serial",
                                         "stages.teacher.enabled=false", "stages.frames.size=64", *extra])


def _samples(shards: Path) -> list[tuple[str, dict]]:
    return [s for path in shard_files(shards) for s in iter_samples(path)]


@pytest.fixture(scope="module")
def estimated(ego, tmp_path_factory) -> Path:
    """Shards built with every offset estimated (clock_offsets.json ignored)."""
    root, _ = ego
    out = tmp_path_factory.mktemp("estimated")
    build(_manifest(root, out, "stages.offset.mode=estimate"), progress=False)
    return out


def test_offsets_are_estimated_within_a_frame_period(ego, estimated):
    _, truth = ego
    found = {}
    for _, sample in _samples(estimated):
        t = json.loads(sample["times.json"])
        found[t["uid"]] = (t["offset_ms"], t["offset_source"], t["offset_peak"])
    assert set(found) == set(truth), "every recording must give windows"
    for uid, tr in truth.items():
        offset, source, peak = found[uid]
        period = float(np.median(np.diff(tr["frame_pts_ms"])))
        assert source == "estimated" and peak > 0.5
        assert abs(offset - tr["offset_ms"]) < period, (tr["kind"], offset, tr["offset_ms"])


def test_frames_are_the_nearest_by_presentation_time(ego, estimated):
    """Each stored frame is the one whose PTS is nearest to its instant of the window shifted by the offset
    actually applied, and its pixels are that frame's (decoded independently here, same crop)."""
    root, truth = ego
    checked = 0
    for _, sample in _samples(estimated):
        t = json.loads(sample["times.json"])
        pts = np.asarray(truth[t["uid"]]["frame_pts_ms"], np.float64)
        want = frame_instants(t["t0_ms"], t["t1_ms"] - t["t0_ms"], 8) + t["offset_ms"]
        expected = pts[nearest_frames(pts, want)]
        np.testing.assert_allclose(t["frame_ms"], expected, atol=1e-3)
        direct, _ = frames_at(root / "full_scale" / f"{t['uid']}.mp4", expected[[0, -1]])
        for j, img in zip((0, 7), direct, strict=True):
            stored = cv2.imdecode(np.frombuffer(sample[f"frame{j:02d}.jpg"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            assert np.abs(stored.astype(float) - square_crop(img, 64, 8)).mean() < 4.0
        checked += 1
    assert checked >= 6


def test_imu_windows_are_the_csv_resampled(ego, estimated):
    root, _ = ego
    for _, sample in _samples(estimated)[:4]:
        t = json.loads(sample["times.json"])
        imu = load_npy(sample["imu.npy"])
        raw = np.genfromtxt(root / "imu" / f"{t['uid']}.csv", delimiter=",", names=True, dtype=None, encoding=None)
        ok = np.isfinite(raw["accl_x"]) & np.isfinite(raw["accl_y"]) & np.isfinite(raw["accl_z"])
        ts = raw["canonical_timestamp_ms"][ok]
        grid = t["t0_ms"] + np.arange(imu.shape[1]) * 1000.0 / t["rate_hz"]
        assert imu.dtype == np.float32 and imu.shape == (6, 400)  # demo manifest: 2 s at 200 Hz
        for c, name in enumerate(("accl_x", "accl_y", "accl_z", "gyro_x", "gyro_y", "gyro_z")):
            np.testing.assert_allclose(imu[c], np.interp(grid, ts, raw[name][ok]), atol=1e-4)


def test_given_offsets_are_used_and_gaps_rejected(ego, tmp_path):
    root, truth = ego
    build(_manifest(root, tmp_path), progress=False)
    index = load_index(tmp_path)
    given = json.loads((root / "clock_offsets.json").read_text())
    for _, sample in _samples(tmp_path):
        t = json.loads(sample["times.json"])
        if t["uid"] in given:
            assert t["offset_source"] == "given" and t["offset_ms"] == pytest.approx(given[t["uid"]])
        assert sample["label.txt"].decode() in {"still", "walking", "turning", "shaking", "reaching"}
    gap_uid = next(u for u, tr in truth.items() if tr["imu_gap_ms"])
    reasons = [r["reason"] for r in index["rejected"]]
    assert any(gap_uid in r and "IMU gap" in r for r in reasons), reasons


def test_window_helpers():
    np.testing.assert_allclose(window_starts(0, 12_000, 5000, 5000), [0, 5000])
    np.testing.assert_allclose(window_starts(100, 3099, 2000, 1000), [100])
    assert len(window_starts(0, 1999, 2000, 1000)) == 0
    np.testing.assert_allclose(frame_instants(0, 800, 4), [100, 300, 500, 700])
    assert list(nearest_frames(np.array([0.0, 40.0, 100.0]), np.array([-5, 19, 20, 21, 69, 71, 500]))) == [
        0, 0, 0, 1, 1, 2, 2]
    labels = [[0, 1500, "still"], [1500, 4000, "walking"]]
    assert window_label(labels, 0, 2000) == "still" and window_label(labels, 1000, 3000) == "walking"
    assert window_label(labels, 3500, 5500) is None  # labelled for less than half of the window


def test_imu_window_rejects_gaps_and_nan_rows():
    t = np.arange(0, 10_000, 5.0)
    x = np.ones((6, len(t)), np.float32)
    rec = ImuRecord("r.csv", t, x, len(t), 0, 0, 0, nan_t_ms=np.arange(1000, 1100, 5.0))  # 20 NaN rows
    assert imu_window(rec, 2000.0, 200.0, 200).shape == (6, 200)
    with pytest.raises(WindowError, match="NaN"):
        imu_window(rec, 900.0, 200.0, 200, max_nan_fraction=0.05)
    keep = (t < 5000) | (t > 5300)
    gappy = ImuRecord("r.csv", t[keep], x[:, keep], int(keep.sum()), 0, 0, 0)
    with pytest.raises(WindowError, match="gap of 310.0 ms"):
        imu_window(gappy, 4500.0, 200.0, 200)
    with pytest.raises(WindowError, match="runs past"):
        imu_window(rec, 9500.0, 200.0, 200)


# ---------------------------------------------------------------- bad input


def _copy_recording(src_root: Path, uid: str, dst_root: Path, new_uid: str) -> tuple[Path, Path]:
    (dst_root / "full_scale").mkdir(parents=True, exist_ok=True)
    (dst_root / "imu").mkdir(parents=True, exist_ok=True)
    video, imu = dst_root / "full_scale" / f"{new_uid}.mp4", dst_root / "imu" / f"{new_uid}.csv"
    shutil.copy(src_root / "full_scale" / f"{uid}.mp4", video)
    shutil.copy(src_root / "imu" / f"{uid}.csv", imu)
    return video, imu


def _rewrite_times(path: Path, change) -> None:
    lines = path.read_text().splitlines()
    col = lines[0].split(",").index("canonical_timestamp_ms")
    rows = [line.split(",") for line in lines[1:]]
    change(rows, col)
    path.write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")


def test_bad_recordings_are_rejected_with_reasons_and_the_build_goes_on(ego, tmp_path):
    root, truth = ego
    uid = next(u for u, tr in truth.items() if tr["kind"] == "cfr")
    bad = tmp_path / "v2"
    _copy_recording(root, uid, bad, "good")
    video, _ = _copy_recording(root, uid, bad, "truncated")
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    video, _ = _copy_recording(root, uid, bad, "notavideo")
    video.write_bytes(b"this is not an mp4 file\n" * 100)
    _, imu = _copy_recording(root, uid, bad, "nocolumns")
    imu.write_text("canonical_timestamp_ms,accl_x,accl_y\n1,2,3\n")
    _, imu = _copy_recording(root, uid, bad, "textnumbers")
    imu.write_text(imu.read_text().replace("\n10,imu,head_imu,", "\n10,imu,head_imu,abc"))  # "abc1234.5" ms
    _, imu = _copy_recording(root, uid, bad, "nooverlap")
    _rewrite_times(imu, lambda rows, c: [r.__setitem__(c, f"{float(r[c]) + 1e6:.3f}") for r in rows])
    _, imu = _copy_recording(root, uid, bad, "backwards")
    _rewrite_times(imu, lambda rows, c: [rows[i].__setitem__(c, rows[i + 1][c]) for i in range(0, len(rows) - 1, 20)])
    # (every 20th row now has its successor's timestamp with its own values: 5% conflicting duplicates; exact
    # repeats of a row are dropped harmlessly, tests/test_comodo_robust.py)
    _, imu = _copy_recording(root, uid, bad, "shuffled")
    _rewrite_times(imu, lambda rows, c: np.random.default_rng(0).shuffle(rows))
    video, _ = _copy_recording(root, uid, bad, "short")
    cut = tmp_path / "cut.mp4"
    _cut_video(root / "full_scale" / f"{uid}.mp4", cut, 1500.0)
    shutil.move(cut, video)
    out = tmp_path / "shards"
    result = build(_manifest(bad, out, "output.max_rejected=1.0", "stages.offset.mode=zero"), progress=False)
    index = load_index(out)
    reasons = {r["source"].split("/")[-1].split(".")[0].split("@")[0]: r for r in index["rejected"]}
    expect = {
        "truncated": ("video", ""), "notavideo": ("video", "notavideo"), "nocolumns": ("imu", "missing IMU column"),
        "textnumbers": ("imu", "non-numeric"), "nooverlap": ("align", "overlap"), "backwards": ("imu", "duplicated"),
        "shuffled": ("imu", "out of order"), "short": ("align", "less than one"),
    }
    for name, (stage, words) in expect.items():
        assert name in reasons, f"{name} not rejected: {sorted(reasons)}"
        r = reasons[name]
        assert r["stage"] == stage and words in r["reason"] and name in r["reason"], r
    keys = [k for k, _ in _samples(out)]
    assert keys and all(k.startswith("good_") for k in keys), "the good recording's windows are built"
    assert result.written == len(keys)


def _cut_video(src: Path, dst: Path, keep_ms: float) -> None:
    """Re-encode the first ``keep_ms`` of ``src`` (shorter than one 2 s window)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30)
        s_in = inp.streams.video[0]
        stream.width, stream.height, stream.pix_fmt = s_in.codec_context.width, s_in.codec_context.height, "yuv420p"
        for frame in inp.decode(s_in):
            if frame.time * 1000 > keep_ms:
                break
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")))
        out.mux(stream.encode(None))


# ---------------------------------------------------------------- teacher and trainer


def test_teacher_embeddings_match_the_stored_frames(ego, tmp_path):
    """teacher.npy is the frozen teacher's embedding of exactly the frames stored beside it, so the trainer's
    fallback (teacher run on the stored frames) and the offline stage agree."""
    root, _ = ego
    build(_manifest(root, tmp_path, "stages.teacher.enabled=true"), progress=False)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        model, info = load_video_teacher("conv3d", "", 0)
    samples = _samples(tmp_path)[:3]
    clips = np.stack([np.stack([cv2.imdecode(np.frombuffer(s[f"frame{j:02d}.jpg"], np.uint8), cv2.IMREAD_COLOR)[
        ..., ::-1] for j in range(8)]) for _, s in samples])
    emb = embed_clips(model, clips).numpy()
    for (_, s), e in zip(samples, emb, strict=True):
        stored = load_npy(s["teacher.npy"])
        assert stored.dtype == np.float16 and stored.shape == (info.dim,)
        np.testing.assert_allclose(stored.astype(np.float32), e, rtol=2e-3, atol=2e-3)


def test_comodo_loss_and_fifo_queue():
    torch.manual_seed(0)
    z_s, z_t = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(10, 8), dim=1)
    bank = torch.cat([queue, z_t])
    expected = -(torch.softmax(z_t @ bank.T / 0.1, 1) * torch.log_softmax(z_s @ bank.T / 0.05, 1)).sum(1).mean()
    assert torch.allclose(comodo_loss(z_s, z_t, queue), expected)
    # KL form: the loss is smallest when the student ranks the bank like the teacher
    assert comodo_loss(z_t, z_t, queue) < comodo_loss(-z_t, z_t, queue)
    method = Comodo(SIZES["small"], 16, torch.zeros(10, 128), torch.zeros(6), torch.ones(6), 0.05, 0.1, seed=0)
    raw = torch.randn(10, 16)
    method.fill_queue(raw)
    before = method.queue.clone()
    batch = {"imu": torch.randn(3, 6, 400), "teacher": torch.randn(3, 16)}
    method.loss(batch)
    assert torch.equal(method.queue[:7], before[3:])  # oldest three pushed out
    assert torch.allclose(method.queue[7:], method.project_teacher(batch["teacher"]))
    assert "queue" in method.state_dict() and "t_mean" in method.state_dict()


def test_synthetic_imu_is_physical(ego):
    """Gravity in the accelerometer (|a| ~ g while still), angular rate ~1 rad/s while turning, ~0 while still:
    the labelled activities (video clock) mapped onto the IMU clock with the planted offset."""
    from distillkit.sensors.imu import read_imu_csv

    root, truth = ego
    rows = [line.split(",") for line in (root / "labels.csv").read_text().splitlines()[1:]]
    seen = set()
    for uid, a, b, label in rows:
        if label not in ("still", "turning") or float(b) - float(a) < 1000:
            continue
        rec = read_imu_csv(root / "imu" / f"{uid}.csv")
        off = truth[uid]["offset_ms"]
        sel = (rec.t_ms > float(a) - off + 300) & (rec.t_ms < float(b) - off - 300)  # away from the ramps
        acc, gyro = np.linalg.norm(rec.x[:3, sel], axis=0), np.linalg.norm(rec.x[3:, sel], axis=0)
        if label == "still":
            assert abs(np.median(acc) - 9.81) < 0.2 and np.median(gyro) < 0.25  # tremor only
        else:
            assert 0.7 < np.median(gyro) < 1.3
        seen.add(label)
    assert seen == {"still", "turning"}


def test_video_teachers_build_load_and_embed(tmp_path):
    from distillkit.preprocess.video_encoder import TimeSformerTeacher, build_video_teacher

    big = build_video_teacher("timesformer")
    assert 115e6 < sum(p.numel() for p in big.parameters()) < 130e6  # ViT-B/16 with divided attention
    del big
    tiny = TimeSformerTeacher(dim=32, depth=1, heads=2, input_size=64)
    assert tiny(torch.randn(2, 3, 8, 64, 64)).shape == (2, 32)
    with pytest.warns(UserWarning):
        model, info = load_video_teacher("conv3d", "", seed=3)
    path = tmp_path / "teacher.pt"
    torch.save({"model": model.state_dict()}, path)
    loaded, info2 = load_video_teacher("conv3d", path)
    assert info.random_init and not info2.random_init
    clip = np.random.default_rng(0).integers(0, 255, (1, 8, 40, 50, 3), dtype=np.uint8)
    assert torch.equal(embed_clips(model, clip), embed_clips(loaded, clip))
    torch.save({"something": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="not a conv3d teacher"):
        load_video_teacher("conv3d", tmp_path / "wrong.pt")


def test_trainer_runs_the_teacher_on_stored_frames_without_teacher_npy(estimated, tmp_path):
    """Shards built without the teacher stage: the trainer says so and embeds the stored frames itself."""
    from distillkit.train.registry import TRAINERS

    assert not any("teacher.npy" in s for _, s in _samples(estimated))
    trainer = TRAINERS.get("comodo")
    config = trainer.resolve_config({"max_steps": 2, "batch_size": 4, "log_every": 1})
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        metrics = trainer.train(estimated, tmp_path / "run", config)
    assert metrics["teacher"] == "computed from frames" and metrics["step"] == 2


def test_evaluation_over_several_splits_and_its_headline(estimated, tmp_path):
    """``splits`` probes both students on the same recording splits; the headline is the mean balanced accuracy,
    and an activity absent from a test side prints as "-", never "nan" (the demo's output has no nan)."""
    from distillkit.train.comodo import eval_main
    from distillkit.train.registry import TRAINERS

    trainer = TRAINERS.get("comodo")
    config = trainer.resolve_config({"max_steps": 2, "batch_size": 4, "log_every": 1})
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        trainer.train(estimated, tmp_path / "run", config)
    ckpt = tmp_path / "run" / "latest.pt"
    one = trainer.evaluate(ckpt, [estimated], config)
    three = trainer.evaluate(ckpt, [estimated], config, options={"splits": 3})
    assert "splits" not in one and "mean" not in one
    for name in ("distilled", "random_init"):  # the first split is the single split's (seeded by the config's seed)
        assert three[name]["confusion"] == one[name]["confusion"] and three["recordings"] == one["recordings"]
    for name in ("distilled", "random_init"):
        rows = three["splits"][name]
        assert len(rows) == 3 and rows[0]["balanced_accuracy"] == one[name]["balanced_accuracy"]
        mean = np.mean([r["balanced_accuracy"] for r in rows])
        assert three["mean"][name]["balanced_accuracy"] == pytest.approx(mean)
    head = trainer.headline(three)
    assert head["metric"] == "balanced accuracy, mean of 3 splits"
    assert head["distilled"] == three["mean"]["distilled"]["balanced_accuracy"]
    assert head["gain"] == pytest.approx(head["distilled"] - head["random"])
    d, r = one["distilled"]["balanced_accuracy"], one["random_init"]["balanced_accuracy"]
    assert trainer.headline(one) == {"metric": "balanced accuracy", "distilled": d, "random": r, "gain": d - r}
    alone = trainer.headline(eval_main(None, [estimated], config, splits=2))
    assert alone["distilled"] is None and alone["gain"] is None and 0 <= alone["random"] <= 1
    # the small synthetic set (3 recordings) leaves activities off the test side: "-" rows, no "nan"
    text = trainer.format_eval(three)
    assert any(v["n_test"] == 0 for v in one["distilled"]["per_class"].values()), "the check below would be vacuous"
    assert "nan" not in text.lower() and "mean over 3 splits" in text, text
    with pytest.raises(ConfigError, match="splits"):
        trainer.resolve_eval_options({"splits": 0})
