"""Manifest validation: every user error stops before work with one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.cli import main
from distillkit.pipelines.manifest import ManifestError, parse_override

from .conftest import DEMO_MANIFEST


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.toml"
    p.write_text(text)
    return p


BASE = """
name = "t"
pipeline = "slidr"
[source]
dataroot = "{root}"
[output]
dir = "{out}"
"""


def test_defaults_and_overrides(tmp_path):
    p = _write(tmp_path, BASE.format(root=tmp_path, out=tmp_path.parent / "out"))
    m = load_manifest(p, ["stages.superpixels.n_segments=30", "stages.projection.min_dist=2"])
    assert m.get("stages.superpixels.n_segments") == 30
    assert m.get("stages.projection.min_dist") == 2.0  # int accepted for float
    assert m.get("stages.superpixels.compactness") == 6.0  # default filled in
    assert m.get("output.samples_per_shard") == 128


def test_parse_override_toml_then_string():
    assert parse_override("a.b=3", "f") == ("a.b", 3)
    assert parse_override("a=[1, 2]", "f") == ("a", [1, 2])
    assert parse_override("a=/data/x y", "f") == ("a", "/data/x y")
    with pytest.raises(ManifestError):
        parse_override("novalue", "f")


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        (BASE + "[stages.superpixels]\nn_segmnts = 3\n", "stages.superpixels.n_segmnts", "unknown key"),
        (BASE + "[stages.superpixels]\nn_segments = 'many'\n", "stages.superpixels.n_segments", "expected int"),
        (BASE + "[cluster]\nworkers = true\n", "cluster.workers", "expected int"),
        (BASE + "bogus = 1\n", "output.bogus", "unknown key"),
        ("bogus = 1\n" + BASE, "bogus", "unknown key"),
        ('name = "t"\npipeline = "nope"\n', "pipeline", "unknown pipeline"),
        # the name starts every shard's file name: nothing readers refuse in a shard name (a URL would decode or cut)
        *[(BASE.replace('name = "t"', f'name = "a{c}b"'), "name", "must be non-empty") for c in ("%", "?", "#", ".")],
    ],
)
def test_bad_manifest_names_key(tmp_path, text, key, fragment):
    p = _write(tmp_path, text.format(root=tmp_path, out=tmp_path.parent / "o"))
    with pytest.raises(ManifestError) as err:
        load_manifest(p)
    assert err.value.key == key
    assert fragment in err.value.reason


def test_missing_dataroot(tmp_path):
    p = _write(tmp_path, BASE.format(root=tmp_path / "absent", out=tmp_path / "o"))
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(p)


def test_output_inside_source(tmp_path):
    p = _write(tmp_path, BASE.format(root=tmp_path, out=tmp_path / "shards"))
    with pytest.raises(ManifestError) as err:
        load_manifest(p)
    assert err.value.key == "output.dir"


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "stages.superpixels.n_segments=abc"],
        ["--set", "source.dataroot=/nonexistent/nuscenes"],
        ["--set", "output.colour=1"],
    ],
)
def test_cli_bad_manifest_exit_2_one_line(tmp_path, args):
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(DEMO_MANIFEST), "--set", f"output.dir={out_dir}", *args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert str(DEMO_MANIFEST) in lines[0]
    assert not out_dir.exists()  # stopped before any work


def test_cli_missing_manifest_file(tmp_path):
    result = CliRunner().invoke(main, ["build", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "manifest file not found" in result.output
