"""Hostile tar members in a shard (issue 22, docs/reliability.md): path-traversal and absolute names, symbolic and
hard links, a device and a folder. The readers stream members and never extract them, so nothing is written
anywhere and no link is followed; the regular members around them are read as usual."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

import distillkit
from distillkit.train.streaming import BadSample, ShardStream
from tests.test_train_streaming import write_shards

MARKER = "outside-the-shard-folder-5f1c"  # in the file the links point at (as JSON, so a reader would decode it)


def _regular(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _special(tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.devmajor, info.devminor = kind, linkname, 1, 3
    tf.addfile(info)


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """Two shards; the second holds a regular sample, then every hostile member, then another regular sample.
    Its index entry carries the true sha256, so the hash check of the stream does not stop it first."""
    secret = tmp_path / "secret.x.json"
    secret.write_text(json.dumps(MARKER))
    d = write_shards(tmp_path / "deep" / "er" / "shards", [2, 2])
    with tarfile.open(d / "t-000001.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        _regular(tf, "k00002.x.json", b'{"n": 2}')
        _regular(tf, "../../../escape.x.json", b'{"n": 90}')  # lands in tmp_path if extracted
        _regular(tf, f"{tmp_path}/absolute.x.json", b'{"n": 91}')
        _special(tf, "k00003.x.json", tarfile.SYMTYPE, str(secret))
        _special(tf, "k00004.x.json", tarfile.LNKTYPE, str(secret))
        _special(tf, "k00005.x.json", tarfile.CHRTYPE)
        _special(tf, "k00006", tarfile.DIRTYPE)
        _regular(tf, "k00007.x.json", b'{"n": 7}')
    index = json.loads((d / "index.json").read_text())
    for entry in index["shards"]:
        data = (d / entry["file"]).read_bytes()
        entry |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (d / "index.json").write_text(json.dumps(index))
    return d, tmp_path


@pytest.mark.parametrize("reader", ["open_shards", "ShardStream"])
def test_hostile_members_write_nothing_and_follow_no_link(hostile: tuple[Path, Path], reader: str) -> None:
    d, top = hostile
    before = sorted(top.rglob("*"))
    if reader == "open_shards":
        with pytest.raises(BadSample, match="escape': its member path is absolute or climbs out"):
            list(distillkit.open_shards(d))  # strict by default: the first hostile member stops it in one line
        stream = distillkit.open_shards(d, strict=False)
    else:
        stream = ShardStream(d, epochs=1, shuffle_shards=False)
    samples = list(stream)
    assert sorted(top.rglob("*")) == before  # nothing extracted, inside the folder or out of it
    keys = [s["__key__"] for s in samples]
    assert {"k00000", "k00001", "k00002", "k00007"} <= set(keys)  # the regular members around them are read
    assert not {"k00003", "k00004", "k00005", "k00006"} & set(keys)  # links, device, folder: no sample
    # a member path that is absolute or climbs out is no sample either: code using keys as paths is not misled
    assert not any(k.startswith("/") or ".." in k.split("/") for k in keys)
    assert getattr(stream, "bad_samples", 2) == 2  # ShardStream counts the two (open_shards' stream may be wrapped)
    fields = [v for s in samples for k, v in s.items() if k != "__key__"]
    assert not any(MARKER in (v.decode(errors="replace") if isinstance(v, bytes) else repr(v)) for v in fields)
