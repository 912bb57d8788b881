"""Shard streaming shared by every trainer: index.json -> WebDataset -> decoded, checked samples.

Determinism and splitting
-------------------------
The stream runs epoch after epoch (``epochs=None`` means forever). In epoch ``e`` the shard list
from ``index.json`` is shuffled with ``Random((seed, e))``, then split by rank
(``shards[rank::world_size]``) and by DataLoader worker (``[worker::num_workers]``). So, within
an epoch, every shard is read by exactly one (rank, worker) and every sample appears exactly
once. A worker that gets no shard simply stops (no hang, no error); the DataLoader carries on with the others.
The sample shuffle buffer is seeded from ``(seed, epoch, rank, worker)``, and a per-sample transform gets
numpy/torch generators seeded from ``(seed, epoch, crc32(key))``, so augmentations do not depend on worker layout
or on where a run was resumed. With a fixed ``num_workers`` and ``world_size`` the batch sequence is a pure
function of the seed, and nothing in the stream draws from the global random generators.

The shuffle buffer holds samples as read from the tar (bytes), and decoding happens as they leave
it: a decoded SLidR sample at nuScenes resolution (six RGB images and six label maps) is ~10x its
stored size, so buffering bytes is what makes a buffer of hundreds of samples affordable.

Resuming from a stream position
-------------------------------
``make_loader`` returns a ``StreamLoader``: each batch a loader worker collates carries that worker's
*position* (epoch, samples that left its shuffle buffer in that epoch, and its counters), which the loader strips
in the main process, keeping the last position of every worker and which worker's batch comes next
(``stream_state()``; the training loop saves it in the checkpoint, one per rank). A resumed run
(``load_stream_state``) skips whole epochs without opening a shard, and inside the open epoch replays only what
decides the order: the raw tar reads (hashed, as always) and the seeded shuffle buffer, discarding the first
``emitted`` samples as they leave the buffer, before any decoding, check, transform or collate. Resume time then
depends on the position inside the epoch, never on the step. What the replayed reads meet (bad samples, a corrupt
shard under ``on_corrupt="skip"``) the interrupted run already reported, and the position restores its counts, so
the replay reports none of it again.

DataLoader workers hand batches over in turn, starting at worker 0 on a fresh iterator. The resumed run must
start with the worker after the one whose batch was consumed last, so worker ids are *logical*: with the saved
``next_worker = k``, physical worker ``i`` plays logical worker ``(i + k) % num_workers`` (its shards, its buffer
seed, its position), and the first batch again comes from logical worker ``k``. Nothing else in a worker depends on
its physical id (augmentation generators are per sample, collates draw nothing).

What we took from others: MosaicML Streaming's ``StreamingDataset.state_dict`` keeps ``epoch`` and
``sample_in_epoch`` and, on ``load_state_dict``, regenerates the epoch's deterministic sample order and starts after
the consumed samples instead of iterating them; it can index a sample directly, a tar stream cannot, so we replay
the reads but not the decoding. LitData's ``StreamingDataLoader`` keeps, for a plain ``StreamingDataset``, one
total per loader (``_num_samples_yielded_streaming``, ``batch_size`` added per batch as it arrives), the
``current_epoch`` and the ``latest_worker_idx``; on restore it derives each worker's share of that total by
arithmetic (whole batches dealt to the workers in turn, ``_replay_sampling``) and makes the DataLoader dispatch
first to the next worker (by overriding the private ``_try_put_index``). Only its Combined/Parallel datasets let
the samples carry per-worker counts (``_get_sample`` returns them under ``__NUM_SAMPLES_YIELDED_KEY__``, the
collate wrapper ``StreamingDataLoaderCollateFn`` keeps the batch's last, and the loader strips them per worker):
the design we use for every stream, because a worker's position is not a function of batch counts once samples
are skipped or bad. We rotate logical worker ids instead of patching DataLoader internals. A checkpoint without a
usable position (written before positions existed, by a loader that is not a ``StreamLoader``, or under another
loader layout) still resumes by fast-forwarding (``train.loop``).

Integrity
---------
Every shard is read through a hashing reader (``_HashingReader``: webdataset's own tar expander and key grouping,
with the file object wrapped; the file from webdataset's ``gopen`` for a path, from ``remote.open_read`` for an
fsspec URL, which resumes a dropped connection at its byte offset), and at the shard's end its sha256 is compared
with its ``index.json`` record. The record is looked up in the ``index.json`` beside the shard (for a URL, the
``index.json`` object beside it), or given (``sha256=``, any case). A remote read that fails for good (after
``remote.with_retries``) ends the stream with its one-line ``RemoteError``: the server, not the data, is at fault.
A shard folder's own ``index.json`` must record every shard's sha256 (``load_index`` refuses one without), so only
shards given one by one (``shards=``: loose tars or URLs with no sha256 recorded in an ``index.json`` beside them,
``pipe:`` commands without a ``sha256=`` digest) can stream unchecked, with one warning per stream. A mismatch is a
``CorruptShard`` naming the shard, which stops the stream (``on_corrupt="stop"``, the default), or, with
``on_corrupt="skip"``, a counted warning (``corrupt_shards``) after which the shard's samples still in the shuffle
buffer are dropped and counted in ``bad_samples``. A shard listed twice, or two shards recorded with the same sha256
(one file copied over another, records included), is refused when the stream is made: each epoch would read those
samples twice.

A mismatch is known only at the shard's end, when samples of the shard may already have left the buffer. Holding
a shard's samples until it is verified would cost a whole shard per worker (x ``interleave``) in memory (hundreds
of MB for SLidR shards at nuScenes resolution) and would delay every batch by a shard, so the stream does not:
with ``"stop"`` at most one shard per worker was trained on before the run stops (rebuild the shard, then resume
from a checkpoint written before it was read); ``"skip"`` cannot take back samples already yielded (they may have
been trained on), only those still buffered, and reads the shard again (and warns again) in later epochs, so
that a resumed run meets the same sequence.

Selection
---------
``select(raw)`` sees every sample before it is decoded (fields still bytes) and returns False to
skip it (e.g. ``JsonFieldFilter``: keep only the scenes of a split). Skipped samples are not bad:
they are counted in ``skipped`` and each worker logs how many it skipped in its first epoch.

Safety
------
Fields decode by ``distillkit.pipelines.codecs`` (``.npy`` with ``allow_pickle=False``, ``.json``,
label PNGs such as ``.sp.png`` as label arrays, photographs as RGB, anything else as bytes). A
``.pth``/``.pt``/``.pyd``/``.pickle``/``.pkl`` field raises ``UnsafeFieldError`` naming shard and
key, always: reading a shard never executes code. A bad sample (missing field, failed check,
undecodable bytes, truncated tar) is logged with its shard (``__url__``) and key, counted in
``bad_samples`` (in-process) and skipped, or raised with ``strict=True``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from distillkit.pipelines.codecs import UnsafeFieldError, decode_field, refuse_unsafe
from distillkit.pipelines.shards import HashingReader as _HashingReader
from distillkit.remote import RemoteError, is_remote, join, location, open_read, read_bytes

log = logging.getLogger(__name__)
__all__ = ["BadSample", "CorruptShard", "DuplicateShards", "JsonFieldFilter", "ShardStream", "StreamLoader",
           "TooFewShards", "UnsafeFieldError", "check_shard_count", "decode_field", "make_loader", "shard_files",
           "shard_records", "to_device"]

OnCorrupt = Literal["stop", "skip"]
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BadSample(ValueError):
    """A sample that cannot be used; the message names shard and key."""


class CorruptShard(ValueError):
    """A shard whose bytes differ from its ``index.json`` record (sha256 or size); the message names the shard."""


class DuplicateShards(ValueError):
    """The same shard data listed twice (one path twice, or two records with one sha256)."""


class TooFewShards(ValueError):
    """Fewer shards than ranks x loader workers: some rank or worker would have no shard to read."""


def _too_few_message(where: str, shards: int, world_size: int, num_workers: int, samples: int | None = None,
                     samples_per_shard: int | None = None) -> str:
    workers = max(1, num_workers)
    needed = world_size * workers
    text = (f"{where} holds {shards} shard(s), but {world_size} ranks x {workers} loader worker(s) need at least "
            f"{needed} (rank r reads shards[r::{world_size}], and each of its loader workers needs one of them)")
    if samples is not None and samples >= needed:
        now = f" (now {samples_per_shard})" if samples_per_shard else ""
        text += (f": rebuild it with a smaller output.samples_per_shard{now}, at most {samples // needed} for "
                 f"its {samples} samples (--set output.samples_per_shard={samples // needed}), or start fewer ranks "
                 "or loader workers (--num-workers)")
    elif samples is not None:
        text += f": its {samples} samples cannot make {needed} shards; start fewer ranks or loader workers"
    else:
        text += ": rebuild it with a smaller output.samples_per_shard, or start fewer ranks or loader workers"
    return text


def check_shard_count(shard_dir: Path | str, world_size: int, num_workers: int) -> None:
    """Refuse, before any process waits on another, a shard folder that cannot give every rank's every
    loader worker a shard under ``torchrun``: a rank without one would have no batch to train on, and the
    other ranks would wait for it.

    One process needs no such check (a loader worker without a shard just ends while the others read).

    Args:
        shard_dir: the shard folder (its ``index.json`` gives the counts and the manifest's
            ``output.samples_per_shard`` for the advice).
        world_size: the number of training processes.
        num_workers: DataLoader workers per process (0: loading in the process, which counts as one).

    Raises:
        TooFewShards: with a one-line message naming the counts and how to rebuild.
    """
    if world_size <= 1:
        return
    shards = shard_files(shard_dir)
    if len(shards) >= world_size * max(1, num_workers):
        return
    from distillkit.pipelines.shards import load_index

    index = load_index(location(shard_dir))
    written = (index.get("counts") or {}).get("written")
    per_shard = ((index.get("manifest") or {}).get("output") or {}).get("samples_per_shard")
    raise TooFewShards(_too_few_message(str(shard_dir), len(shards), world_size, num_workers,
                                        written if isinstance(written, int) else None,
                                        per_shard if isinstance(per_shard, int) else None))


def shard_files(shard_dir: Path | str) -> list[str]:
    """Paths of the shards listed in ``shard_dir/index.json`` (in index order), after ``load_index``'s checks: a
    shard entry outside the folder, an index that is not one, or one whose statistics its shard records do not
    give is refused (``BadIndex``, one line), for library callers as for the CLI.

    Args:
        shard_dir: the shard folder, a path or a URL (``s3://``, ``https://``, ``file://``: then shard URLs).
    """
    from distillkit.pipelines.shards import shard_paths

    return [str(p) for p in shard_paths(location(shard_dir))]


def shard_records(shards: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The ``index.json`` record of each shard in ``shards`` that has a sha256 recorded.

    A shard's record is its entry in the ``index.json`` of its own folder (the ``file`` entry that resolves to the
    same path; for a URL, the ``index.json`` object beside it, fetched once per folder). webdataset's ``pipe:``
    commands have none here: the caller passes their digests to ``ShardStream(sha256=...)``.

    Args:
        shards: shard paths or URLs, as ``ShardStream`` reads them.

    Returns:
        ``{shard: record}`` for the shards with a record (``sha256``, and ``bytes``/``samples`` when recorded).
    """
    from distillkit.reading import is_url  # one definition of what a URL is (reading.py imports nothing heavy)

    folders: dict[str, dict[str, dict[str, Any]]] = {}
    out: dict[str, dict[str, Any]] = {}
    for shard in shards:
        if is_remote(shard):
            if urlsplit(shard).query:  # a pre-signed URL: the objects beside it would need their own signatures
                continue
            folder, _, name = shard.rpartition("/")
            if folder not in folders:
                folders[folder] = _remote_folder_records(folder)
            record = folders[folder].get(name)
            if record is not None:
                out[shard] = record
            continue
        if is_url(shard):
            continue
        path = os.path.normpath(os.path.abspath(shard))
        folder = os.path.dirname(path)
        if folder not in folders:
            folders[folder] = _folder_records(folder)
        record = folders[folder].get(path)
        if record is not None:
            out[shard] = record
    return out


def _folder_records(folder: str) -> dict[str, dict[str, Any]]:
    """``{absolute shard path: record}`` of ``folder/index.json``'s entries with a sha256 ({} without an index).

    An index that cannot be read gives no record (its shards then stream unchecked, with the stream's warning):
    the readers that need the index refuse it in one line themselves (``shard_files``), and a stream given shard
    paths must not fail on an index it does not need.
    """
    try:
        index = json.loads(Path(folder, "index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {os.path.normpath(os.path.join(folder, name)): entry for name, entry in _hashed_entries(index).items()}


def _remote_folder_records(folder: str) -> dict[str, dict[str, Any]]:
    """``{shard file name: record}`` of the ``index.json`` object in the URL folder ``folder`` ({} without one).

    As for a local folder, an index that is missing, refused (HTTP 403: a server may serve the shards and not the
    folder's other objects) or not one gives no record (its shards stream unchecked, with the stream's warning).
    A server that fails to answer (down, after the retries) is raised: the shards beside it would fail the same way.
    """
    try:
        index = json.loads(read_bytes(join(folder, "index.json")))
    except (FileNotFoundError, PermissionError, ValueError):  # RemoteNotFound / RemoteDenied are these
        return {}
    return _hashed_entries(index)


def _hashed_entries(index: Any) -> dict[str, dict[str, Any]]:
    """``{file: entry}`` of an index's shard entries that name a file and a sha256 (anything else: no record)."""
    entries = index.get("shards") if isinstance(index, dict) else None
    return {entry["file"]: entry for entry in (entries if isinstance(entries, list) else [])
            if isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)}


def decode_sample(
    raw: dict[str, Any], keep_raw: Sequence[str] = (), images: Literal["rgb", "raw"] = "rgb"
) -> dict[str, Any]:
    """Decode every field of a raw WebDataset sample; errors name shard and key.

    Fields ending in one of ``keep_raw`` (e.g. ``(".jpg",)`` for decoding on the GPU later) stay
    bytes; the refusal of code-executing formats applies to them too. ``images="raw"`` keeps every
    photograph as bytes but still decodes label images (unlike ``keep_raw=(".png",)``, which
    would also catch ``.sp.png``)."""
    url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
    out: dict[str, Any] = {"__key__": key, "__url__": url}
    for name, value in raw.items():
        if name.startswith("__"):
            continue
        try:
            if keep_raw and name.lower().endswith(tuple(keep_raw)):
                refuse_unsafe(name)
                out[name] = bytes(value)
                continue
            out[name] = decode_field(name, value, images=images)
        except UnsafeFieldError as e:
            raise UnsafeFieldError(f"{url}: sample {key}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample
            raise BadSample(f"{url}: sample {key}: field {name!r}: {e}") from e
    return out


class JsonFieldFilter:
    """A ``ShardStream`` ``select``: keep a sample when ``json[item]`` of its field ``field`` is in
    ``allowed`` (e.g. ``meta.json`` ``scene`` in the scenes of a split).

    A sample without the field is kept, since what it holds is unknown (shards written before the
    field existed), with one warning per process. A module-level class rather than a closure, so
    that it pickles into DataLoader workers under any start method.

    Args:
        field: the JSON field's name (``"meta.json"``).
        item: the key inside it (``"scene"``).
        allowed: the values kept.
        label: what ``allowed`` is, for log lines (``"scenes of split 'pretrain'"``).
    """

    def __init__(self, field: str, item: str, allowed: Iterable[Any], label: str):
        self.field, self.item, self.allowed, self.label = field, item, frozenset(allowed), label
        self._warned = False

    def __call__(self, raw: dict[str, Any]) -> bool:
        value = raw.get(self.field)
        if value is None:
            if not self._warned:
                self._warned = True
                log.warning("%s: sample %s has no %s (older shards?): keeping such samples, the filter on %s "
                            "cannot apply to them", raw.get("__url__", "?"), raw.get("__key__", "?"), self.field,
                            self.label)
            return True
        obj = json.loads(bytes(value))
        if not isinstance(obj, dict) or self.item not in obj:
            raise ValueError(f"field {self.field!r} has no {self.item!r}")
        return obj[self.item] in self.allowed

    def __repr__(self) -> str:
        return self.label


def worker_split() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker, (0, 1) in-process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def sample_rngs(seed: int, epoch: int, key: str) -> tuple[np.random.Generator, torch.Generator]:
    """Generators for one sample's augmentation, independent of worker layout and resume point."""
    h = zlib.crc32(key.encode())
    rng = np.random.default_rng([seed, epoch, h])
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    return rng, g


class ShardStream(IterableDataset):
    """Decoded samples from the shards of ``shard_dir``, split by rank and worker.

    ``required``: fields every sample must have. ``check(sample)`` raises ``ValueError`` for a
    bad sample. ``transform(sample, rng, gen)`` (numpy Generator, torch Generator) turns a decoded
    sample into a training example. ``images``: ``"rgb"`` decodes photographs to (H, W, 3) uint8,
    ``"raw"`` leaves them as bytes (label images are decoded either way). ``select(raw)`` returns
    False for a sample to skip before decoding it (see the module docstring); skipped samples are
    counted in ``skipped``. ``interleave``: shards each worker reads at once, one sample from each in turn,
    before the shuffle buffer; shards written one recording after another (COMODO's windows) then mix
    ``interleave`` times as many recordings per batch for the same buffer memory. ``hold_out``: keys left out of
    epoch 0 only (COMODO's initial queue windows, which the release trains on from its second epoch); they are
    counted in ``held_out``, not in ``skipped``. ``sha256``: ``{shard: hex digest}`` for shards whose record is not
    in an ``index.json`` beside them (URLs); ``on_corrupt``: ``"stop"`` (raise ``CorruptShard``) or ``"skip"``
    (count it in ``corrupt_shards``, drop its samples still buffered) for a shard whose bytes differ from their
    record (module docstring, "Integrity"). What ``"skip"`` cannot undo: a mismatch is known only at the shard's
    end, so its samples that already left the shuffle buffer were yielded (and trained on); only those still
    buffered are dropped (with no shuffle buffer, none is). Nor does it remove the shard: every later epoch reads it
    again, yields (and trains on) most of it again, and warns again.

    Raises:
        DuplicateShards: a shard listed twice, or two shards recorded with the same sha256.
        ValueError: a bad ``interleave``, ``images``, ``on_corrupt`` or ``sha256`` digest.
    """

    def __init__(
        self,
        shard_dir: Path | str,
        *,
        seed: int = 0,
        epochs: int | None = None,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        rank: int = 0,
        world_size: int = 1,
        required: Sequence[str] = (),
        check: Callable[[dict[str, Any]], None] | None = None,
        transform: Callable[[dict[str, Any], np.random.Generator, torch.Generator], Any] | None = None,
        strict: bool = False,
        shards: Sequence[str] | None = None,
        keep_raw: Sequence[str] = (),
        images: Literal["rgb", "raw"] = "rgb",
        select: Callable[[dict[str, Any]], bool] | None = None,
        interleave: int = 1,
        hold_out: Iterable[str] = (),
        sha256: Mapping[str, str] | None = None,
        on_corrupt: OnCorrupt = "stop",
    ):
        super().__init__()
        self.hold_out = frozenset(hold_out)
        self.held_out = 0
        if interleave < 1:
            raise ValueError(f"interleave must be >= 1, not {interleave}")
        self.interleave = interleave
        self.shards = list(shards) if shards is not None else shard_files(shard_dir)
        self.seed, self.epochs = seed, epochs
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        if world_size > 1 and rank == 0 and len(self.shards) % world_size:
            # A lighter rank starts its next pass (a new permutation) sooner and sees its samples more often.
            log.warning("%d shards over %d ranks: some ranks read one shard more per pass, so their samples come "
                        "more often; rebuild with a shard count divisible by %d for equal passes",
                        len(self.shards), world_size, world_size)
        self.required, self.check, self.transform = tuple(required), check, transform
        self.strict = strict
        self.keep_raw = tuple(keep_raw)
        if images not in ("rgb", "raw"):
            raise ValueError(f"images must be 'rgb' or 'raw', not {images!r}")
        self.images = images
        self.select = select
        if on_corrupt not in ("stop", "skip"):
            raise ValueError(f"on_corrupt must be 'stop' or 'skip', not {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        given = {}
        for shard, digest in (sha256 or {}).items():
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
                raise ValueError(f"{shard}: sha256= {str(digest)[:80]!r} is not a sha256 (64 hex digits)")
            given[shard] = {"sha256": digest}
        # Hex digests in any case (sha256sum prints lower case, some tools upper): compared lower-cased.
        self.records = {shard: {**record, "sha256": record["sha256"].lower()}
                        for shard, record in (shard_records(self.shards) | given).items()}
        self._refuse_duplicates()
        unchecked = [s for s in self.shards if s not in self.records]
        if unchecked:
            log.warning("%s%s: no sha256 recorded (no index.json beside it, or a build that predates the records): "
                        "%d of %d shard(s) stream unchecked", unchecked[0],
                        f" and {len(unchecked) - 1} more" if len(unchecked) > 1 else "", len(unchecked),
                        len(self.shards))
        self.bad_samples = 0  # counted in the process that iterates (per worker with workers > 0)
        self.skipped = 0  # samples ``select`` left out, counted the same way
        self.corrupt_shards = 0  # shards skipped with on_corrupt="skip", counted the same way
        self._dropping: set[str] = set()  # corrupt shards whose buffered samples are dropped (this epoch)
        # Set by ``StreamLoader.__iter__`` for the next ``iter()`` only: where each logical worker resumes.
        self._resume: dict[str, Any] | None = None
        self._position: tuple[int, dict[str, int]] | None = None  # (logical worker, position) at the last yield
        # True while a resumed stream replays the reads of samples the interrupted run consumed: their warnings
        # (bad samples, corrupt shards) were logged by that run, with the counts the saved position restores.
        self._replaying = False

    def _refuse_duplicates(self) -> None:
        """Refuse a shard listed twice, or two records with one sha256 (a shard overwritten by a copy of another):
        each epoch would read the same samples twice, and every per-shard check would pass."""
        from distillkit.reading import is_url

        seen: dict[str, str] = {}
        for shard in self.shards:
            where = shard if is_url(shard) else os.path.normpath(os.path.abspath(shard))
            if where in seen:
                raise DuplicateShards(f"{shard}: listed twice: each epoch would read its samples twice")
            seen[where] = shard
        by_digest: dict[str, str] = {}
        for shard in self.shards:
            record = self.records.get(shard)
            if record is None or record.get("samples") == 0:  # two empty tars are byte-identical, and harmless
                continue
            other = by_digest.setdefault(record["sha256"], shard)
            if other != shard:
                raise DuplicateShards(f"{shard}: index.json records the same sha256 as {other} "
                                      f"({record['sha256'][:16]}...): the same data listed twice")

    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """This rank's and worker's shards in ``epoch`` (possibly empty)."""
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order[self.rank :: self.world_size][worker::num_workers]

    def _bad(self, msg: str, exc: BaseException | None = None) -> None:
        self.bad_samples += 1
        if self.strict:
            raise BadSample(msg) from exc
        if not self._replaying:
            log.warning("skipping bad sample (%d so far): %s", self.bad_samples, msg)

    def _tar_error(self, exn: BaseException) -> bool:
        """WebDataset handler: a truncated/corrupt tar names its shard; skip it (or raise if strict). A remote read
        that failed for good (after ``remote.with_retries``: a server down, a refused credential) is no fault of the
        data: it ends the stream, in its own one line (webdataset appended the stream and URL to its args)."""
        if isinstance(exn, RemoteError):
            raise type(exn)(exn.args[0]) from None
        where = " ".join(str(a) for a in exn.args[1:] if isinstance(a, str)) or "?"
        self._bad(f"{where}: unreadable shard data: {exn.args[0] if exn.args else exn!r}", exn)
        return True

    def _shard_samples(self, url: str) -> Iterator[dict[str, Any]]:
        """The raw samples of one shard, read with webdataset's opener, tar expander and key grouping, through a
        hashing reader when the shard has a record; checked against it at the shard's end."""
        record = self.records.get(url)
        if is_remote(url):
            # fsspec's streaming file, not webdataset's gopen (a curl pipe for http, none for s3): a dropped
            # connection is resumed at its byte offset, and a failure that persists is a one-line RemoteError that
            # ends the stream (a missing object too: the index lists it, so the dataset is incomplete).
            stream = open_read(url)
        else:
            try:
                stream = gopen(url, "rb")
            except Exception as exn:  # noqa: BLE001 - as webdataset's url_opener: the handler decides
                exn.args = (*exn.args, url)
                self._tar_error(exn)
                return
        reader, hashing = _HashingReader.open(stream) if record is not None else (stream, None)
        try:
            yield from group_by_keys(tar_file_expander([{"url": url, "stream": reader}], handler=self._tar_error),
                                     handler=self._tar_error)
            if hashing is not None:
                self._verify(url, hashing, record)
        finally:
            reader.close()

    def _verify(self, url: str, reader: _HashingReader, record: dict[str, Any]) -> None:
        """Compare a shard read to its end with its record: stop, or count and drop the rest of it."""
        digest = reader.finish()
        if digest == record["sha256"]:
            return
        size = record.get("bytes")
        msg = (f"{url}: corrupt shard: sha256 {digest[:16]}... of its {reader.size} bytes, index.json records "
               f"{record['sha256'][:16]}...{f' of {size} bytes' if isinstance(size, int) else ''} (changed since it "
               "was built; `distillkit verify` checks every shard)")
        if self.on_corrupt == "stop":
            raise CorruptShard(msg)
        self.corrupt_shards += 1
        self._dropping.add(url)
        if self._replaying:
            return
        log.warning("%s: dropping its samples still in the shuffle buffer (those already yielded were used); %d "
                    "corrupt shard(s) so far", msg, self.corrupt_shards)

    def _raw_samples(self, shards: list[str], epoch: int = 0) -> Iterator[dict[str, Any]]:
        """Undecoded samples of ``shards`` that have the required fields and pass ``select`` (and, in epoch 0,
        are not held out)."""
        for shard in shards:
            for raw in self._shard_samples(shard):
                url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
                for name in raw:  # refuse code-executing formats before anything is buffered
                    if not name.startswith("__"):
                        try:
                            refuse_unsafe(name)
                        except UnsafeFieldError as e:
                            raise UnsafeFieldError(f"{url}: sample {key}: {e}") from None
                if epoch == 0 and key in self.hold_out:
                    self.held_out += 1
                    continue
                if key.startswith("/") or ".." in key.split("/"):  # a hostile member name; distillkit writes none
                    self._bad(f"{url}: sample {key!r}: its member path is absolute or climbs out with '..'")
                    continue
                missing = [f for f in self.required if f not in raw]
                if missing:
                    self._bad(f"{url}: sample {key}: missing field(s) {missing}")
                    continue
                if self.select is not None:
                    try:
                        keep = self.select(raw)
                    except (ValueError, KeyError, TypeError) as e:
                        self._bad(f"{url}: sample {key}: {self.select!r}: {e}", e)
                        continue
                    if not keep:
                        self.skipped += 1
                        continue
                yield raw

    def _decoded(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """``raw`` decoded and checked, or None (reported) for a bad sample."""
        url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
        try:
            sample = decode_sample(raw, self.keep_raw, self.images)
            if self.check is not None:
                self.check(sample)
        except UnsafeFieldError:
            raise
        except (BadSample, ValueError, KeyError, IndexError) as e:
            msg = str(e) if str(e).startswith(url) else f"{url}: sample {key}: {e}"
            self._bad(msg, e)
            return None
        return sample

    _COUNTERS = ("bad_samples", "skipped", "held_out", "corrupt_shards")

    def position(self) -> tuple[int, dict[str, int]] | None:
        """``(logical worker, position)`` of the last sample this process's iterator yielded, or None.

        The position holds ``epoch``; ``emitted``, the samples that left the shuffle buffer in that epoch (bad ones
        included: a resumed stream discards that many, undecoded); ``good``, those of them yielded; and the counters
        (``bad_samples``, ``skipped``, ``held_out``, ``corrupt_shards``) at that moment, which a resumed stream
        continues from."""
        return self._position

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = worker_split()
        resume, self._resume = self._resume, None  # for this iterator only: a later pass starts afresh
        if resume is None:
            return self._iterate(worker, num_workers, None)
        logical = (worker + resume["next_worker"]) % num_workers  # see "Resuming from a stream position"
        return self._iterate(logical, num_workers, resume["workers"][logical])

    def _iterate(self, worker: int, num_workers: int, start: dict[str, int] | None) -> Iterator[Any]:
        """The stream of logical worker ``worker``, from its position ``start`` (None: the beginning)."""
        epoch = start["epoch"] if start else 0
        replay = start["emitted"] if start else 0  # buffer outputs of ``epoch`` already consumed: not decoded
        while self.epochs is None or epoch < self.epochs:
            shards = self.shards_for(epoch, worker, num_workers)
            if not shards:
                return  # more workers than shards: this worker has nothing to do
            buf_rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
            good, emitted, skipped_before, held_before = 0, 0, self.skipped, self.held_out
            self._dropping = set()
            self._replaying = replay > 0  # reads up to the replay's last sample were logged by the interrupted run
            raws = (self._raw_samples(shards, epoch) if self.interleave == 1 else
                    _round_robin([self._raw_samples([s], epoch) for s in shards], self.interleave))
            for raw in _buffer_shuffle(raws, self.shuffle_buffer, buf_rng):
                emitted += 1
                if emitted <= replay:
                    if emitted == replay and start is not None:
                        # The reads and the buffer are where they were at the saved position: so are the counters
                        # (decode-time bad samples among the replayed ones were never re-checked), and what is read
                        # from here on was not read by the interrupted run before it saved: reported again.
                        self._replaying = False
                        good = start["good"]
                        for name in self._COUNTERS:
                            setattr(self, name, start[name])
                    continue
                if raw.get("__url__") in self._dropping:  # a corrupt shard's sample still buffered (on_corrupt=skip)
                    self.bad_samples += 1
                    continue
                sample = self._decoded(raw)
                if sample is None:
                    continue
                if self.transform is None:
                    out: Any = sample
                else:
                    rng, gen = sample_rngs(self.seed, epoch, sample["__key__"])
                    try:
                        out = self.transform(sample, rng, gen)
                    except (BadSample, ValueError) as e:
                        self._bad(f"{sample['__url__']}: sample {sample['__key__']}: {e}", e)
                        continue
                good += 1
                self._position = (worker, {"epoch": epoch, "emitted": emitted, "good": good,
                                           **{name: getattr(self, name) for name in self._COUNTERS}})
                yield out
            replay, self._replaying = 0, False  # (an epoch shorter than the replay: the data changed since)
            skipped = self.skipped - skipped_before
            if self.select is not None and epoch == 0:
                log.info("rank %d worker %d: kept %d, skipped %d sample(s) not among the %s (%d shard(s))",
                         self.rank, worker, good, skipped, self.select, len(shards))
            if not good and self.held_out > held_before:
                epoch += 1  # every sample of these shards was held out of epoch 0: the next epoch has them
                continue
            if not good:
                # The same shards hold the same samples next epoch: stop instead of spinning.
                if skipped and self.bad_samples == 0:
                    log.warning("no sample of this worker's %d shard(s) is among the %s: stopping its stream",
                                len(shards), self.select)
                else:
                    log.error("no usable sample in %d shard(s) of this worker: stopping the stream", len(shards))
                return
            epoch += 1


def _round_robin(streams: list[Iterator[Any]], width: int) -> Iterator[Any]:
    """One item from each of up to ``width`` open ``streams`` in turn; an exhausted one is replaced by the next
    unopened one, in order (deterministic, so a resumed run's fast-forward meets the same sequence). Streams are
    generators, so a shard is opened only when its turn first comes."""
    pending = iter(streams)
    active = [s for _, s in zip(range(width), pending, strict=False)]
    while active:
        still = []
        for s in active:
            item = next(s, _END)
            if item is _END:
                nxt = next(pending, None)
                if nxt is not None:
                    still.append(nxt)
                continue
            yield item
            still.append(s)
        active = still


_END = object()


def _buffer_shuffle(it: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Classic reservoir-style shuffle buffer: deterministic for a given rng."""
    if size <= 1:
        yield from it
        return
    buf: list[Any] = []
    for x in it:
        buf.append(x)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class _Positioned:
    """A collated batch with the position of the loader worker that made it (stripped by ``StreamLoader``)."""

    __slots__ = ("batch", "worker", "position")

    def __init__(self, batch: Any, worker: int, position: dict[str, int]) -> None:
        self.batch, self.worker, self.position = batch, worker, position

    def pin_memory(self) -> _Positioned:
        """Pin the batch, as the DataLoader's pin-memory thread would without the wrapper."""
        from torch.utils.data._utils.pin_memory import pin_memory

        return _Positioned(pin_memory(self.batch), self.worker, self.position)


class _PositionedCollate:
    """``collate`` run in the process that iterates the stream, attaching that stream's position to the batch:
    the fetcher has just drawn the batch's last sample from it, so its position is the batch's end."""

    def __init__(self, collate: Callable[[list[Any]], Any], stream: ShardStream) -> None:
        self.collate, self.stream = collate, stream

    def __call__(self, items: list[Any]) -> Any:
        info = get_worker_info()
        stream = info.dataset if info is not None else self.stream  # the worker's own copy of the stream
        batch = self.collate(items)
        where = stream.position() if isinstance(stream, ShardStream) else None
        return batch if where is None else _Positioned(batch, *where)


class StreamLoader(DataLoader):
    """A ``DataLoader`` over a ``ShardStream`` that knows where the stream is, for a resume without re-reading.

    Batches come out as the collate made them; the positions they carried are kept here (module docstring,
    "Resuming from a stream position"). ``stream_state()`` is a small dict of ints (it goes into a ``weights_only``
    checkpoint); ``load_stream_state(state)`` before ``iter()`` makes that iterator continue from it.
    """

    def __init__(self, dataset: ShardStream, *, collate_fn: Callable[[list[Any]], Any], **kw: Any) -> None:
        super().__init__(dataset, collate_fn=_PositionedCollate(collate_fn, dataset), **kw)
        self._workers = max(1, self.num_workers)  # logical workers: loading in-process (0) is one
        self._positions: list[dict[str, int] | None] = [None] * self._workers
        self._next_worker = 0
        self._loaded = False

    def stream_state(self) -> dict[str, Any]:
        """Where the batches consumed so far leave the stream: per logical worker its position (None: none of its
        batches consumed yet), the worker whose batch comes next, and what the positions are only valid for."""
        stream = self.dataset
        # ``num_workers`` as given: 0 (loading in the training process, where a transform's draws from the global
        # generators are part of the checkpointed RNG state) and 1 (a worker process) are different layouts.
        return {"format": 1, "num_workers": self.num_workers, "next_worker": self._next_worker,
                "workers": [dict(p) if p else None for p in self._positions], "seed": stream.seed,
                "shards": len(stream.shards), "rank": stream.rank, "world_size": stream.world_size}

    def load_stream_state(self, state: dict[str, Any]) -> None:
        """Make the next ``iter()`` continue from ``state`` (``stream_state()`` of the interrupted run).

        Args:
            state: the saved position, as ``stream_state()`` returned it (from the checkpoint).

        Raises:
            ValueError: a state of another format, or saved under another layout (``num_workers`` as given, seed,
                shard count, rank or process count), in one line naming what differs: the positions would point
                elsewhere in this stream. Nothing is changed then: the loader starts afresh.
        """
        stream = self.dataset
        if not isinstance(state, dict) or state.get("format") != 1:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"unknown stream position format {found!r}")
        mine = {"num_workers": self.num_workers, "seed": stream.seed, "shards": len(stream.shards),
                "rank": stream.rank, "world_size": stream.world_size}
        differ = [f"{k} {state.get(k)!r} (now {v!r})" for k, v in mine.items() if state.get(k) != v]
        if differ:
            raise ValueError("saved with " + ", ".join(differ))
        self._positions = [dict(p) if p else None for p in state["workers"]]
        self._next_worker = int(state["next_worker"])
        self._loaded = True

    def __iter__(self) -> Iterator[Any]:
        stream = self.dataset
        if self._loaded:
            stream._resume = {"next_worker": self._next_worker, "workers": list(self._positions)}
            self._loaded = False
        else:
            self._positions, self._next_worker = [None] * self._workers, 0
        try:
            it = super().__iter__()  # workers start (and copy the stream, with _resume) here; in-process reads it
        finally:
            stream._resume = None
        return self._strip(it)

    def _strip(self, it: Iterator[Any]) -> Iterator[Any]:
        for item in it:
            if isinstance(item, _Positioned):
                self._positions[item.worker] = item.position
                self._next_worker = (item.worker + 1) % self._workers
                yield item.batch
            else:
                yield item


def make_loader(
    dataset: IterableDataset,
    batch_size: int,
    collate: Callable[[list[Any]], Any],
    num_workers: int = 0,
    device: str = "cpu",
    timeout: float = 0,
    prefetch_factor: int = 2,
    drop_last: bool = True,
) -> DataLoader:
    """DataLoader for a ShardStream: pinned memory on CUDA, persistent workers when there are any; over a
    ``ShardStream`` a ``StreamLoader``, whose position a checkpoint keeps (module docstring).

    Raises:
        TooFewShards: a ``ShardStream`` of several ranks with fewer shards than ranks x loader workers
            (``check_shard_count``; ``distillkit train`` checks before starting, this covers other callers).
    """
    if isinstance(dataset, ShardStream) and dataset.world_size > 1 and \
            len(dataset.shards) < dataset.world_size * max(1, num_workers):
        raise TooFewShards(_too_few_message("the stream", len(dataset.shards), dataset.world_size, num_workers))
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=prefetch_factor, timeout=timeout)
    # A private generator: creating the loader's iterator must not draw from the global torch RNG,
    # otherwise a resumed run (which creates it after restoring RNG state) would diverge.
    if isinstance(dataset, ShardStream):
        return StreamLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                            pin_memory=str(device).startswith("cuda") and torch.cuda.is_available(),
                            drop_last=drop_last, generator=torch.Generator().manual_seed(0), **kw)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=str(device).startswith("cuda") and torch.cuda.is_available(),
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of a (nested) batch to ``device`` with non-blocking copies."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
