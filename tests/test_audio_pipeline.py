"""The audio pipeline end to end on real files: plan, build (serial), bad inputs, labels, keys,
pad/drop of the last segment, the torch backend against the librosa one, index statistics, show."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.inspect import show, verify
from distillkit.pipelines.manifest import ManifestError
from distillkit.pipelines.runner import build
from distillkit.pipelines.shards import load_index
from distillkit.sensors.synth.audio import make_audio, write_bad_audio
from distillkit.train.streaming import ShardStream
from tests.conftest import keep_audio_files


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The small synthetic tree minus most files (speed), plus every bad input."""
    root = make_audio(tmp_path_factory.mktemp("audio") / "src", seed=2, size="small")
    keep = keep_audio_files(root, 6)
    bad = write_bad_audio(root)
    return root, keep, bad


def manifest(root, out, *extra):
    return load_manifest("demo-audio", [f"source.root={root}", f"output.dir={out}", "cluster.scheduler=serial",
                                        "output.max_rejected=1.0", *extra])


def samples(out):
    return {s["__key__"]: s for s in ShardStream(out, epochs=1, shuffle_shards=False)}


def test_build_keeps_good_and_odd_files_and_rejects_bad_ones(source, tmp_path):
    root, keep, bad = source
    out = tmp_path / "shards"
    result = build(manifest(root, out), progress=False)
    index = load_index(out)
    assert verify(out).ok
    rejected = {r["source"]: r for r in index["rejected"]}
    for rel, fate in bad.items():
        if fate == "rejected":
            assert rel in rejected and str(root / rel) in rejected[rel]["reason"], rel
            assert rejected[rel]["stage"] == "read"
        else:
            assert rel not in rejected
    read_rejected = [r for r in index["rejected"] if r["stage"] == "read"]
    assert len(read_rejected) == sum(f == "rejected" for f in bad.values())
    # every other entry is a tail under stages.segments.min_tail_s (1 s): listed, and no segment has so little
    tails = [r for r in index["rejected"] if r["stage"] != "read"]
    assert all(r["stage"] == "segment" and "min_tail_s" in r["reason"] for r in tails)
    assert result is not None
    got = samples(out)
    sources = {s["meta.json"]["source"] for s in got.values()}
    assert sources == set(keep) | {r for r, f in bad.items() if f == "kept"}
    for key, s in got.items():
        meta, spec = s["meta.json"], s["logmel.npy"]
        assert meta["duration_s"] >= 1.0, key  # stages.segments.min_tail_s
        assert "." not in key and key.endswith(f"_{meta['segment']:04d}")
        assert spec.dtype == np.float16 and spec.shape == (64, 1001)
        assert meta["sample_rate"] == 16000 and meta["n_mels"] == 64 and meta["hop_length"] == 160
        assert ("label.txt" in s) == (meta["source"] in keep)  # the bad/ files are not in labels.csv
    silence = got["bad_silence_wav_0000"]["logmel.npy"].astype(np.float32)
    assert np.all(silence == np.float16(-100.0))  # all-silence kept at the power floor
    six = got["bad_six_channel_96k_flac_0000"]["meta.json"]
    assert (six["source_channels"], six["source_sample_rate"], six["duration_s"]) == (6, 96000, 2.0)
    stats = index["stats"]
    assert stats["labelled_segments"] == sum("label.txt" in s for s in got.values())
    # mean/std of the dB values over frames that hold audio, recomputed from the shards
    vals = []
    for s in got.values():
        m = s["meta.json"]
        n = -(-round(m["duration_s"] * 16000) // 160)
        vals.append(s["logmel.npy"][:, :n].astype(np.float64).ravel())
    vals = np.concatenate(vals)
    assert abs(stats["logmel_mean"] - vals.mean()) < 1e-6 and abs(stats["logmel_std"] - vals.std()) < 1e-6
    picture = tmp_path / "show.png"
    show(out, picture, key="bad_mono_8k_wav_0000")
    assert picture.stat().st_size > 10_000


def test_drop_mode_and_torch_backend(source, tmp_path):
    root, keep, _ = source
    ref = samples(_built(manifest(root, tmp_path / "ref")))
    torch_out = _built(manifest(root, tmp_path / "torch", "stages.logmel.backend=torch", "stages.logmel.batch=3"))
    got = samples(torch_out)
    assert got.keys() == ref.keys()
    for k in ref:
        a, b = ref[k]["logmel.npy"].astype(np.float32), got[k]["logmel.npy"].astype(np.float32)
        assert np.abs(a - b).max() <= 0.07, k  # 0.05 dB plus float16 rounding of the stored values
        assert ref[k]["meta.json"] == got[k]["meta.json"]
    dropped = _built(manifest(root, tmp_path / "drop", "stages.segments.last=drop"))
    index = load_index(dropped)
    d = samples(dropped)
    assert all(s["meta.json"]["duration_s"] == 10.0 for s in d.values())
    reasons = [r["reason"] for r in index["rejected"] if r["stage"] == "segment"]
    assert reasons and all("stages.segments.last" in r for r in reasons)
    # every file shorter than 10 s is rejected as a whole, every longer one has its tail listed
    assert set(d) <= set(ref) and len(d) < len(ref)


def _built(m):
    build(m, progress=False)
    return m.output_dir


def test_manifest_errors_and_key_collisions(source, tmp_path):
    root, _, _ = source
    with pytest.raises(ManifestError, match="source.kind"):
        manifest(root, tmp_path / "x", "source.kind=images")
    assert manifest(root, tmp_path / "x", "source.kind=audio_dir").get("source.kind") == "audio_dir"
    with pytest.raises(ManifestError, match="stages.logmel"):
        manifest(root, tmp_path / "x", "stages.logmel.fmax=9000.0")
    with pytest.raises(ManifestError, match="output.dir"):
        manifest(root, root / "out")
    other = tmp_path / "collide"
    other.mkdir()
    shutil.copy(root / "bad" / "silence.wav", other / "a b.wav")
    shutil.copy(root / "bad" / "silence.wav", other / "a_b.wav")
    from distillkit.pipelines.audio import AudioPipeline

    refs, rejected = AudioPipeline().plan(manifest(other, tmp_path / "y"))
    assert [r.key for r in refs] == ["a_b_wav"] and "collides" in rejected[0]["reason"]
    assert json.dumps([r.payload for r in refs])


def test_label_groups_bom_and_unmatched_labels(source, tmp_path):
    """labels.csv written by a spreadsheet (UTF-8 BOM) with a ``group`` column: the group reaches meta.json and
    the evaluation keeps a group's files on one side; labels whose paths match no file are a manifest error."""
    from distillkit.pipelines.audio import AudioPipeline
    from distillkit.train.audio import load_labelled
    from distillkit.train.clip_probe import group_split

    root, keep, _ = source
    src = tmp_path / "src"
    src.mkdir()
    for rel in keep:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, src / rel)
    rows = ["path,label,group"] + [f"{rel},{'a' if i % 2 else 'b'},rec{i // 2}" for i, rel in enumerate(keep)]
    (src / "labels.csv").write_bytes(b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode())
    build(manifest(src, tmp_path / "out"), progress=False)
    metas = [s["meta.json"] for s in samples(tmp_path / "out").values()]
    assert {m["group"] for m in metas} == {f"rec{i}" for i in range(len(keep) // 2 + len(keep) % 2)}
    _, labels, groups, _ = load_labelled([tmp_path / "out"])
    assert len(set(groups)) < len({m["source"] for m in metas})  # grouped by recording, not by file
    for seed in range(5):
        train, test = group_split(groups, 0.3, seed=seed, labels=labels)
        assert not {groups[i] for i in train} & {groups[i] for i in test}
    (src / "labels.csv").write_text("path,label\n" + "".join(f"elsewhere/{rel},a\n" for rel in keep))
    with pytest.raises(ManifestError, match="relative to source.root"):
        AudioPipeline().plan(manifest(src, tmp_path / "out2"))


def test_float_files_over_full_scale_are_counted(tmp_path):
    """A float WAV scaled like integer PCM (peaks near 100) is kept unscaled, as the file says; each segment's
    ``meta.json`` records its peak and ``index.json`` counts the segments above full scale."""
    import soundfile as sf

    src = tmp_path / "src"
    src.mkdir()
    t = np.arange(16000 * 3) / 16000
    sf.write(src / "hot.wav", (100 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, subtype="FLOAT")
    sf.write(src / "ok.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, subtype="FLOAT")
    build(manifest(src, tmp_path / "out"), progress=False)
    peaks = {k.split("_wav")[0]: s["meta.json"]["peak"] for k, s in samples(tmp_path / "out").items()}
    assert peaks["hot"] == pytest.approx(100, rel=1e-3) and peaks["ok"] == pytest.approx(0.5, rel=1e-3)
    assert load_index(tmp_path / "out")["stats"]["over_range_segments"] == 1


def test_min_tail_drops_a_3ms_tail(tmp_path):
    """A 10.003 s file: at the default stages.segments.min_tail_s = 1 s one segment and the 3 ms tail listed as
    rejected; with min_tail_s = 0 (the old behaviour) a second segment with one frame of audio."""
    import soundfile as sf

    root = tmp_path / "src"
    root.mkdir()
    n = 160048  # 10.003 s at 16 kHz
    sf.write(str(root / "long.wav"), (0.3 * np.sin(np.arange(n) * 0.05)).astype(np.float32), 16000, subtype="FLOAT")
    default = _built(manifest(root, tmp_path / "default"))
    got = samples(default)
    assert sorted(got) == ["long_wav_0000"] and got["long_wav_0000"]["meta.json"]["duration_s"] == 10.0
    (tail,) = load_index(default)["rejected"]
    assert tail["stage"] == "segment" and "0.003 s" in tail["reason"] and "min_tail_s" in tail["reason"]
    old = samples(_built(manifest(root, tmp_path / "old", "stages.segments.min_tail_s=0")))
    assert sorted(old) == ["long_wav_0000", "long_wav_0001"]
    assert old["long_wav_0001"]["meta.json"]["duration_s"] == 0.003
    with pytest.raises(ManifestError, match="min_tail_s"):
        manifest(root, tmp_path / "bad", "stages.segments.min_tail_s=-1.0")
