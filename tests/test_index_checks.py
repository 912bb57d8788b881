"""``index.json`` is checked before it is trusted, and bad data ends a command with one line (issue 22, items 3, 6
and 7): its shape (``shards.validate_index``), shard entries kept inside the folder for every reader, counts and
statistics recomputed from the per-shard records (``verify`` reports each difference, the trainers' load path
refuses them), no temporary file of a killed worker left after a build, and one line, exit 2, for an index that
is not JSON, a pickled ``.npy`` or a missing field under ``show`` and a ``.pickle`` field under ``train``.

Each test copies a module-scoped build (six images, uniseg; three audio clips) into ``tmp_path`` before breaking it.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from distillkit.messages import one_line
from distillkit.pipelines import runner
from distillkit.pipelines.cli import main
from distillkit.pipelines.inspect import verify
from distillkit.pipelines.shards import BadIndex, iter_samples, load_index, sha256_file
from tests.conftest import build_serial, keep_audio_files
from tests.index_helpers import rewrite_shard


@pytest.fixture(scope="module")
def uniseg_dir(six_images, tmp_path_factory) -> Path:
    """Six images in three uniseg shards (serial build, about 1 s): read-only, copy before changing."""
    return build_serial("demo-uniseg", tmp_path_factory.mktemp("index-uniseg"), f"source.root={six_images}",
                        "output.samples_per_shard=2")


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """Three audio clips in two shards (about 5 s): read-only, copy before changing."""
    from distillkit.sensors.synth.audio import make_audio

    root = make_audio(tmp_path_factory.mktemp("index-audio") / "data", seed=0, size="small")
    keep_audio_files(root, 3)
    return build_serial("demo-audio", tmp_path_factory.mktemp("index-audio-shards"), f"source.root={root}",
                        "output.files_per_shard=2", "stages.audio.store_waveform=false")


def _copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_index(d: Path, edit) -> None:
    index = json.loads((d / "index.json").read_text())
    edit(index)
    (d / "index.json").write_text(json.dumps(index))


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_line_error(result, *needles: str) -> str:
    """The command failed with exit 2 and one line ``error: ...`` holding every needle (no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# --------------------------------------------------------------------------- 1. shape, names, one-line errors


def test_an_index_that_is_not_json_is_one_line_for_every_command(uniseg_dir, tmp_path):
    d = _copy(uniseg_dir, tmp_path)
    (d / "index.json").write_text('{"pipeline": "uniseg", "shards": [')  # cut off mid-write by hand
    for args in (["verify", str(d)], ["stats", str(d)], ["show", str(d), "--out", str(tmp_path / "x.png")],
                 ["train", "uniseg", "--shards", str(d), "--max-steps", "1", "--out", str(tmp_path / "run")]):
        _one_line_error(_cli(*args), f"{d / 'index.json'}", "not JSON")
    (d / "index.json").write_bytes(b"\x80\x81 garbage")
    with pytest.raises(BadIndex, match=r"index\.json: not JSON \(not UTF-8"):
        load_index(d)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda i: i.pop("pipeline"), "pipeline is null"),
    (lambda i: i.update(shards={"file": "a.tar"}), "shards is dict"),
    (lambda i: i["shards"][1].pop("sha256"), r"shards\[1\] has no sha256"),
    (lambda i: i["shards"][0].update(samples=True), r"shards\[0\]\.samples is True"),
    (lambda i: i["shards"][0].update(bytes=-1), r"shards\[0\]\.bytes is -1"),
    (lambda i: i["shards"][2].update(sha256="00" * 16), r"shards\[2\]\.sha256 .* not a sha256"),
    (lambda i: i["shards"].append(dict(i["shards"][0])), "listed twice"),
    (lambda i: i.pop("counts"), "counts is null"),
    (lambda i: i["counts"].update(written=i["counts"]["written"] + 1), "counts.written is .* shard entries hold"),
    (lambda i: i.update(stats={"samples": "six"}), "stats.samples is str"),
    (lambda i: i.update(format_version=99), "format_version 99 is newer"),
    (lambda i: i.update(manifest=[]), "manifest is list"),
])
def test_the_schema_check_names_the_file_and_what_is_wrong(uniseg_dir, tmp_path, edit, message):
    d = _copy(uniseg_dir, tmp_path)
    _edit_index(d, edit)
    with pytest.raises(BadIndex, match=message) as err:
        load_index(d)
    assert str(err.value).startswith(f"{d / 'index.json'}: ") and "\n" not in str(err.value)
    _one_line_error(_cli("verify", str(d)), "index.json")


@pytest.mark.parametrize("name", ["../../../../../../etc/passwd", "/etc/passwd", "sub/demo-uniseg-000000.tar",
                                  "..", "outside-link.tar"])
def test_a_shard_entry_outside_the_folder_is_refused_by_every_reader(uniseg_dir, tmp_path, name):
    import distillkit

    d = _copy(uniseg_dir, tmp_path)
    if name == "outside-link.tar":  # a symlink in the folder that points out of it
        shutil.copy(d / "demo-uniseg-000000.tar", tmp_path / "elsewhere.tar")
        (d / name).symlink_to(tmp_path / "elsewhere.tar")
    _edit_index(d, lambda i: i["shards"][0].update(file=name))
    with pytest.raises(BadIndex, match="outside the folder|not a file name of this folder"):
        load_index(d)
    with pytest.raises(BadIndex):
        distillkit.open_shards(d)  # the public reader: directory ...
    with pytest.raises(BadIndex):
        distillkit.open_shards(d / "index.json")  # ... or its index
    for args in (["verify", str(d)], ["stats", str(d)], ["show", str(d), "--out", str(tmp_path / "x.png")]):
        _one_line_error(_cli(*args), repr(name))


def test_a_symlink_that_stays_inside_the_folder_is_read(uniseg_dir, tmp_path):
    d = _copy(uniseg_dir, tmp_path)
    first = load_index(d)["shards"][0]["file"]
    (d / first).rename(d / "real.bin")
    (d / first).symlink_to("real.bin")
    assert load_index(d)["shards"][0]["file"] == first
    report = verify(d)
    assert report.ok, report.problems


# --------------------------------------------------------------------------- 2. counts and stats against the records


def test_verify_recomputes_stats_and_counts_from_the_shard_records(uniseg_dir, tmp_path):
    clean = verify(uniseg_dir)
    assert clean.ok and not clean.unchecked, (clean.problems, clean.unchecked)
    d = _copy(uniseg_dir, tmp_path)
    _edit_index(d, lambda i: (i["stats"].update(tokens_per_image=1000.0, images_with_ground_truth=0.0),
                              i["counts"].update(planned=i["counts"]["planned"] + 3)))
    faults = verify(d).problems
    assert any(f.startswith("index.json: stats.tokens_per_image is 1000.0 in index.json, the shard records give ")
               for f in faults), faults
    assert any("stats.images_with_ground_truth is 0.0" in f for f in faults), faults
    assert any("counts.planned is" in f for f in faults), faults
    result = _cli("verify", str(d))
    assert result.exit_code == 1 and "FAULT index.json: stats.tokens_per_image" in result.output


def test_an_index_older_than_a_statistic_is_read_and_verify_warns(audio_dir, tmp_path):
    """A pipeline that gains a statistic (audio's over_range_segments) must not make older datasets unreadable:
    the index lacks it, the records give it. Readers use only what the index holds: they accept it; verify warns."""
    import distillkit

    d = _copy(audio_dir, tmp_path)
    gained = "over_range_segments"
    records_give = load_index(audio_dir)["stats"][gained]
    _edit_index(d, lambda i: i["stats"].pop(gained))
    assert gained not in load_index(d)["stats"]  # the readers' and trainers' load path
    assert len(list(distillkit.open_shards(d))) == load_index(d)["counts"]["written"]
    report = verify(d)
    assert report.ok, report.problems
    assert report.warnings == [f"index.json: stats.{gained} is not in index.json (the shard records give "
                               f"{records_give!r}): written before the audio pipeline computed it; a rebuild adds it"]
    result = _cli("verify", str(d))
    assert result.exit_code == 0 and f"WARNING index.json: stats.{gained} is not in index.json" in result.output
    _edit_index(d, lambda i: i["stats"].update(logmel_mean=1000.0))  # a value the index holds is still compared
    with pytest.raises(BadIndex, match=r"stats\.logmel_mean is 1000\.0 in index\.json"):
        load_index(d)


def test_a_record_that_disagrees_with_its_entry_is_a_fault(uniseg_dir, tmp_path):
    d = _copy(uniseg_dir, tmp_path)
    record = d / "demo-uniseg-000001.json"
    rec = json.loads(record.read_text())
    rec["samples"] += 1
    rec["stats"]["tokens"] += 1
    record.write_text(json.dumps(rec))
    faults = verify(d).problems
    assert any("demo-uniseg-000001.tar: samples is 2 in index.json, 3 in its record" in f for f in faults), faults
    with pytest.raises(BadIndex, match="disagrees with its shard records"):
        load_index(d)  # the trainers' load path


def test_trainers_refuse_normalisation_statistics_the_records_do_not_give(audio_dir, tmp_path):
    d = _copy(audio_dir, tmp_path)
    _edit_index(d, lambda i: i["stats"].update(logmel_mean=1000.0))
    assert any("stats.logmel_mean is 1000.0" in f for f in verify(d).problems)
    with pytest.raises(BadIndex, match=r"stats\.logmel_mean is 1000\.0 in index\.json, the shard records give -?\d"):
        load_index(d)
    _one_line_error(_cli("train", "audio", "--shards", str(d), "--max-steps", "1", "--out", str(tmp_path / "run")),
                    "stats.logmel_mean is 1000.0")
    assert load_index(audio_dir)["stats"]["logmel_mean"] < 0  # the untouched build loads


def test_records_of_an_older_build_are_read_with_what_cannot_be_checked(uniseg_dir, tmp_path, caplog):
    d = _copy(uniseg_dir, tmp_path)
    for record in d.glob("demo-uniseg-*.json"):
        rec = json.loads(record.read_text())
        del rec["inputs"], rec["stats"]  # as written before records kept them
        record.write_text(json.dumps(rec))
    report = verify(d)
    assert report.ok, report.problems
    assert any(u.startswith("counts.planned:") for u in report.unchecked), report.unchecked
    assert any(u.startswith("stats:") for u in report.unchecked), report.unchecked
    assert "NOT CHECKED stats:" in _cli("verify", str(d)).output
    load_index(d)  # nothing disagrees: readers and trainers go on
    for record in d.glob("demo-uniseg-*.json"):
        record.unlink()  # a folder copied without its records: nothing to compare with, said once
    with caplog.at_level(logging.WARNING, logger="distillkit.pipelines.shards"):
        load_index(d)
        load_index(d)
    said = [r.getMessage() for r in caplog.records if "cannot be checked" in r.getMessage()]
    assert len(said) == 1 and "3 of 3 shard records are missing" in said[0], said


# --------------------------------------------------------------------------- 3. no leftovers


def test_a_killed_workers_temp_shard_is_gone_by_the_end_of_the_build(six_images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = runner.build_shard
    left = out / ".demo-uniseg-000001.tar.tmp-k1ll3d"

    def killed_writer_then_build(task):
        # A worker killed mid-write leaves its partial shard; the build's start-up cleanup already ran by now.
        if task.index == 1:
            left.write_bytes(b"\0" * 4096)
        return real(task)

    monkeypatch.setattr(runner, "build_shard", killed_writer_then_build)
    build_serial("demo-uniseg", out, f"source.root={six_images}", "output.samples_per_shard=2")
    assert not left.exists()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert verify(out).ok


def test_verify_names_stray_temp_files_as_faults_and_other_files_as_warnings(uniseg_dir, tmp_path):
    d = _copy(uniseg_dir, tmp_path)
    (d / "notes.txt").write_text("mine")
    result = _cli("verify", str(d))
    assert result.exit_code == 0 and "WARNING notes.txt: not a file a build writes" in result.output, result.output
    (d / ".demo-uniseg-000002.tar.tmp-abc123").write_bytes(b"\0" * 1000)
    (d / ".other-000000.json.tmp-xyz").write_bytes(b"{")  # another dataset's: its build never writes here
    (d / ".notes.txt.tmp-1").write_bytes(b"")  # an editor's, not a build's
    report = verify(d)
    assert report.problems == [
        ".demo-uniseg-000002.tar.tmp-abc123: stray temporary file of a writer killed before it finished (1000 bytes): "
        "remove it, or rerun the build, which does",
        ".other-000000.json.tmp-xyz: stray temporary file of a build of another dataset, 'other', killed before it "
        "finished (1 bytes): no build of 'demo-uniseg' removes it; remove it by hand"]
    assert report.warnings == [".notes.txt.tmp-1: not a file a build writes (not listed in index.json)",
                               "notes.txt: not a file a build writes (not listed in index.json)"]
    assert _cli("verify", str(d)).exit_code == 1


# --------------------------------------------------------------------------- 4. one line, not a traceback


def _rewrite_first_shard(d: Path, change) -> str:
    """Apply ``change(samples)`` to the first shard (index entry and record kept true); returns the first key."""
    first = load_index(d)["shards"][0]["file"]
    samples = list(iter_samples(d / first))
    change(samples)
    rewrite_shard(d, first, samples)
    return samples[0][0]


def test_show_names_the_sample_and_field_it_cannot_draw(uniseg_dir, tmp_path):
    d = _copy(uniseg_dir, tmp_path)
    key = _rewrite_first_shard(d, lambda samples: samples[0][1].pop("uniap.json"))
    line = _one_line_error(_cli("show", str(d), "--out", str(tmp_path / "x.png")),
                           f"demo-uniseg-000000.tar: sample {key} has no field 'uniap.json'",
                           "which show's picture of a uniseg sample needs; the sample holds ")
    assert "image.jpg" in line.partition("the sample holds ")[2]


def test_show_says_a_pickled_npy_is_never_unpickled(uniseg_dir, tmp_path):
    d = _copy(uniseg_dir, tmp_path)

    def pickle_it(samples):
        buf = io.BytesIO()
        np.save(buf, np.array([{"levels": 1}], dtype=object), allow_pickle=True)
        samples[0][1]["uniap.npy"] = buf.getvalue()

    key = _rewrite_first_shard(d, pickle_it)
    _one_line_error(_cli("show", str(d), "--out", str(tmp_path / "x.png")),
                    f"sample {key}: field 'uniap.npy' cannot be decoded (a pickled object array")


def test_train_on_a_pickle_field_is_one_line(uniseg_dir, tmp_path):
    d = _copy(uniseg_dir, tmp_path)

    def add_pickle(samples):
        path = d / load_index(d)["shards"][0]["file"]
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:  # write_shard refuses such a field
            for key, fields in samples:
                for name, data in sorted({**fields, "extra.pickle": b"\x80\x04K\x01."}.items()):
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        samples.clear()

    index = load_index(d)
    entry = index["shards"][0]
    samples = list(iter_samples(d / entry["file"]))
    add_pickle(samples)
    entry.update(bytes=(d / entry["file"]).stat().st_size, sha256=sha256_file(d / entry["file"]))
    (d / "index.json").write_text(json.dumps(index))
    record = d / "demo-uniseg-000000.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "bytes": entry["bytes"],
                                  "sha256": entry["sha256"]}))
    _one_line_error(_cli("train", "uniseg", "--shards", str(d), "--max-steps", "2", "--batch-size", "2",
                         "--out", str(tmp_path / "run")),
                    "demo-uniseg-000000.tar: sample", "field 'extra.pickle' has a refused (code-executing) format")


def test_one_line_of_an_error_a_dataloader_worker_raised():
    from distillkit.pipelines.codecs import UnsafeFieldError

    wrapped = UnsafeFieldError("Caught UnsafeFieldError in DataLoader worker process 0.\nOriginal Traceback (most "
                               "recent call last):\n  File \"x.py\", line 1, in f\ndistillkit.pipelines.codecs."
                               "UnsafeFieldError: a.tar: sample k: field 'x.pickle' has a refused format\n")
    assert one_line(wrapped) == "a.tar: sample k: field 'x.pickle' has a refused format"
    assert one_line(UnsafeFieldError("first\nsecond")) == "first"
    assert one_line(RuntimeError()) == "RuntimeError"
    advice = "x" * 150 + ". Then some advice torch appends. And more."
    assert one_line(RuntimeError(f"\n  {advice}\nsecond"), with_type=True) == f"RuntimeError: {'x' * 150}."
    assert one_line(OSError("short. two"), with_type=True) == "OSError: short. two"
