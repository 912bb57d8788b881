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
import logging
import math
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from distillkit.pipelines.codecs import UNSAFE_EXTENSIONS
from distillkit.remote import child, is_remote, join, local_path, location, open_seekable, read_bytes, read_many

log = logging.getLogger(__name__)

FIXED_MTIME = 0  # 1970-01-01: content, not build time, decides the bytes
INDEX_FORMAT_VERSION = 1


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
    inputs: int | None = None
    """The inputs (refs) planned into this shard, so that ``verify`` recomputes ``counts.planned`` from the
    records; None in a record written before it was recorded (that count is then not checked)."""

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


TEMP_INFIX = ".tmp-"
"""What marks a temporary file of ``_atomic_file``: ``.{final name}.tmp-{random}``."""


def temp_file_pattern(name: str | None = None) -> re.Pattern[str]:
    """The names of the temporary files a build of dataset ``name`` writes (``_atomic_file``): a shard, a shard
    record or ``index.json`` being written, e.g. ``.uni-000003.tar.tmp-k2j4``. A writer killed before its rename
    leaves one: the build removes its own dataset's (``runner``), ``verify`` names any it finds.

    Args:
        name: the dataset's name (``index.json`` ``name``, the manifest's ``name``); None: any dataset's, the
            group ``dataset`` then giving its name (None for an ``index.json`` being written).
    """
    dataset = re.escape(name) if name is not None else ".+"
    return re.compile(rf"\.(?:(?P<dataset>{dataset})-\d{{6}}\.(?:tar|json)|index\.json){re.escape(TEMP_INFIX)}.*")


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[IO[Any]]:
    """A file open for writing under a temporary name beside ``path`` (unique per writer); on a clean exit
    it is fsynced, given the mode ``open()`` would give and renamed to ``path``, else removed."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_INFIX}", dir=path.parent)
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


class HashingReader(io.RawIOBase):
    """A shard's file object, hashed as it is read, so that a shard is hashed in the one pass that reads it
    (never read twice, never copied): the streams (``train.streaming``) and a remote ``verify`` read through it.

    It reads the file in ``CHUNK`` pieces under an ``io.BufferedReader`` (``open``), so that tarfile's 10 KiB reads
    cost no hashing call each: the hashing is one ``sha256.update`` per MiB (about 2 GB/s of one core;
    ``bench/suite/integrity.py``).
    """

    CHUNK = 1 << 20

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    @classmethod
    def open(cls, raw: Any) -> tuple[io.BufferedReader, HashingReader]:
        """``(buffered file for the tar reader, the hashing reader under it)`` over the opened ``raw``.

        Args:
            raw: a binary file object open for reading.
        """
        hashing = cls(raw)
        return io.BufferedReader(hashing, buffer_size=cls.CHUNK), hashing

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        if n:
            b[:n] = data
            self.digest.update(data)
            self.size += n
        return n

    def finish(self) -> str:
        """Read what the tar reader left unread (the end-of-archive padding) and return the shard's hex digest.
        Bytes the buffered reader above holds were hashed when read from the file: none is counted twice."""
        spare = bytearray(self.CHUNK)
        while self.readinto(spare):
            pass
        return self.digest.hexdigest()

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()

    def __repr__(self) -> str:  # webdataset appends the stream to error messages
        return f"<sha256 reader of {getattr(self.raw, 'name', self.raw)!r}>"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_shard(shard: Path | str) -> IO[bytes]:
    """A shard opened for random access: a local file, or a URL's object (``remote.open_seekable``: range requests,
    retries), for readers that seek over a tar's members (``tarfile.open(fileobj=..., mode="r:")``).

    Args:
        shard: a shard path, or a shard URL (``s3://``, ``https://``, ``file://``).
    """
    return open_seekable(shard) if is_remote(shard) else open(shard, "rb")  # noqa: SIM115 - the caller closes it


def iter_samples(path: Path | IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Read a shard with the standard library, grouping members WebDataset's way (the key
    ends at the first dot of the basename). Raises ``tarfile.TarError`` on a broken tar.

    Args:
        path: a local shard, or a file object read front to back (a remote shard from ``remote.open_read``,
            through a ``HashingReader``): read in tarfile's stream mode, each member once, in order.
    """
    key: str | None = None
    fields: dict[str, bytes] = {}
    opened = (tarfile.open(path, mode="r:") if isinstance(path, (str, os.PathLike))
              else tarfile.open(fileobj=path, mode="r|"))
    with opened as tar:
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


def json_text(obj: Any) -> str:
    """The text a build writes for a record or ``index.json``: one function for the local folder and an object
    store's prefix (``pipelines.output``), so both get the same bytes.

    Args:
        obj: a JSON-serialisable value.
    """
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name, fsync and rename, so readers never see half a file (nor an
    empty one after a power loss)."""
    with _atomic_file(Path(path), "w") as f:
        f.write(json_text(obj))


def index_for_tars(shard_dir: Path, pipeline: str, files: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """An ``index.json`` for tars written outside a build (tests, benchmarks, hand-made folders), in the shape
    ``load_index`` accepts: each tar read for its samples and first/last keys and hashed (``sha256_file``),
    ``counts`` from them, no rejections and empty ``stats`` unless ``extra`` sets them. Nothing is written (write
    it with ``write_json_atomic``); no per-shard records are made, so readers warn once that its counts and
    statistics cannot be checked against them.

    Args:
        shard_dir: the folder holding the tars.
        pipeline: the pipeline name to record.
        files: tar names of ``shard_dir`` in index order (default: every ``*.tar``, sorted by name).
        extra: top-level keys to set or replace (``stats={...}``, ``manifest={...}``).

    Raises:
        tarfile.TarError: a file that is not a readable tar.
    """
    shard_dir = Path(shard_dir)
    names = files if files is not None else sorted(p.name for p in shard_dir.glob("*.tar"))
    shards = []
    for name in names:
        keys = [key for key, _ in iter_samples(shard_dir / name)]
        shards.append({"file": name, "samples": len(keys), "bytes": (shard_dir / name).stat().st_size,
                       "sha256": sha256_file(shard_dir / name), "first_key": keys[0] if keys else None,
                       "last_key": keys[-1] if keys else None})
    written = sum(s["samples"] for s in shards)
    return {"format_version": INDEX_FORMAT_VERSION, "pipeline": pipeline, "name": shard_dir.name, "shards": shards,
            "counts": {"planned": written, "written": written, "rejected": 0}, "rejected": [], "stats": {}, **extra}


# --------------------------------------------------------------------------- index.json: read, checked


class BadIndex(ValueError):
    """An ``index.json`` that cannot be trusted: not JSON, not the shape ``distillkit build`` writes, a shard
    entry outside its folder, or counts and statistics that disagree with the per-shard records. The message
    is one line naming the file and what is wrong."""


_SHA256 = re.compile(r"[0-9a-f]{64}")
# Keys every reader relies on (readers open ``file``, epochs count ``samples``, the streams compare ``sha256``,
# bars and trainers read ``counts`` and ``stats``), with the type each must have.
_SHARD_KEYS: dict[str, tuple[type, ...]] = {"file": (str,), "samples": (int,), "bytes": (int,), "sha256": (str,)}
_COUNT_KEYS = ("planned", "written", "rejected")
# Keys the build writes that no reader needs: checked for their type when present (older indexes lack some).
_OPTIONAL_KEYS: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "name": (str,), "manifest": (dict,), "manifest_hash": (str,),
    "package_version": (str,), "git": (dict,), "built_by": (list,), "input_fingerprint": (str,),
    "rejected": (list,), "stat_units": (dict,), "torch_stages": (dict,),
}


def _typed(value: Any, kinds: tuple[type, ...]) -> bool:
    # bool is an int to Python, never to us: a "samples": true is a broken index
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


NOT_IN_NAMES = frozenset("/\\\0%?#")
"""Characters no shard name may hold: a path's separators and NUL, and what a URL gives a meaning (``%`` escapes,
``?`` a query, ``#`` a fragment): a name ``%2e%2e%2fx.tar`` is plain on disk, but in a URL folder the server decodes
it to ``../x.tar``. Builds never write them (``shard_filename``: a manifest name, ``-``, digits, ``.tar``)."""


def plain_shard_name(name: Any) -> bool:
    """Whether ``name`` may name a shard of a folder: a file name of that folder itself, not a path
    (no ``/`` or ``\\``, not ``.`` or ``..``) and the same name in a URL (no ``%``, ``?``, ``#``), so that no index
    can make a reader open a file elsewhere, on disk or on a server.

    Args:
        name: a ``shards[i].file`` value of an ``index.json``.
    """
    return isinstance(name, str) and name not in ("", ".", "..") and not NOT_IN_NAMES.intersection(name)


def validate_index(index: Any, path: Path | str) -> dict[str, Any]:
    """Check the shape of a parsed ``index.json`` (what ``pipelines.runner`` writes) and that every shard entry
    names a file inside its folder; returns ``index``.

    Required: ``pipeline``; ``shards``, a list of ``{file, samples, bytes, sha256}`` (``first_key`` and
    ``last_key`` strings or null when present) with no file listed twice; ``counts`` with integer ``planned``,
    ``written`` (the shards' samples summed) and ``rejected`` (the length of ``rejected`` when present);
    ``stats``, names to numbers. The other keys the build writes are checked for their type when present.

    Args:
        index: the parsed JSON.
        path: the ``index.json`` it came from (for messages, and its folder for the symlink check), a ``Path`` or
            a URL (``remote``: an object store has no symlinks, and a URL folder's shards are objects under it).

    Raises:
        BadIndex: naming ``path`` and the first thing wrong.
    """

    def bad(what: str) -> BadIndex:
        return BadIndex(f"{path}: {what}")

    if not isinstance(index, dict):
        raise bad(f"not an index (a JSON {_kind(index)}, not an object)")
    version = index.get("format_version", INDEX_FORMAT_VERSION)
    if _typed(version, (int,)) and version > INDEX_FORMAT_VERSION:
        raise bad(f"format_version {version} is newer than this distillkit reads ({INDEX_FORMAT_VERSION}): "
                  "upgrade distillkit")
    if not isinstance(index.get("pipeline"), str) or not index["pipeline"]:
        raise bad(f"pipeline is {_kind(index.get('pipeline'))}, expected the name of a pipeline")
    for key, kinds in _OPTIONAL_KEYS.items():
        if key in index and not _typed(index[key], kinds):
            raise bad(f"{key} is {_kind(index[key])}, expected {kinds[0].__name__}")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise bad(f"shards is {_kind(shards)}, expected a list of shard entries")
    # A file:// URL names a local folder: its symlinks are checked as a path's (an object store has none).
    local = local_path(path) if isinstance(path, str) and is_remote(path) else Path(path)
    folder = local.parent if local is not None else None
    seen: set[str] = set()
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise bad(f"shards[{i}] is {_kind(entry)}, expected an object")
        for key, kinds in _SHARD_KEYS.items():
            if key not in entry:
                raise bad(f"shards[{i}] has no {key}")
            if not _typed(entry[key], kinds) or (kinds == (int,) and entry[key] < 0):
                raise bad(f"shards[{i}].{key} is {entry[key]!r}, expected "
                          f"{'a count >= 0' if kinds == (int,) else 'a string'}")
        name = entry["file"]
        if not plain_shard_name(name):
            raise bad(f"shards[{i}].file {name!r} is not a file name of this folder (a path, '..', or '%', '?', "
                      "'#' that a URL decodes): refused, readers open only files inside the folder")
        if name in seen:
            raise bad(f"shards[{i}].file {name!r} is listed twice")
        seen.add(name)
        if not _SHA256.fullmatch(entry["sha256"]):
            raise bad(f"shards[{i}].sha256 {entry['sha256'][:80]!r} is not a sha256 (64 lowercase hex digits)")
        for key in ("first_key", "last_key"):
            if key in entry and not _typed(entry[key], (str, type(None))):
                raise bad(f"shards[{i}].{key} is {_kind(entry[key])}, expected a string or null")
        member = folder / name if folder is not None else None
        if member is not None and member.is_symlink():  # a link inside the folder may still point anywhere
            target = member.resolve()
            if not target.is_relative_to(folder.resolve()):
                raise bad(f"shards[{i}].file {name!r} is a symlink to {target}, outside the folder: refused")
    counts = index.get("counts")
    if not isinstance(counts, dict):
        raise bad(f"counts is {_kind(counts)}, expected an object with {', '.join(_COUNT_KEYS)}")
    for key in _COUNT_KEYS:
        if not _typed(counts.get(key), (int,)) or counts[key] < 0:
            raise bad(f"counts.{key} is {counts.get(key)!r}, expected a count >= 0")
    listed = sum(entry["samples"] for entry in shards)
    if counts["written"] != listed:
        raise bad(f"counts.written is {counts['written']} but the shard entries hold {listed} samples")
    if "rejected" in index and counts["rejected"] != len(index["rejected"]):
        raise bad(f"counts.rejected is {counts['rejected']} but rejected lists {len(index['rejected'])} entries")
    stats = index.get("stats")
    if not isinstance(stats, dict):
        raise bad(f"stats is {_kind(stats)}, expected an object of numbers")
    for key, value in stats.items():
        if not _typed(value, (int, float)):
            raise bad(f"stats.{key} is {_kind(value)}, expected a number")
    return index


def load_index(shard_dir: Path | str, check_records: bool = True) -> dict[str, Any]:
    """A shard folder's ``index.json``, checked before anyone trusts it: parsed, its shape validated
    (``validate_index``: every shard entry a file of this folder) and, with ``check_records``, its counts and
    statistics recomputed from the per-shard records beside the tars (``check_records``).

    Readers, trainers and ``distillkit stats``/``show`` all come through here, so an index that lists
    ``../../etc/passwd`` or whose normalisation statistics were edited is refused by all of them alike.

    Args:
        shard_dir: the shard folder: a ``Path``, or a URL (``s3://``, ``https://``, ``file://``; ``remote``) whose
            ``index.json`` and records are read from the same place and checked alike.
        check_records: also compare counts and statistics with the per-shard records (what the trainers
            normalise with); ``verify`` passes False and reports each difference itself. A folder without
            records (copied without its ``.json`` files) is accepted with a warning: nothing to compare with. A
            statistic the records give but the index lacks (built before the pipeline computed it) is accepted:
            only the values the index holds, which readers use, must agree.

    Raises:
        FileNotFoundError: no ``index.json`` (not a shard folder, or an unfinished build).
        BadIndex: an unreadable, malformed or inconsistent index, in one line naming the file.
        remote.RemoteError: a URL folder whose index or records cannot be fetched (a refused credential, a server
            that does not answer after the retries), in one line naming the URL.
    """
    path = child(shard_dir, "index.json")
    try:
        data = _read_index_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no index.json (was the build finished?)") from None
    try:
        index = json.loads(data)
    except json.JSONDecodeError as exc:
        raise BadIndex(f"{path}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise BadIndex(f"{path}: not JSON (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    validate_index(index, path)
    if check_records:
        found = _records_checked(location(shard_dir), index, data)
        if found.faults:
            more = f" (and {len(found.faults) - 1} more)" if len(found.faults) > 1 else ""
            raise BadIndex(f"{path}: {found.faults[0]}{more}: the index disagrees with its shard records; "
                           "distillkit verify lists every difference, a rebuild writes a true index")
        if found.missing_records and path not in _warned:
            _warned.add(path)
            log.warning("%s: %s: its counts and statistics cannot be checked", path, found.unchecked[0])
    return index


_warned: set[Path | str] = set()  # folders whose unchecked index was already reported in this process
_remote_checks: dict[tuple[str, str], RecordCheck] = {}
"""``compare_with_records`` of URL folders in this process, by folder and sha256 of the ``index.json`` bytes: a
trainer's start loads the index several times (its checks, the shard list), and each remote record check fetches
every shard record. A rebuilt folder has another index (its shards' sha256), so it is checked again."""


def _records_checked(shard_dir: Path | str, index: dict[str, Any], data: bytes) -> RecordCheck:
    """``compare_with_records``, once per process for a URL folder whose ``index.json`` bytes are ``data``."""
    if not isinstance(shard_dir, str):
        return compare_with_records(shard_dir, index)  # local records: cheap to read, and may change any time
    key = (shard_dir.rstrip("/"), hashlib.sha256(data).hexdigest())
    if key not in _remote_checks:
        _remote_checks[key] = compare_with_records(shard_dir, index)
    return _remote_checks[key]


def _read_index_bytes(path: Path | str) -> bytes:
    """An ``index.json``'s bytes, local or remote; ``FileNotFoundError`` when there is none."""
    if isinstance(path, str):
        return read_bytes(path)  # RemoteNotFound is a FileNotFoundError; other failures stay RemoteError
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadIndex(f"{path}: cannot be read ({exc.strerror or exc})") from None


def shard_paths(shard_dir: Path | str) -> list[Path | str]:
    """The shards ``shard_dir/index.json`` lists, in index order (``load_index``'s checks passed).

    Args:
        shard_dir: the shard folder, a ``Path`` or a URL (then the shards are URLs under it).

    Raises:
        FileNotFoundError: no ``index.json``.
        BadIndex: see ``load_index``, or an index that lists no shards.
    """
    folder = location(shard_dir)
    index = load_index(folder)
    if not index["shards"]:
        raise BadIndex(f"{child(folder, 'index.json')}: lists no shards")
    return [child(folder, entry["file"]) for entry in index["shards"]]


def record_name(shard_file: str) -> str:
    """The per-shard record written beside ``shard_file`` (``uni-000003.tar`` -> ``uni-000003.json``).

    Args:
        shard_file: a shard's file name.
    """
    return Path(shard_file).with_suffix(".json").name


def sum_stats(per_shard: Iterable[dict[str, float]]) -> dict[str, float]:
    """The shards' additive statistics summed in shard order: the totals ``Pipeline.finalize_stats`` turns into
    ``index.json``'s ``stats``. One function for the build and ``verify``, so that both add in the same order and
    get the same floats to the last bit.

    Args:
        per_shard: each shard record's ``stats``, in index order.
    """
    totals: dict[str, float] = {}
    for stats in per_shard:
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


@dataclass
class RecordCheck:
    """What ``compare_with_records`` found."""

    faults: list[str] = field(default_factory=list)
    """Differences between ``index.json`` and the records (or records that cannot be read)."""
    unchecked: list[str] = field(default_factory=list)
    """What could not be checked, and why (records missing or written before a field was recorded, statistics
    counted while planning)."""
    warnings: list[str] = field(default_factory=list)
    """Statistics the records give but ``index.json`` lacks: an index written before the pipeline computed them.
    Nothing in the index is wrong (no reader can use a value it does not hold), so readers accept it."""
    missing_records: bool = False
    """Some shard has no record: nothing of counts and statistics was compared."""


def compare_with_records(shard_dir: Path | str, index: dict[str, Any]) -> RecordCheck:
    """Recompute ``index``'s counts and statistics from the per-shard records (``{stem}.json`` beside each tar,
    written by the shard's task) and list every difference.

    A record must agree with its index entry (samples, bytes, sha256, first and last key); ``counts.written`` is
    the records' samples, ``counts.rejected`` the plan's rejections plus the records', ``counts.planned`` the
    records' inputs plus the plan's rejections; each statistic in ``stats`` is that of ``finalize_stats`` of the
    records' summed statistics, computed by a fresh instance of the pipeline (one that has planned nothing).
    Statistics a pipeline counts while planning (COMODO's recordings left out) are not in the records: listed as
    unchecked. Statistics the records give but the index lacks (a build older than the statistic) are warnings.

    Args:
        shard_dir: the shard folder, a ``Path`` or a URL (its records are then fetched together, ``read_many``).
        index: its ``index.json``, already through ``validate_index``.

    Raises:
        remote.RemoteError: a URL folder's record that cannot be fetched (not a missing one: that is reported).
    """
    found = RecordCheck()
    records: list[dict[str, Any]] = []
    missing: list[str] = []
    names = [record_name(entry["file"]) for entry in index["shards"]]
    if is_remote(shard_dir):
        fetched = read_many([join(str(shard_dir), name) for name in names])
        # By name, not in the dict's order: two entries may share a record ("x.tar" and "x" both give "x.json").
        contents: list[bytes | None] = [fetched[join(str(shard_dir), name)] for name in names]
    else:
        contents = [None] * len(names)
    for entry, name, data in zip(index["shards"], names, contents, strict=True):
        rec_path = Path(shard_dir) / name if not is_remote(shard_dir) else None
        if (rec_path is not None and not rec_path.is_file()) or (rec_path is None and data is None):
            missing.append(name)
            continue
        try:
            rec = json.loads(data if rec_path is None else rec_path.read_bytes())
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {_kind(rec)}, not an object")
        except (OSError, ValueError) as exc:
            found.faults.append(f"{name}: unreadable shard record ({exc})")
            continue
        for key in ("file", "samples", "bytes", "sha256", "first_key", "last_key"):
            if key in rec and key in entry and rec[key] != entry[key]:
                found.faults.append(f"{entry['file']}: {key} is {entry[key]!r} in index.json, "
                                    f"{rec[key]!r} in its record {name}")
        records.append(rec)
    if missing:
        found.missing_records = True
        found.unchecked.append(f"{len(missing)} of {len(index['shards'])} shard records are missing "
                               f"({missing[0]}{', ...' if len(missing) > 1 else ''})")
        return found
    if found.faults:
        return found
    counts = index["counts"]
    written = sum(int(r.get("samples", 0)) for r in records)
    if counts["written"] != written:
        found.faults.append(f"counts.written is {counts['written']}, the shard records hold {written} samples")
    in_shards = [item for r in records for item in (r.get("rejected") or [])]
    listed = index.get("rejected")
    plan_rejected = counts["rejected"] - len(in_shards)
    if plan_rejected < 0 or (listed is not None and listed[len(listed) - len(in_shards):] != in_shards):
        found.faults.append(f"rejected: index.json lists {counts['rejected']} rejections, which do not end with "
                            f"the {len(in_shards)} the shard records hold")
    inputs = [r.get("inputs") for r in records]
    if all(_typed(n, (int,)) for n in inputs):
        planned = sum(inputs) + max(plan_rejected, 0)
        if counts["planned"] != planned:
            found.faults.append(f"counts.planned is {counts['planned']}, the shard records give {planned}")
    else:
        found.unchecked.append("counts.planned: shard records written before distillkit recorded their inputs")
    _compare_stats(index, records, found)
    return found


def _compare_stats(index: dict[str, Any], records: list[dict[str, Any]], found: RecordCheck) -> None:
    if not all(isinstance(r.get("stats"), dict) for r in records):
        found.unchecked.append("stats: shard records without statistics")
        return
    try:
        from distillkit.pipelines.registry import get_pipeline

        registered = get_pipeline(index["pipeline"])
    except Exception as exc:  # noqa: BLE001 - a pipeline not installed here: the rest is still checked
        found.unchecked.append(f"stats: the {index['pipeline']} pipeline cannot be loaded here ({exc})")
        return
    try:
        # A fresh instance: the registered one may keep what its last plan counted (COMODO), maybe of another build.
        pipeline = type(registered)()
    except Exception:  # noqa: BLE001 - a plug-in registered as an instance that takes arguments
        pipeline = registered
    try:
        expected = pipeline.finalize_stats(sum_stats(r["stats"] for r in records))
    except Exception as exc:  # noqa: BLE001 - records whose statistics the pipeline cannot combine
        found.faults.append(f"stats cannot be recomputed from the shard records ({type(exc).__name__}: {exc})")
        return
    stats = index["stats"]
    # Only what the index holds is compared: a statistic the pipeline gained after this build (audio's
    # over_range_segments) would otherwise make every older dataset unreadable. A value the index does hold is
    # what readers use, so one that differs from the records is a fault.
    for key, value in expected.items():
        if key not in stats:
            found.warnings.append(f"stats.{key} is not in index.json (the shard records give {value!r}): written "
                                  f"before the {index['pipeline']} pipeline computed it; a rebuild adds it")
        elif not _same_number(stats[key], value):
            found.faults.append(f"stats.{key} is {stats[key]!r} in index.json, the shard records give {value!r}")
    planned_only = sorted(set(stats) - set(expected))
    if planned_only:
        found.unchecked.append(f"stats {', '.join(planned_only)}: not derived from the shard records "
                               "(counted while planning)")


def _same_number(a: Any, b: Any) -> bool:
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    # The build and this check add the same floats in the same order (sum_stats): equal to the last bit; the
    # tolerance only forgives a platform whose libm rounds a sqrt differently.
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
