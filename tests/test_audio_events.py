"""Sound events (issue 23 item 2): the DESED TSV reader and its errors, clipping to a segment, the synthetic
recordings with known events, and a build whose segments carry ``events.json`` (docs/audio.md, "Sound events")."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.cli import main
from distillkit.pipelines.inspect import verify
from distillkit.pipelines.manifest import ManifestError
from distillkit.pipelines.runner import build
from distillkit.pipelines.shards import load_index
from distillkit.sensors.events import COLUMNS, Event, EventsError, check_segment_events, clip_events, read_events
from distillkit.sensors.synth.audio import EVENT_CLASSES, EVENT_GRID_S, make_audio
from distillkit.train.streaming import ShardStream

HEADER = "\t".join(COLUMNS)
SEGMENT_S = 2.0  # the synthetic recordings are 5 s: segments 0-2, 2-4 and a padded 4-5, so events get cut


def tsv(tmp_path, *rows: str, header: str = HEADER):
    path = tmp_path / "events.tsv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


# ---- the TSV -------------------------------------------------------------------------------------------------
def test_read_events_sorts_and_keeps_files_listed_without_events(tmp_path):
    path = tmp_path / "events.tsv"
    # a BOM, the columns in another order plus an extra one, a blank line, "./" in a name, an event-less row
    path.write_text("\ufeffonset\tfilename\tevent_label\toffset\tannotator\n"
                    "1.5\ta.wav\tdog\t2.25\tx\n"
                    "0.5\t./a.wav\tspeech\t1.0\tx\n"
                    "0.5\ta.wav\tcat\t0.75\tx\n"
                    "\n"
                    "\tsub/b.wav\t\t\tx\n", encoding="utf-8")
    got = read_events(path, known={"a.wav", "sub/b.wav", "c.wav"})
    assert got == {"a.wav": [Event(0.5, 0.75, "cat"), Event(0.5, 1.0, "speech"), Event(1.5, 2.25, "dog")],
                   "sub/b.wav": []}
    assert "c.wav" not in got  # no row: no events either, but the caller tells "unlisted" from "listed empty"


@pytest.mark.parametrize("rows, header, says", [
    (["a.wav\t2.0\t1.0\tdog"], HEADER, ":2: onset 2 s >= offset 1 s"),
    (["a.wav\t1.0\t1.0\tdog"], HEADER, ":2: onset 1 s >= offset 1 s"),
    (["a.wav\t0\t1\tdog", "a.wav\t-0.5\t1.0\tdog"], HEADER, ":3: negative onset -0.5 s"),
    (["a.wav\tsoon\t1.0\tdog"], HEADER, ":2: onset 'soon' is not a number of seconds"),
    (["a.wav\t0.0\tnan\tdog"], HEADER, ":2: offset 'nan' is not a finite number of seconds"),
    (["nope.wav\t0.0\t1.0\tdog"], HEADER, ":2: 'nope.wav' is not an audio file under the root"),
    (["a.wav\t0.0\t1.0"], HEADER, ":2: 3 tab-separated fields, the header has 4"),
    (["a.wav\t0.0\t1.0\t "], HEADER, ":2: empty event_label"),
    (["\t0.0\t1.0\tdog"], HEADER, ":2: empty filename"),
    (["a.wav\t0.0\t1.0\tdog"], "filename\tonset\tevent_label", ":1: header lacks the column(s) offset"),
    (["a.wav,0.0,1.0,dog"], "filename,onset,offset,event_label", ":1: header lacks the column(s) filename, onset"),
])
def test_each_bad_tsv_is_one_line_naming_the_file_and_line(tmp_path, rows, header, says):
    path = tsv(tmp_path, *rows, header=header)
    with pytest.raises(EventsError) as err:
        read_events(path, known={"a.wav"})
    msg = str(err.value)
    assert msg.startswith(f"{path}:") and says in msg and "\n" not in msg, msg


# ---- clipping ------------------------------------------------------------------------------------------------
def test_clip_events_relative_clipped_dropped_rounded_sorted():
    events = [Event(0.5, 2.5, "b"), Event(1.0, 1.5, "a"), Event(2.5, 3.0, "c"), Event(0.1, 0.3, "d"),
              Event(1.8, 1.99999, "e"), Event(0.5, 1.2, "a")]
    # segment [1, 2): start as a sample index over the rate gives float noise (16000 / 16000 is exact; 0.1 * 3
    # is not), which rounding to 1e-4 s removes
    got = clip_events(events, start_s=0.1 * 3 + 0.7, duration_s=1.0)
    assert got == [{"onset": 0.0, "offset": 0.2, "event_label": "a"},  # cut at the segment start
                   {"onset": 0.0, "offset": 0.5, "event_label": "a"},
                   {"onset": 0.0, "offset": 1.0, "event_label": "b"},  # spans the whole segment
                   {"onset": 0.8, "offset": 1.0, "event_label": "e"}]  # 0.99999 rounds to the segment end
    assert json.dumps(got) == json.dumps(clip_events(list(reversed(events)), 1.0, 1.0))  # order-free input
    # an event touching the segment only at its boundary, or by less than the rounding step, is dropped
    assert clip_events([Event(0.0, 1.0, "x"), Event(2.0, 3.0, "y"), Event(1.99996, 3.0, "z")], 1.0, 1.0) == []
    check_segment_events(got, 1.0)


@pytest.mark.parametrize("value, says", [
    ({"onset": 0}, "expected a list"),
    ([{"onset": 0.0, "offset": 1.0}], "exactly"),
    ([{"onset": 0.5, "offset": 0.5, "event_label": "a"}], "onset < offset"),
    ([{"onset": 0.0, "offset": 2.5, "event_label": "a"}], "not inside"),
    ([{"onset": 0.5, "offset": 1.0, "event_label": "a"}, {"onset": 0.0, "offset": 1.0, "event_label": "a"}],
     "not sorted"),
    ([{"onset": "0", "offset": 1.0, "event_label": "a"}], "must be numbers"),
])
def test_check_segment_events_rejects(value, says):
    with pytest.raises(ValueError, match=says):
        check_segment_events(value, 2.0)


# ---- the synthetic recordings --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_audio(tmp_path_factory.mktemp("events") / "src", seed=3, size="events")


def tsv_rows(root):
    with (root / "events.tsv").open(newline="") as f:
        return [(r["filename"], float(r["onset"]), float(r["offset"]), r["event_label"])
                for r in csv.DictReader(f, delimiter="\t")]


def test_synth_events_on_the_frame_grid_audible_and_deterministic(source, tmp_path):
    rows = tsv_rows(source)
    wavs = sorted(p.relative_to(source).as_posix() for p in source.rglob("*.wav"))
    named = {r[0] for r in rows}
    assert len(wavs) == 6 and named < set(wavs) and len(set(wavs) - named) == 1  # one recording without events
    for cls in EVENT_CLASSES:
        assert len({r[0] for r in rows if r[3] == cls}) >= 2, cls
    total = 0.0
    for rel in wavs:
        y, rate = sf.read(source / rel)
        assert rate == 16000 and y.ndim == 1
        total += len(y) / rate
        mine = [r for r in rows if r[0] == rel]
        inside = np.zeros(len(y), bool)
        for _, on, off, label in mine:
            for t in (on, off):
                assert abs(t / EVENT_GRID_S - round(t / EVENT_GRID_S)) < 1e-9  # onsets and offsets on the grid
            assert 0 <= on < off <= len(y) / rate
            inside[int(round(on * rate)):int(round(off * rate))] = True
            same = [r for r in mine if r[3] == label and r != (rel, on, off, label)]
            assert all(off + 0.1 <= o or f + 0.1 <= on for _, o, f, _ in same)  # never overlaps its own class
        if inside.any():  # the events are where the TSV says: 40 dB over the background
            assert np.sqrt(np.mean(y[inside] ** 2)) > 20 * np.sqrt(np.mean(y[~inside] ** 2))
    assert total <= 40  # "a few dozen seconds": tests stay fast
    again = make_audio(tmp_path / "again", seed=3, size="events")
    assert all((again / p).read_bytes() == (source / p).read_bytes() for p in [*wavs, "events.tsv"])
    assert (make_audio(tmp_path / "other", seed=4, size="events") / "events.tsv").read_bytes() != \
        (source / "events.tsv").read_bytes()


# ---- the build -----------------------------------------------------------------------------------------------
def manifest(root, out, *extra):
    return load_manifest("demo-audio", [f"source.root={root}", f"output.dir={out}", "cluster.scheduler=serial",
                                        f"stages.segments.segment_s={SEGMENT_S}", "stages.segments.min_tail_s=0.5",
                                        *extra])


@pytest.fixture(scope="module")
def builds(source, tmp_path_factory):
    """The same recordings built with ``source.events`` (relative to the root) and without it."""
    out = tmp_path_factory.mktemp("events-shards")
    build(manifest(source, out / "with", "source.events=events.tsv"), progress=False)
    build(manifest(source, out / "without"), progress=False)
    return out / "with", out / "without"


def samples(out):
    return {s["__key__"]: s for s in ShardStream(out, epochs=1, shuffle_shards=False)}


def members(out):
    got = {}
    for entry in load_index(out)["shards"]:
        with tarfile.open(out / entry["file"]) as tar:
            got |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return got


def test_segments_carry_the_events_of_the_tsv(source, builds):
    with_events, _ = builds
    rows = tsv_rows(source)
    got = samples(with_events)
    assert len(got) == 6 * 3
    counted: dict[str, int] = {}
    for key, s in got.items():
        meta = s["meta.json"]
        start, dur = meta["start_s"], meta["duration_s"]
        # computed here from the TSV the synth wrote, independently of sensors.events
        want = sorted(((round(max(on, start) - start, 4), round(min(off, start + dur) - start, 4), label)
                       for rel, on, off, label in rows
                       if rel == meta["source"] and on < start + dur and off > start), key=lambda e: (e[0], e[2]))
        assert [(e["onset"], e["offset"], e["event_label"]) for e in s["events.json"]] == want, key
        for e in s["events.json"]:
            counted[e["event_label"]] = counted.get(e["event_label"], 0) + 1
    # some event crosses a segment boundary (clipped at both sides), and the recording with no row has [] events
    assert any(e["onset"] == 0.0 for s in got.values() if s["meta.json"]["start_s"] > 0 for e in s["events.json"])
    empty = {rel for rel in {s["meta.json"]["source"] for s in got.values()} if rel not in {r[0] for r in rows}}
    assert len(empty) == 1 and all(s["events.json"] == [] for s in got.values() if s["meta.json"]["source"] in empty)
    stats = load_index(with_events)["stats"]
    assert stats["event_segments"] == len(got)
    assert {k.removeprefix("events:"): v for k, v in stats.items() if k.startswith("events:")} == counted
    report = verify(with_events)
    assert report.ok, report


def test_without_source_events_nothing_changes(builds):
    with_events, without = builds
    plain = members(without)
    assert not any(name.endswith(".events.json") for name in plain)
    assert not any(k == "event_segments" or k.startswith("events:") for k in load_index(without)["stats"])
    # every other member is byte-identical: the events add a field and nothing else
    assert {k: v for k, v in members(with_events).items() if not k.endswith(".events.json")} == plain


def test_verify_catches_a_tampered_events_field(builds, tmp_path):
    """The field's check runs in verify: an event outside its segment is reported (and so the test above that
    verify is clean can fail)."""
    import shutil

    with_events, _ = builds
    copy = tmp_path / "copy"
    shutil.copytree(with_events, copy)
    entry = load_index(copy)["shards"][0]
    tar_path = copy / entry["file"]
    with tarfile.open(tar_path) as tar:
        items = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = json.dumps([{"onset": 0.0, "offset": 99.0, "event_label": "tone_low"}]).encode()
    with tarfile.open(tar_path, "w") as tar:
        for m, data in items:
            data = bad if m.name.endswith(".events.json") else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    report = verify(copy)
    assert not report.ok and "events.json" in str(report)


def test_bad_events_tsv_stops_the_build_in_one_line(source, tmp_path):
    bad = tmp_path / "bad.tsv"  # absolute: not under the root
    bad.write_text(f"{HEADER}\nset1/rec_000.wav\t1.0\t0.5\ttone_low\n")
    with pytest.raises(ManifestError, match=r"source\.events: .*bad\.tsv:2: onset 1 s >= offset 0\.5 s"):
        build(manifest(source, tmp_path / "out", f"source.events={bad}"), progress=False)
    result = CliRunner().invoke(main, ["build", "demo-audio", "--quiet", "--set", f"source.root={source}",
                                       "--set", f"output.dir={tmp_path}/out", "--set", "source.events=missing.tsv"])
    assert result.exit_code == 2 and "missing.tsv: no such file" in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
