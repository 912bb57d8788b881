"""An ``index.json`` for shards a test wrote itself (``write_shard``, ``webdataset.TarWriter``), in the shape
``distillkit build`` writes and ``shards.load_index`` requires: readers refuse an index without ``samples``,
``bytes`` and ``sha256`` per shard, ``counts`` and ``stats``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillkit.pipelines.shards import index_for_tars, sha256_file


def index_of(shard_dir: Path, pipeline: str, files: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """``shards.index_for_tars`` (the one writer of indexes for tars written outside a build), under the name the
    tests know it by.

    Args:
        shard_dir: the folder holding the tars.
        pipeline: the pipeline name to record.
        files: tar names in index order (default: every ``*.tar``, sorted).
        extra: top-level keys to set or replace (``stats={...}``, ``manifest={...}``).
    """
    return index_for_tars(shard_dir, pipeline, files, **extra)


def write_index(shard_dir: Path, pipeline: str, files: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """Write ``index_of(...)`` to ``shard_dir/index.json``; returns it (same arguments)."""
    index = index_of(shard_dir, pipeline, files, **extra)
    (Path(shard_dir) / "index.json").write_text(json.dumps(index))
    return index


def rewrite_shard(shard_dir: Path, file: str, samples: list[tuple[str, dict[str, bytes]]] | None = None,
                  data: bytes | None = None) -> None:
    """Replace the shard ``file`` of a built folder by ``samples`` (``write_shard``) or raw ``data`` (a truncated
    copy), keeping its index entry and its record true (``bytes``, ``sha256``): a test that plants bad samples
    then meets them as bad samples, not as a corrupt shard (the readers compare each shard with its record).

    Args:
        shard_dir: the shard folder.
        file: the shard's file name.
        samples: the new samples, or None with ``data``.
        data: the new bytes, or None with ``samples``.
    """
    from distillkit.pipelines.shards import record_name, write_shard

    path = Path(shard_dir) / file
    if samples is not None:
        write_shard(path, samples)
    else:
        path.write_bytes(data)
    true = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    index = json.loads((Path(shard_dir) / "index.json").read_text())
    for entry in index["shards"]:
        if entry["file"] == file:
            entry.update(true)
    (Path(shard_dir) / "index.json").write_text(json.dumps(index))
    record = Path(shard_dir) / record_name(file)
    if record.is_file():
        record.write_text(json.dumps({**json.loads(record.read_text()), **true}))
