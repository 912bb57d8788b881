"""Readers notice corruption while streaming: every shard is hashed as it is read and compared with its index.json
record at its end (train.streaming, "Integrity")."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest

import distillkit
from distillkit.pipelines.shards import BadIndex
from distillkit.train.streaming import CorruptShard, DuplicateShards, ShardStream, make_loader
from tests.test_train_streaming import write_shards


def _sample(key, rng):
    return {"__key__": key, "x.json": json.dumps({"n": int(key[1:])}).encode(), "label.cls": b"%d" % (int(key[1:]) % 7)}


def recorded_shards(out: Path, sizes: list[int]) -> Path:
    """Tars of ``_sample``s (``sizes`` samples each) and their ``index.json``, which records each shard's sha256 and
    bytes as a build's does (``write_shards`` -> ``shards.index_for_tars``)."""
    return write_shards(out, sizes, make=_sample)


def flip_member_byte(tar: Path, suffix: str, nth: int = 0) -> str:
    """Flip the first data byte of the ``nth`` member whose name ends in ``suffix`` (the tar stays valid: header
    checksums do not cover data); returns the member's name."""
    with tarfile.open(tar) as tf:
        member = [m for m in tf.getmembers() if m.name.endswith(suffix)][nth]
    data = bytearray(tar.read_bytes())
    data[member.offset_data] ^= 0x01
    tar.write_bytes(bytes(data))
    return member.name


def _keys(stream: ShardStream) -> list[str]:
    return [s["__key__"] for s in stream]


def test_intact_shards_stream_as_before(tmp_path, caplog):
    d = recorded_shards(tmp_path / "s", [4, 3, 5])
    with caplog.at_level(logging.WARNING):
        keys = _keys(ShardStream(d, epochs=1, shuffle_shards=False))
    assert keys == [f"k{i:05d}" for i in range(12)] and "unchecked" not in caplog.text


def test_a_flipped_label_byte_stops_the_stream_naming_the_shard(tmp_path):
    d = recorded_shards(tmp_path / "s", [4, 3, 5])
    flip_member_byte(d / "t-000001.tar", ".label.cls", 1)  # "5" -> "4": decodes fine, a wrong label
    stream = ShardStream(d, epochs=1, shuffle_shards=False)
    with pytest.raises(CorruptShard, match=r"t-000001\.tar: corrupt shard: sha256 .* index\.json records") as e:
        _keys(stream)
    assert "\n" not in str(e.value) and stream.bad_samples == 0
    assert "skip" not in str(e.value)  # skipping is no cure (ShardStream's docstring); the CLI adds its own hint
    # through loader workers too (torch re-raises the worker's exception type in the main process)
    with pytest.raises(CorruptShard, match=r"t-000001\.tar: corrupt shard"):
        list(make_loader(ShardStream(d, epochs=1), 1, list, num_workers=2, timeout=60))
    # and through the public reader, given the shard alone (its record is in the index.json beside it)
    with pytest.raises(CorruptShard, match=r"t-000001\.tar"):
        list(distillkit.open_shards(str(d / "t-000001.tar")))


def test_a_shard_replaced_by_a_copy_of_another_is_caught(tmp_path):
    d = recorded_shards(tmp_path / "s", [4, 4])
    shutil.copyfile(d / "t-000000.tar", d / "t-000001.tar")  # same size, valid tar, other samples
    with pytest.raises(CorruptShard, match=r"t-000001\.tar: corrupt shard"):
        _keys(ShardStream(d, epochs=1, shuffle_shards=False))


def test_a_shard_listed_twice_is_refused(tmp_path):
    d = recorded_shards(tmp_path / "s", [4, 4])
    index = json.loads((d / "index.json").read_text())
    index["shards"].append(dict(index["shards"][0]))
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(BadIndex, match=r"'t-000000\.tar' is listed twice"):  # load_index refuses the index
        ShardStream(d)
    with pytest.raises(DuplicateShards, match=r"t-000000\.tar: listed twice"):  # a list given by the caller
        ShardStream("", shards=[str(d / "t-000000.tar"), str(d / "t-000001.tar"), str(d / "t-000000.tar")])
    index["shards"].pop()
    # two entries naming different files with one sha256: one file's data copied over the other's, records too
    index["shards"].append({**index["shards"][1], "file": "t-000002.tar"})
    index["counts"] = {**index["counts"], "written": 12, "planned": 12}  # the index itself stays consistent
    shutil.copyfile(d / "t-000001.tar", d / "t-000002.tar")
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(DuplicateShards, match=r"t-000002\.tar: index\.json records the same sha256 as .*t-000001"):
        ShardStream(d)


@pytest.mark.parametrize("buffer", [0, 100])
def test_skip_counts_the_shard_and_drops_what_is_still_buffered(tmp_path, caplog, buffer):
    d = recorded_shards(tmp_path / "s", [4, 3, 5])
    flip_member_byte(d / "t-000001.tar", ".label.cls")
    stream = ShardStream(d, epochs=1, shuffle_shards=False, shuffle_buffer=buffer, on_corrupt="skip")
    with caplog.at_level(logging.WARNING):
        keys = _keys(stream)
    corrupt = {"k00004", "k00005", "k00006"}
    assert stream.corrupt_shards == 1 and "t-000001.tar: corrupt shard" in caplog.text
    if buffer == 0:  # nothing buffered: the shard's samples were yielded before its end was reached
        assert corrupt <= set(keys) and stream.bad_samples == 0
    else:  # all of it still in the buffer at the shard's end: none of it is yielded
        assert not corrupt & set(keys) and len(keys) == 9 and stream.bad_samples == 3


def test_shards_without_records_stream_unchecked_with_one_warning(tmp_path, caplog):
    d = write_shards(tmp_path / "s", [3, 3], make=_sample)
    index = json.loads((d / "index.json").read_text())
    for entry in index["shards"]:  # an index without sha256 (a build older than the records)
        entry.pop("sha256", None)
    (d / "index.json").write_text(json.dumps(index))
    flip_member_byte(d / "t-000000.tar", ".label.cls")
    with pytest.raises(BadIndex, match="has no sha256"):  # readers of the folder refuse such an index
        ShardStream(d)
    with caplog.at_level(logging.WARNING):  # the shards given one by one (loose .tar files) stream unchecked
        stream = ShardStream("", shards=[str(d / "t-000000.tar"), str(d / "t-000001.tar")], epochs=1,
                             shuffle_shards=False)
        assert len(_keys(stream)) == 6
    assert caplog.text.count("no sha256 recorded") == 1 and "2 of 2 shard(s) stream unchecked" in caplog.text
    # a URL's digest can be given (in either case): then it is checked
    digest = hashlib.sha256((d / "t-000001.tar").read_bytes()).hexdigest().upper()
    urls = [f"pipe:cat {d / 't-000001.tar'}", f"pipe:cat {d / 't-000000.tar'}"]
    ok = ShardStream("", shards=urls, epochs=1, shuffle_shards=False, sha256={urls[0]: digest, urls[1]: "0" * 64})
    with pytest.raises(CorruptShard, match=r"pipe:cat .*t-000000\.tar: corrupt shard"):
        _keys(ok)
    assert ok.corrupt_shards == 0  # the upper-case digest of the intact shard matched
    with pytest.raises(ValueError, match=r"pipe:cat .*sha256= 'abc' is not a sha256"):
        ShardStream("", shards=urls[:1], sha256={urls[0]: "abc"})


def test_a_resumed_stream_does_not_report_again_what_its_replay_reads(tmp_path, caplog):
    """With on_corrupt="skip", a corrupt shard and a bad sample read before the saved position were reported by the
    interrupted run: the resumed stream's replay of those reads repeats neither, and its counters end where an
    uninterrupted stream's do."""
    d = write_shards(tmp_path / "s", [4, 3, 5], make=lambda key, rng: _sample(key, rng) if key != "k00002" else
                     {"__key__": key, "y.json": b"{}"})  # k00002 has no x.json: bad before decoding
    flip_member_byte(d / "t-000001.tar", ".label.cls")

    def loader():
        stream = ShardStream(d, epochs=1, shuffle_shards=False, shuffle_buffer=2, on_corrupt="skip",
                             required=["x.json"])
        return make_loader(stream, 2, list), stream

    whole, s_whole = loader()
    expected = [[s["__key__"] for s in b] for b in whole]
    first, _ = loader()
    it = iter(first)
    consumed = [[s["__key__"] for s in next(it)] for _ in range(3)]  # past the corrupt shard's end
    state = first.stream_state()
    assert state["workers"][0]["corrupt_shards"] == 1 and state["workers"][0]["bad_samples"] >= 1
    again, s_again = loader()
    again.load_stream_state(state)
    caplog.clear()  # what the uninterrupted and the interrupted streams reported
    with caplog.at_level(logging.WARNING, logger="distillkit.train.streaming"):
        rest = [[s["__key__"] for s in b] for b in again]
    assert consumed + rest == expected
    assert "corrupt shard" not in caplog.text and "skipping bad sample" not in caplog.text
    assert (s_again.corrupt_shards, s_again.bad_samples) == (s_whole.corrupt_shards, s_whole.bad_samples)


def test_a_flipped_byte_in_a_built_slidr_shard_is_caught(slidr_shards, tmp_path):
    """A real build's records: a flipped byte of a superpixel label map stops the trainers' stream."""
    d = tmp_path / "copy"
    shutil.copytree(slidr_shards, d)
    tar = sorted(d.glob("*.tar"))[0]
    name = flip_member_byte(tar, ".png")
    assert name
    with pytest.raises(CorruptShard, match=rf"{tar.name}: corrupt shard"):
        for _ in ShardStream(d, epochs=1, images="raw", shuffle_shards=False):
            pass
    stream = ShardStream(d, epochs=1, images="raw", shuffle_shards=False, on_corrupt="skip")
    assert sum(1 for _ in stream) > 0 and stream.corrupt_shards == 1
