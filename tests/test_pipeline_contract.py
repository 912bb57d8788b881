"""The runner's side of the pipeline contract: samples stream into the writer, each field is
decoded once for checks and statistics, setup runs once per process, unexpected errors become
rejections (or, with ``raise_errors`` on the serial executor, a plain traceback)."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from distillkit.pipelines import codecs
from distillkit.pipelines.base import FieldSpec, Pipeline, SampleRef, batched
from distillkit.pipelines.cli import main
from distillkit.pipelines.codecs import SampleView, npy_bytes
from distillkit.pipelines.manifest import Key, validate_manifest
from distillkit.pipelines.registry import PIPELINES, get_pipeline
from distillkit.pipelines.runner import build
from distillkit.pipelines.schema import validate_sample
from distillkit.pipelines.shards import iter_samples, load_index


class ProbePipeline(Pipeline):
    """Refs 0..n-1; ref 3 divides by zero. Each build records how much of the shard was on disk."""

    name = "probe"
    schema = {"source": {"root": Key("path", required=True), "n": Key(int, 6)}}
    on_disk: list[int] = []
    setups = 0

    def setup(self, m: Any) -> None:
        type(self).setups += 1

    def plan(self, m: Any) -> tuple[list[SampleRef], list[dict[str, str]]]:
        return [SampleRef(f"s{i}", f"input-{i}", {"i": i}) for i in range(m.get("source.n"))], []

    def build(self, ref: SampleRef, m: Any) -> dict[str, bytes]:
        tmp = list(m.output_dir.glob(".*.tmp-*"))
        type(self).on_disk.append(tmp[0].stat().st_size if tmp else -1)
        scale = 1 // (ref.payload["i"] - 3)  # ref 3: an unexpected ZeroDivisionError, not a Rejected
        return {"x.npy": npy_bytes(np.full(1000, ref.payload["i"] * scale, np.float32))}

    def fields(self, sample: SampleView) -> dict[str, FieldSpec]:
        return {"x.npy": FieldSpec("float32 values")}

    def render(self, sample: SampleView) -> Any:
        raise NotImplementedError


@pytest.fixture
def probe(monkeypatch, tmp_path):
    monkeypatch.setitem(PIPELINES._loaded, "probe", ProbePipeline())
    ProbePipeline.on_disk, ProbePipeline.setups = [], 0
    data = {"name": "probe", "pipeline": "probe", "source": {"root": str(tmp_path)},
            "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 6}, "cluster": {"scheduler": "serial"}}
    return validate_manifest(tmp_path / "probe.toml", data, ProbePipeline.schema)


def test_samples_stream_into_the_writer(probe):
    build(probe, progress=False)
    sizes = [s for s in ProbePipeline.on_disk if s >= 0]
    # while ref i is built, the samples before it are already in the temporary tar
    assert len(sizes) == 6 and sizes == sorted(sizes) and sizes[-1] > sizes[1] > sizes[0] == 0, ProbePipeline.on_disk
    assert ProbePipeline.setups == 1


def test_unexpected_error_is_a_rejection_or_with_raise_errors_a_traceback(probe):
    result = build(probe, progress=False)
    (rej,) = result.rejected
    assert rej["source"] == "input-3" and rej["stage"] == "build"
    assert rej["reason"].startswith("ZeroDivisionError") and "test_pipeline_contract.py:" in rej["reason"]
    assert [k for k, _ in iter_samples(probe.output_dir / load_index(probe.output_dir)["shards"][0]["file"])] == [
        "s0", "s1", "s2", "s4", "s5"]
    with pytest.raises(ZeroDivisionError) as info:
        build(probe, progress=False, raise_errors=True)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "build" in frames and "build_shard" in frames  # a plain local traceback through the stage


def test_cli_serial_raise_errors(probe, tmp_path):
    probe_file = tmp_path / "probe.toml"
    probe_file.write_text(f'name = "probe"\npipeline = "probe"\n[source]\nroot = "{tmp_path}"\n'
                          f'[output]\ndir = "{tmp_path / "cli"}"\n')
    ok = CliRunner().invoke(main, ["build", str(probe_file), "--scheduler", "serial", "--quiet",
                                   "--set", "output.max_rejected=0.5"])
    assert ok.exit_code == 0 and "1 rejected" in ok.output
    boom = CliRunner().invoke(main, ["build", str(probe_file), "--scheduler", "serial", "--raise-errors", "--quiet"])
    assert isinstance(boom.exception, ZeroDivisionError)


def test_each_field_is_decoded_once_for_checks_and_stats(slidr_shards, monkeypatch):
    counts: Counter[str] = Counter()
    real = codecs.decode_field

    def counting(name: str, data: bytes, images: str = "rgb") -> Any:
        counts[name] += 1
        return real(name, data, images)

    monkeypatch.setattr(codecs, "decode_field", counting)
    pipeline = get_pipeline("slidr")
    shard = Path(slidr_shards) / load_index(slidr_shards)["shards"][0]["file"]
    key, raw = next(iter_samples(shard))
    view = validate_sample(pipeline, key, raw)
    pipeline.sample_stats(view)
    assert counts["lidar.npy"] == 1 and counts["pairs.npy"] == 1 and counts["cams.json"] == 1
    assert counts["cam0.sp.png"] == 1 and max(counts.values()) == 1, counts


def test_batched():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 2)) == []
    with pytest.raises(ValueError):
        list(batched([1], 0))
