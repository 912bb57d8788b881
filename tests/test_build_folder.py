"""The output folder of a build: one build at a time, no index over a half-rebuilt dataset, another
dataset's files never touched, long keys written, task keys unique per build, one-line errors.

Builds here use the UniSeg pipeline on a few synthetic images with the weight-free backbone (the
fastest real pipeline); the guarantees are the runner's, the same for every pipeline."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import webdataset as wds
from click.testing import CliRunner

from distillkit.pipelines import runner
from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.cli import main
from distillkit.pipelines.inspect import verify
from distillkit.pipelines.manifest import ManifestError
from distillkit.pipelines.runner import BuildError, build
from distillkit.pipelines.shards import _tarinfo, write_shard
from tests.conftest import kill_build_at_shard


@pytest.fixture(scope="module")
def images(six_images) -> Path:
    """Six synthetic images (with ground truth): the fastest real pipeline (UniSeg, weight-free backbone)."""
    return six_images


def manifest(root: Path, out: Path, *extra: str):
    return load_manifest("demo-uniseg", [f"source.root={root}", f"output.dir={out}", "cluster.scheduler=serial",
                                         "output.samples_per_shard=2", *extra])


def test_a_second_build_into_a_locked_folder_stops_at_once(images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with runner._build_lock(out, manifest(images, out)):
        with pytest.raises(BuildError, match="another build is writing this folder"):
            build(manifest(images, out), progress=False)
        cli = CliRunner().invoke(main, ["build", "demo-uniseg", "--quiet", "--set", f"source.root={images}",
                                        "--set", f"output.dir={out}", "--set", "cluster.scheduler=serial"])
        assert cli.exit_code == 2 and "another build is writing" in cli.output
    assert build(manifest(images, out), progress=False).written == 6  # the lock goes with the build


def test_an_interrupted_rebuild_leaves_no_index_over_mixed_shards(images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    build(manifest(images, out), progress=False)
    assert (out / "index.json").is_file()
    kill_build_at_shard(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build(manifest(images, out, "stages.uniap.min_size=6"), progress=False)
    assert not (out / "index.json").exists(), "an index over old and new shards would be read as finished"
    with pytest.raises(FileNotFoundError, match="no index.json"):
        verify(out)
    monkeypatch.undo()  # the build is no longer killed
    result = build(manifest(images, out, "stages.uniap.min_size=6"), progress=False)
    assert result.reused_shards == 1 and verify(out).ok  # the shard finished before the kill is kept
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_another_datasets_files_are_never_touched(images, tmp_path):
    out = tmp_path / "out"
    build(manifest(images, out, "name=uni-b"), progress=False)
    theirs = sorted(p.name for p in out.iterdir())
    with pytest.raises(BuildError, match="holds the dataset 'uni-b'"):
        build(manifest(images, out, "name=uni"), progress=False)
    assert sorted(p.name for p in out.iterdir()) == theirs
    # without an index (an interrupted build of theirs), a prefix of their name still matches nothing of theirs
    (out / "index.json").unlink()
    build(manifest(images, out, "name=uni", "output.samples_per_shard=6"), progress=False)
    assert {p for p in theirs if p.startswith("uni-b-")} <= {p.name for p in out.iterdir()}


def test_a_long_source_path_builds_and_stock_tools_read_it(images, tmp_path):
    root = tmp_path / "deep" / ("a" * 60) / ("b" * 60)
    root.mkdir(parents=True)
    src = next(images.glob("*.jpg"))
    (root / (("c" * 90) + ".jpg")).write_bytes(src.read_bytes())
    result = build(manifest(tmp_path / "deep", tmp_path / "out"), progress=False)
    assert result.written == 1
    tar = next((tmp_path / "out").glob("*.tar"))
    listing = subprocess.run(["tar", "tf", str(tar)], capture_output=True, text=True, check=True).stdout.split()
    (sample,) = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert len(sample["__key__"]) > 200 and all(name.startswith(sample["__key__"] + ".") for name in listing)


def test_long_keys_are_deterministic_and_short_ones_keep_ustar_bytes(tmp_path):
    long_key = "k" * 150
    a = write_shard(tmp_path / "a.tar", [(long_key, {"x.json": b"{}"})])
    b = write_shard(tmp_path / "b.tar", [(long_key, {"x.json": b"{}"})])
    assert a == b
    import io
    import tarfile

    ustar = io.BytesIO()
    with tarfile.open(fileobj=ustar, mode="w", format=tarfile.USTAR_FORMAT) as t:
        t.addfile(_tarinfo("short.x.json", 2), io.BytesIO(b"{}"))
    write_shard(tmp_path / "c.tar", [("short", {"x.json": b"{}"})])
    assert (tmp_path / "c.tar").read_bytes() == ustar.getvalue()  # shards written before pax stay byte-equal


def test_two_builds_of_one_manifest_on_one_scheduler_write_both_folders(images, tmp_path):
    """Two CLI builds of one manifest into two folders, at the same time, on one shared scheduler: each writes
    its own shards (their task keys differ though the fingerprints, which leave out output.dir, are equal)."""
    import sys

    from distillkit.pipelines.executor import dask_client

    with dask_client("", workers=2) as client:
        runs = [subprocess.Popen([sys.executable, "-m", "distillkit", "build", "demo-uniseg", "--quiet",
                                  "--scheduler", client.scheduler.address, "--set", f"source.root={images}",
                                  "--set", f"output.dir={tmp_path / name}", "--set", "output.samples_per_shard=2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in ("a", "b")]
        outputs = [run.communicate(timeout=300)[0] for run in runs]
    for name, run, output in zip(("a", "b"), runs, outputs, strict=True):
        assert run.returncode == 0, output
        assert len(list((tmp_path / name).glob("*.tar"))) == 3 and verify(tmp_path / name).ok


def test_records_say_which_distillkit_wrote_each_shard(images, tmp_path):
    out = tmp_path / "out"
    build(manifest(images, out), progress=False)
    index = json.loads((out / "index.json").read_text())
    makers = {json.loads(p.read_text())["built_by"] for p in out.glob("demo-uniseg-*.json")}
    assert len(makers) == 1 and index["built_by"] == sorted(makers) and "@" in makers.pop()


def test_empty_source_and_colliding_keys_are_manifest_errors(images, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no inputs found under source.root"):
        build(manifest(tmp_path / "empty", tmp_path / "out"), progress=False)
    from distillkit.pipelines.registry import get_pipeline

    pipeline = type(get_pipeline("uniseg"))
    real = pipeline.plan

    def colliding(self, m):
        refs, rejected = real(self, m)
        refs[1] = type(refs[1])(refs[0].key, refs[1].source, refs[1].payload)
        return refs, rejected

    monkeypatch.setattr(pipeline, "plan", colliding)
    with pytest.raises(ManifestError, match="two inputs give the sample key") as err:
        build(manifest(images, tmp_path / "out"), progress=False)
    assert "scene_0000" in str(err.value) and "scene_0001" in str(err.value)


def test_cli_errors_are_one_line(images, tmp_path, monkeypatch):
    base = ["build", "demo-uniseg", "--quiet", "--set", f"source.root={images}"]
    (tmp_path / "afile").write_text("")
    as_file = CliRunner().invoke(main, [*base, "--set", f"output.dir={tmp_path}/afile", "--scheduler", "serial"])
    assert as_file.exit_code == 2 and "output.dir" in as_file.output and "Traceback" not in as_file.output
    bogus = CliRunner().invoke(main, [*base, "--set", f"output.dir={tmp_path}/o1", "--scheduler", "bogus"])
    assert bogus.exit_code == 2 and "cannot reach dask scheduler bogus" in bogus.output

    def disk_full(task):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "build_shard", disk_full)
    failed = CliRunner().invoke(main, [*base, "--set", f"output.dir={tmp_path}/o2", "--scheduler", "serial"])
    assert failed.exit_code == 3, failed.output
    assert "build did not finish: OSError" in failed.output and len(failed.output.strip().splitlines()) == 1


def test_a_rerun_that_cannot_start_leaves_the_finished_dataset_readable(images, tmp_path):
    from distillkit.pipelines.executor import ClusterError

    out = tmp_path / "out"
    build(manifest(images, out), progress=False)
    before = (out / "index.json").read_bytes()
    with pytest.raises(ClusterError, match="cannot reach dask scheduler"):
        build(manifest(images, out), scheduler="tcp://127.0.0.1:1", progress=False)
    assert (out / "index.json").read_bytes() == before and verify(out).ok


def test_a_filesystem_without_locks_still_builds(images, tmp_path, monkeypatch, caplog):
    import errno
    import fcntl
    import logging

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")  # NFS without lockd

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="distillkit"):
        assert build(manifest(images, tmp_path / "out"), progress=False).written == 6
    assert any("has no file locks" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_shards_and_records_follow_the_umask(tmp_path, umask):
    """As files written with open() would: licensed data built under umask 077 is not made world-readable."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    code = ("import os, sys; os.umask(int(sys.argv[2], 8)); from pathlib import Path; "
            "from distillkit.pipelines.shards import write_shard, write_json_atomic; "
            "write_shard(Path(sys.argv[1]) / 'a.tar', [('k', {'x.json': b'{}'})]); "
            "write_json_atomic(Path(sys.argv[1]) / 'a.json', {})")
    out.mkdir()
    subprocess.run([sys.executable, "-c", code, str(out), oct(umask)], check=True)
    for name in ("a.tar", "a.json"):
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~umask, name
