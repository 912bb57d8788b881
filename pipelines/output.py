"""Where a build writes, behind one interface: ``OutputLocation``, its local folder (``LocalFolder``) and the choice
between it and an object store's prefix (``output_location``; the prefix is ``pipelines.output_s3.RemotePrefix``).

``pipelines.runner`` builds through an ``OutputLocation`` and never asks which kind it has. ``output_location``
picks ``LocalFolder`` (a path, or a ``file://`` URL) or ``RemotePrefix`` (``s3://`` / ``s3a://``, the stores tested
for whole uploads and a conditional lock); any other protocol is refused before anything is written. The local
folder is the common case and keeps its behaviour and cost exactly: temporary name, fsync and rename
(``shards._atomic_file``), an ``flock`` (``distillkit.folder_lock``), and a sha256 of each shard a rerun would reuse.
How a remote prefix gives the same guarantees without rename or ``flock``: ``pipelines/output_s3.py``.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillkit import remote
from distillkit.folder_lock import FolderBusy, folder_lock
from distillkit.pipelines.manifest import Manifest, ManifestError
from distillkit.pipelines.shards import (
    TEMP_INFIX,
    ShardRecord,
    record_name,
    sha256_file,
    temp_file_pattern,
    write_json_atomic,
    write_shard,
)

log = logging.getLogger(__name__)

LOCK_NAME = ".distillkit.lock"
INDEX_NAME = "index.json"

WRITABLE_PROTOCOLS = ("s3", "s3a")
"""Object stores a build can write to (tested against S3: conditional writes, multipart uploads)."""

_FOLDED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")  # two letters at least: not "C:/"
"""A URL through ``pathlib.Path`` (``s3:/bucket/x``): a relative folder name no one means."""

Samples = Iterable[tuple[str, dict[str, bytes]]]


class BuildError(Exception):
    """The build cannot start or could not finish (the output folder is unusable or taken, a task
    failed); the message is one line. (Defined here, where most are raised; ``pipelines.runner`` exports it.)"""


@dataclass(frozen=True)
class Found:
    """What the client's one listing of a remote prefix holds of one shard: sent with its task, so a worker reads
    only the record (a few hundred bytes) to decide whether the shard can be reused."""

    tar_size: int
    tar_mtime: float | None
    record_mtime: float | None


Listing = dict[str, tuple[int, float | None]]
"""Object name -> (size, last-modified time as a POSIX timestamp, None if the store gives none)."""


def parse_record(text: str | bytes) -> ShardRecord | None:
    """A shard record from its JSON text; None for text that is not one (a rerun then rebuilds the shard).

    Args:
        text: the record file's contents.
    """
    try:
        return ShardRecord(**json.loads(text))
    except (ValueError, TypeError):
        return None


def shard_number(name: str) -> re.Pattern[str]:
    """The pattern of dataset ``name``'s shard file names, its group the shard's number (exactly: ``uni-000003.tar``,
    not ``uni-b-000003.tar``).

    Args:
        name: the dataset's name.
    """
    return re.compile(rf"{re.escape(name)}-(\d{{6}})\.tar")


class OutputLocation(ABC):
    """Where one build writes its shards, records and ``index.json``."""

    @property
    @abstractmethod
    def index_path(self) -> Path | str:
        """``index.json``'s path or URL (what the build reports)."""

    @abstractmethod
    def prepare(self, m: Manifest) -> None:
        """Make the location writable (create the folder).

        Args:
            m: the manifest being built (named in the error).

        Raises:
            ManifestError: ``output.dir`` cannot be used.
        """

    @abstractmethod
    def lock(self, m: Manifest) -> Any:
        """A context manager holding the location for one build.

        Args:
            m: the manifest being built.

        Raises:
            BuildError: another build holds the location (or, remotely, the lock cannot be written).
        """

    @abstractmethod
    def dataset_name(self) -> str | None:
        """The ``name`` in the location's ``index.json``; None without one (or an unreadable one)."""

    @abstractmethod
    def unpublish(self) -> None:
        """Remove ``index.json`` (before any shard changes: it marks a finished dataset, which readers trust)."""

    @abstractmethod
    def scan(self) -> Listing | None:
        """One listing of the location, for ``remove_stale`` and ``found``; None where each worker looks for
        itself (a local folder: a stat is as cheap as a listing entry)."""

    @abstractmethod
    def remove_stale(self, name: str, n_tasks: int, listing: Listing | None) -> None:
        """Remove shards numbered past the plan (and their records) and this dataset's leftovers.

        Args:
            name: the dataset's name (only its exact shard names match: ``uni-000003.tar``, not ``uni-b-...``).
            n_tasks: the shards of the current plan.
            listing: ``scan``'s result.
        """

    @abstractmethod
    def remove_temp_files(self, name: str) -> int:
        """Remove what killed writers of dataset ``name`` left unfinished (only while the build holds the lock,
        when no writer of it can be running); returns how many.

        Args:
            name: the dataset's name.
        """

    def found(self, listing: Listing | None, tar_name: str) -> Found | None:
        """What ``listing`` holds of shard ``tar_name`` and its record (None if either is missing).

        Args:
            listing: ``scan``'s result.
            tar_name: a shard's file name.
        """
        if listing is None or tar_name not in listing or record_name(tar_name) not in listing:
            return None
        size, mtime = listing[tar_name]
        return Found(size, mtime, listing[record_name(tar_name)][1])

    @abstractmethod
    def existing_record(self, tar_name: str, accept: Callable[[ShardRecord], bool],
                        found: Found | None) -> ShardRecord | None:
        """The record of a finished shard ``tar_name`` that ``accept`` takes and whose shard is intact, or None.

        Args:
            tar_name: the shard's file name.
            accept: whether a record is of the current plan (cheap checks, made before the costly ones).
            found: ``found``'s result for this shard (unused locally).
        """

    @abstractmethod
    def write_shard(self, tar_name: str, samples: Samples) -> tuple[int, str, int]:
        """Write a shard whole under ``tar_name``: (bytes, sha256, samples), as ``shards.write_shard``.

        Args:
            tar_name: the shard's file name.
            samples: ``(key, {field: bytes})`` in shard order.
        """

    @abstractmethod
    def write_json(self, name: str, obj: Any) -> None:
        """Write a record or ``index.json`` whole under ``name`` (``shards.json_text``: the same bytes everywhere).

        Args:
            name: a file name inside the location.
            obj: the JSON value.
        """

    def __str__(self) -> str:
        return str(self.where)

    @property
    @abstractmethod
    def where(self) -> Path | str:
        """The folder or prefix, for messages."""


class LocalFolder(OutputLocation):
    """A folder on a local (or shared POSIX) filesystem: temporary names and renames, an ``flock``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def where(self) -> Path:
        return self.path

    @property
    def index_path(self) -> Path:
        return self.path / INDEX_NAME

    def prepare(self, m: Manifest) -> None:
        if _FOLDED_URL.match(str(self.path)):
            # pathlib folds "s3://bucket/x" to "s3:/bucket/x": building into a local folder named "s3:" is never meant
            scheme = self.path.parts[0]
            raise ManifestError(m.path, "output.dir", f"{self.path} looks like a URL that lost the second slash "
                                                      f"after {scheme!r}; as a path it would be a folder of that name")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ManifestError(m.path, "output.dir", f"cannot create {self.path}: {exc.strerror or exc}") from None

    @contextmanager
    def lock(self, m: Manifest) -> Iterator[None]:
        """An exclusive lock on the folder for the whole build (``distillkit.folder_lock``, shared with
        ``train``'s run folders): a second build into it (which would delete the first's temporary files and mix
        two manifests' shards) stops at once."""
        try:
            with folder_lock(self.path, LOCK_NAME, what="build"):
                yield
        except FolderBusy:
            raise BuildError(f"{self.path}: another build is writing this folder (lock {LOCK_NAME}); wait for it "
                             "or set a different output.dir") from None

    def dataset_name(self) -> str | None:
        index = self.path / INDEX_NAME
        if not index.is_file():
            return None
        try:
            return json.loads(index.read_text()).get("name")
        except (ValueError, OSError, AttributeError):
            return None

    def unpublish(self) -> None:
        (self.path / INDEX_NAME).unlink(missing_ok=True)

    def scan(self) -> None:
        return None

    def remove_stale(self, name: str, n_tasks: int, listing: Listing | None) -> None:
        # Only this dataset's exact names match (``uni-000003.tar``, not ``uni-b-000003.tar``).
        shard = shard_number(name)
        for path in self.path.glob(f"{name}-*.tar"):
            match = shard.fullmatch(path.name)
            if match and int(match.group(1)) >= n_tasks:
                path.unlink()
                path.with_suffix(".json").unlink(missing_ok=True)
        self.remove_temp_files(name)

    def remove_temp_files(self, name: str) -> int:
        temp = temp_file_pattern(name)
        removed = 0
        for tmp in self.path.glob(f".*{TEMP_INFIX}*"):
            if temp.fullmatch(tmp.name):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def existing_record(self, tar_name: str, accept: Callable[[ShardRecord], bool],
                        found: Found | None) -> ShardRecord | None:
        tar = self.path / tar_name
        rec_path = self.path / record_name(tar_name)
        if not (tar.is_file() and rec_path.is_file()):
            return None
        rec = parse_record(rec_path.read_text())
        if rec is None or not accept(rec) or rec.bytes != tar.stat().st_size:
            return None
        # A file can be truncated or edited in place: only its hash says the bytes are the recorded ones.
        return rec if sha256_file(tar) == rec.sha256 else None

    def write_shard(self, tar_name: str, samples: Samples) -> tuple[int, str, int]:
        return write_shard(self.path / tar_name, samples)

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.path / name, obj)


def output_location(output_dir: str | Path) -> OutputLocation:
    """The build output ``output.dir`` names: a local folder (a path or a ``file://`` URL) or a remote prefix.

    Args:
        output_dir: the manifest's ``output.dir``.
    """
    text = str(output_dir)
    if not remote.is_remote(text):
        return LocalFolder(Path(text))
    local = remote.local_path(text)
    if local is not None:
        # A file:// URL is a local folder: renames and flock work there, uploads would only copy.
        return LocalFolder(local)
    protocol = text.split("://", 1)[0].lower()
    if protocol not in WRITABLE_PROTOCOLS:
        # Only S3 is tested for whole-object uploads and a conditional lock; other stores would fail midway
        # (memory:// lives in one process, http(s):// has no writes).
        raise remote.RemoteError(f"{text}: cannot build into {protocol}:// (a build writes to a local folder, "
                                 f"file://, {', '.join(f'{p}://' for p in WRITABLE_PROTOCOLS)})")
    from distillkit.pipelines.output_s3 import RemotePrefix  # the S3 side imports this module's contract

    return RemotePrefix(text)


def check_dataset(location: OutputLocation, m: Manifest) -> None:
    """Refuse a location holding a dataset of another name, rather than mix with or delete it.

    Args:
        location: the build's output.
        m: the manifest being built.

    Raises:
        BuildError: the location holds another dataset.
    """
    old = location.dataset_name()
    if old is not None and old != m.name:
        raise BuildError(f"{location} holds the dataset {old!r}, not {m.name!r}: set a different output.dir "
                         "or remove that dataset first")


__all__ = ["BuildError", "Found", "LocalFolder", "OutputLocation", "check_dataset", "output_location"]
