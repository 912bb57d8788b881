"""Reading shards from your own training code (``docs/reading.md``).

Two entry points, both decoding label images (``cam0.sp.png``, see
``distillkit.pipelines.codecs.LABEL_IMAGE_SUFFIXES``) as what they are, (H, W) integer id maps
with their bit depth kept, where a stock ``webdataset`` ``.decode("rgb")`` silently turns them into
(H, W, 3) floats in [0, 1] and clips 16-bit ids to 255:

- :func:`open_shards`: a ``torch.utils.data.IterableDataset`` of decoded samples (the same
  ``ShardStream`` the trainers use), split by rank and DataLoader worker, optionally shuffled.
- :func:`wds_handlers`: the handlers to pass to stock ``webdataset.WebDataset(...).decode(...)``
  for code that builds its own WebDataset pipeline.

Nothing heavy is imported at module level (torch, webdataset and OpenCV are imported by the
functions that need them), so ``import distillkit`` stays cheap.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import numpy as np
    import torch

    from distillkit.train.streaming import ShardStream

__all__ = ["open_shards", "refuse_unsafe_handler", "resolve_rank", "shard_urls", "wds_handlers"]

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

# "https://...", "s3://...", "file://..." URLs are read through fsspec (``distillkit.remote``): a folder URL's
# index.json is checked as a local one; webdataset's "pipe:cmd" is opened by webdataset's gopen and passed through.
_URL = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]*://)")
DEFAULT_SHUFFLE_BUFFER = 1000
_SHARD_FILE = re.compile(r"\.(tar|tgz|tar\.[A-Za-z0-9]+)$")
"""A URL's last name that is a shard (webdataset reads compressed tars too), not a folder holding an index."""


def is_url(s: str) -> bool:
    """Whether ``s`` names a URL (``https://``, ``s3://``, ``file://``, webdataset's ``pipe:``), which webdataset's
    gopen opens, rather than a local path.

    Args:
        s: a shard source as given.
    """
    return bool(_URL.match(s))


def _folder_url(url: str) -> str | None:
    """The shard folder a URL names, or None for a shard (a path ending ``.tar``, or any URL with a query, such as
    a pre-signed one), a brace pattern or a ``pipe:`` command: ``s3://bucket/prefix``, ``https://host/path/`` and
    ``.../index.json`` name the folder of an ``index.json``."""
    from distillkit.remote import is_remote

    if not is_remote(url) or "{" in url:
        return None
    parts = urlsplit(url)
    # A URL with a query is one object: a pre-signed shard (".../x.tar?X-Amz-Signature=...") is a shard, not a
    # folder, and no other object of its folder can be named from it (each needs a signature of its own).
    if parts.query or parts.fragment:
        return None
    if url.endswith("/index.json"):
        return url[: -len("/index.json")]
    if _SHARD_FILE.search(parts.path.rstrip("/").rsplit("/", 1)[-1]):  # x.tar, x.tar.gz, x.tgz: one shard
        return None
    return url.rstrip("/")


def _index_urls(folder_url: str) -> list[str]:
    """Shard URLs listed by the ``index.json`` of a URL folder, through the checks every reader makes
    (``shards.shard_paths``: schema, plain shard names, counts and statistics against the records, read from the
    same place through fsspec)."""
    from distillkit.pipelines.shards import shard_paths

    return [str(url) for url in shard_paths(folder_url)]


def shard_urls(source: Source) -> list[str]:
    """The shard paths/URLs that ``source`` names, in order (what ``open_shards`` reads).

    Args:
        source: a shard directory (its ``index.json`` lists the shards: a directory without one
            is an unfinished build and is refused), a URL folder (``"s3://bucket/prefix"``,
            ``"https://host/path/"``, ``"file:///abs/dir"``: its ``index.json`` read and checked through fsspec),
            a path or URL of an ``index.json``, one ``.tar`` path or URL, a WebDataset brace pattern
            (``"/data/slidr-{000000..000009}.tar"``), a ``"pipe:curl -s ..."`` command, or a list of any of these.

    Returns:
        A non-empty list of paths/URLs that ``webdataset.WebDataset`` accepts.

    Raises:
        FileNotFoundError: a local shard, directory or ``index.json`` that does not exist (checked
            here so that a typo fails at once, not in a DataLoader worker).
        ValueError: an empty source or an index that lists no shards; an ``index.json`` that is
            not JSON, not an index, or lists a shard outside its folder (``shards.BadIndex``).
        distillkit.remote.RemoteError: a URL folder whose index cannot be fetched (one line naming the URL); a
            missing remote ``index.json`` is a ``FileNotFoundError`` as a missing local one.
    """
    from braceexpand import braceexpand

    from distillkit.pipelines.shards import shard_paths

    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError("no shards given (empty source)")
    urls: list[str] = []
    for item in items:
        s = os.fspath(item)
        if is_url(s):
            folder = _folder_url(s)
            urls.extend(_index_urls(folder) if folder is not None else braceexpand(s))
            continue
        p = Path(s)
        # A local index is checked as every reader checks it (shards.load_index): shape, shard names inside the
        # folder, counts and statistics against the shard records.
        if p.is_dir():
            urls.extend(str(path) for path in shard_paths(p))
        elif p.name == "index.json":
            urls.extend(str(path) for path in shard_paths(p.parent))  # raises FileNotFoundError when absent
        else:
            expanded = list(braceexpand(s))
            missing = [x for x in expanded if not Path(x).is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise FileNotFoundError(f"{missing[0]}: no such shard{more} (source {s!r})")
            urls.extend(expanded)
    return urls


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's (rank, world size): given values win, then an initialised
    ``torch.distributed`` process group, then the ``RANK``/``WORLD_SIZE`` variables that
    ``torchrun`` sets, else (0, 1).

    Args:
        rank: this process's rank, or None to detect it.
        world_size: the number of processes reading disjoint parts, or None to detect it.

    Raises:
        ValueError: when the result is not ``0 <= rank < world_size``.
    """
    det_rank, det_world = 0, 1
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            det_rank, det_world = dist.get_rank(), dist.get_world_size()
        else:
            det_rank = int(os.environ.get("RANK", "0"))
            det_world = int(os.environ.get("WORLD_SIZE", "1"))
    r = det_rank if rank is None else int(rank)
    w = det_world if world_size is None else int(world_size)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"need 0 <= rank < world_size, got rank={r}, world_size={w}")
    return r, w


def open_shards(
    source: Source,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epochs: int | None = 1,
    rank: int | None = None,
    world_size: int | None = None,
    images: Literal["rgb", "raw"] = "rgb",
    strict: bool = True,
    required: Sequence[str] = (),
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    transform: Callable[[dict[str, Any], np.random.Generator, torch.Generator], Any] | None = None,
    on_corrupt: Literal["stop", "skip"] = "stop",
) -> ShardStream:
    """Decoded samples of distillkit shards, for your own training code.

    Each sample is a dict ``{"__key__": str, "__url__": str, field: value}`` with fields decoded
    by their name (``distillkit.pipelines.codecs``): ``.npy`` -> numpy array (never unpickled),
    ``.json`` -> JSON value, label images (``cam0.sp.png``...) -> (H, W) uint8/uint16 ids,
    photographs (``cam0.jpg``) -> (H, W, 3) uint8 RGB, anything else -> bytes. Pass the result
    to a ``torch.utils.data.DataLoader``: each worker reads whole shards of its own, so within an
    epoch every sample is yielded exactly once over all ranks and workers (docs/reading.md).

    Args:
        source: shard directory, ``index.json``, ``.tar`` path, brace pattern, URL or a list of
            those (see :func:`shard_urls`).
        shuffle: shuffle the shard order (per epoch, from ``seed``) and samples through a buffer
            of ``shuffle_buffer`` samples. Off by default: then samples come in shard order.
        seed: seed of the shard order, of the sample buffer and of ``transform``'s generators;
            the same seed (and the same ``world_size`` and DataLoader ``num_workers``) gives the
            same order.
        epochs: passes over the data before the iterator ends; ``None`` repeats forever
            (reshuffled every epoch when ``shuffle``).
        rank: this process's rank; ``None`` takes it from ``torch.distributed`` when initialised,
            else from ``$RANK``, else 0.
        world_size: number of ranks splitting the shards; ``None`` as for ``rank`` (``$WORLD_SIZE``,
            else 1). Shards, not samples, are split: give every rank at least one shard per
            DataLoader worker or some workers idle.
        images: ``"rgb"`` decodes photographs; ``"raw"`` keeps their bytes (e.g. to decode on the
            GPU). Label images are decoded either way.
        strict: raise on a bad sample (missing required field, undecodable bytes, truncated tar)
            instead of logging it, counting it in ``.bad_samples`` and skipping it.
        required: field names every sample must have (e.g. ``["lidar.npy", "pairs.npy"]``).
        shuffle_buffer: samples held for shuffling when ``shuffle`` (ignored otherwise).
        transform: optional ``transform(sample, rng, gen)`` run in the DataLoader worker, with a
            numpy and a torch generator seeded from ``(seed, epoch, key)``: augmentations are
            reproducible whatever the worker layout.
        on_corrupt: each shard with a record in its folder's ``index.json`` (local or a URL folder's) is hashed
            while it is read and compared with its sha256 at its end: ``"stop"`` raises ``CorruptShard``,
            ``"skip"`` drops the rest of that shard with a counted warning (``.corrupt_shards``). Shards without a
            record (``pipe:`` commands, loose ``.tar`` files) stream unchecked, with one warning.

    Returns:
        A ``distillkit.train.streaming.ShardStream`` (an ``IterableDataset``).

    Raises:
        FileNotFoundError / ValueError: for a source that names no readable shard (at once).
        distillkit.pipelines.codecs.UnsafeFieldError: while iterating, for a field whose format
            could execute code (``.pth``, ``.pickle``...), always, whatever ``strict`` says.
        distillkit.train.streaming.CorruptShard: while iterating, a shard whose bytes differ from its record
            (with ``on_corrupt="stop"``).
    """
    from distillkit.train.streaming import ShardStream

    urls = shard_urls(source)
    r, w = resolve_rank(rank, world_size)
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    return ShardStream(
        "",  # unused: the shard list is given
        shards=urls,
        seed=seed,
        epochs=epochs,
        shuffle_shards=shuffle,
        shuffle_buffer=shuffle_buffer if shuffle else 0,
        rank=r,
        world_size=w,
        required=required,
        transform=transform,
        strict=strict,
        images=images,
        on_corrupt=on_corrupt,
    )


def refuse_unsafe_handler(key: str, data: bytes) -> None:
    """A webdataset decode handler that raises ``UnsafeFieldError`` for code-executing formats
    (``.pth``, ``.pickle``, ``.pyd``...) and declines (``None``) everything else.

    Args:
        key: the field's extension as webdataset passes it (``".cam0.sp.png"``).
        data: the field's bytes (unused).
    """
    from distillkit.pipelines.codecs import refuse_unsafe

    refuse_unsafe(key)
    return None


def wds_handlers(images: str | None = "rgb") -> list[Callable[[str, bytes], Any]]:
    """Handlers for stock ``webdataset``: ``wds.WebDataset(urls).decode(*wds_handlers())``.

    In order: a handler that refuses code-executing formats (webdataset's own decoders would
    unpickle ``.pyd`` or ``torch.load`` ``.pth``), a label handler (``webdataset.handle_extension``
    for every suffix in ``LABEL_IMAGE_SUFFIXES``, decoding to (H, W) uint8/uint16 with OpenCV's
    ``IMREAD_UNCHANGED``), then webdataset's image handler for the photographs. Labels must come
    before the image handler: webdataset tries handlers in order and the first answer wins.

    Args:
        images: a webdataset image spec for the photographs (``"rgb"``: float32 in [0, 1], as the
            usual ``.decode("rgb")``; ``"rgb8"``: uint8; ``"torchrgb"``, ``"pil"``...), or None
            to append your own image handler after these.

    Returns:
        A list of callables to unpack into ``.decode(...)``; all picklable, so DataLoader workers
        started with spawn can use them.
    """
    import webdataset as wds

    from distillkit.pipelines.codecs import LABEL_IMAGE_SUFFIXES
    from distillkit.sensors.images import decode_labels

    handlers: list[Callable[[str, bytes], Any]] = [
        refuse_unsafe_handler,
        wds.handle_extension(" ".join(s.lstrip(".") for s in LABEL_IMAGE_SUFFIXES), decode_labels),
    ]
    if images is not None:
        handlers.append(wds.imagehandler(images))
    return handlers
