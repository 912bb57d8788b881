"""Deterministic WebDataset tar shards: write (temp name, fsync, rename) and read back.

We write with the standard library's ``tarfile`` rather than ``webdataset.TarWriter`` so
that every header field is pinned (mtime, uid/gid, names, mode): the same samples give the
same bytes, and a shard's sha256 can be compared across runs and worker counts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from distillkit.pipelines.codecs import UNSAFE_EXTENSIONS

FIXED_MTIME = 0  # 1970-01-01: content, not build time, decides the bytes


@dataclass
class ShardRecord:
    """One shard's entry in ``index.json`` (also saved beside the tar as ``{stem}.json``)."""

    file: str
    samples: int
    bytes: int
    sha256: str
    first_key: str | None
    last_key: str | None
    task_fingerprint: str = ""
    inputs_stamp: str = ""
    rejected: list[dict[str, str]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    devices: dict[str, list[str]] = field(default_factory=dict)
    """Torch stage -> the devices it ran on for this shard (``"cpu"``, ``"cuda"``)."""
    built_by: str = ""
    """The distillkit that wrote this shard (``version@commit``): a build resumed after an upgrade
    reuses shards of the old code (the version is not part of the fingerprint), and says so."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def file_mode() -> int:
    """``0o666`` less this process's umask: the mode a plain ``open(path, "w")`` gives, so shards of licensed
    data built under a restrictive umask stay as private as the rest of the user's files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # elsewhere the only way to read it is to set it (briefly)
    os.umask(umask)
    return 0o666 & ~umask


def shard_filename(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def _tarinfo(member: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = "distillkit"
    return info


def check_key(key: str) -> None:
    if not key or "." in key or key.startswith("_"):
        raise ValueError(f"invalid sample key {key!r}: keys must be non-empty, dot-free, not '_'-prefixed")


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[int, str, int]:
    """Write ``(key, {field: bytes})`` samples to ``path`` atomically.

    Fields are written in sorted order as ``key.field``; the tar goes to a temporary name
    in the same directory (unique per writer, removed if writing fails), is fsynced and
    renamed, so a killed build never leaves a truncated shard under its final name.
    Returns (bytes, sha256, samples written); the sha256 is of the bytes as written.

    The format is POSIX pax: identical to ustar for ASCII member names of up to 100
    characters, and with a pax ``path`` record (deterministic) for longer or non-ASCII ones,
    which ustar cannot hold; GNU tar, bsdtar and Python's tarfile (stock webdataset) read it.
    """
    n = 0
    digest = hashlib.sha256()
    with _atomic_file(Path(path), "wb") as raw:
        hashed = _HashingWriter(raw, digest)
        with tarfile.open(fileobj=hashed, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, fields in samples:
                check_key(key)
                for fname in sorted(fields):
                    if fname.lower().endswith(UNSAFE_EXTENSIONS):
                        raise ValueError(f"field {fname!r} of {key}: code-executing encodings are refused")
                    data = fields[fname]
                    tar.addfile(_tarinfo(f"{key}.{fname}", len(data)), io.BytesIO(data))
                n += 1
    return hashed.size, digest.hexdigest(), n


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[IO[Any]]:
    """A file open for writing under a temporary name beside ``path`` (unique per writer); on a clean exit
    it is fsynced, given the mode ``open()`` would give and renamed to ``path``, else removed."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, file_mode())  # mkstemp makes it private
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through it, so a shard's sha256 is of the bytes
    this writer produced, not re-read from a path another process might have replaced."""

    def __init__(self, raw: Any, digest: Any) -> None:
        self.raw, self.digest, self.size = raw, digest, 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, b: Any) -> int:
        self.digest.update(b)
        self.size += len(b)
        return self.raw.write(b)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Read a shard with the standard library, grouping members WebDataset's way (the key
    ends at the first dot of the basename). Raises ``tarfile.TarError`` on a broken tar."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name
            k, _, fname = base.partition(".")
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if k != key:
                if key is not None:
                    yield key, fields
                key, fields = k, {}
            if fname in fields:
                raise ValueError(f"duplicate field {fname!r} in sample {k}")
            fields[fname] = data
    if key is not None:
        yield key, fields


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name, fsync and rename, so readers never see half a file (nor an
    empty one after a power loss)."""
    with _atomic_file(Path(path), "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def load_index(shard_dir: Path) -> dict[str, Any]:
    path = Path(shard_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index.json (was the build finished?)")
    return json.loads(path.read_text())
