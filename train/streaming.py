"""Shard streaming shared by every trainer: index.json -> WebDataset -> decoded, checked samples.

Determinism and splitting
-------------------------
The stream runs epoch after epoch (``epochs=None`` means forever). In epoch ``e`` the shard list
from ``index.json`` is shuffled with ``Random((seed, e))``, then split by rank
(``shards[rank::world_size]``) and by DataLoader worker (``[worker::num_workers]``). So, within
an epoch, every shard is read by exactly one (rank, worker) and every sample appears exactly
once. A worker that gets no shard simply stops (``empty_check=False``: no hang, no error); the
DataLoader carries on with the others. The sample shuffle buffer is seeded from
``(seed, epoch, rank, worker)``, and a per-sample transform gets numpy/torch generators seeded from
``(seed, epoch, crc32(key))``, so augmentations do not depend on worker layout or on where a run
was resumed. With a fixed ``num_workers`` and ``world_size`` the batch sequence is a pure function
of the seed: the training loop resumes by skipping the batches already consumed.

The shuffle buffer holds samples as read from the tar (bytes), and decoding happens as they leave
it: a decoded SLidR sample at nuScenes resolution (six RGB images and six label maps) is ~10x its
stored size, so buffering bytes is what makes a buffer of hundreds of samples affordable.

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
import random
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distillkit.pipelines.codecs import UnsafeFieldError, decode_field, refuse_unsafe

log = logging.getLogger(__name__)
__all__ = ["BadSample", "JsonFieldFilter", "ShardStream", "TooFewShards", "UnsafeFieldError", "check_shard_count",
           "decode_field", "make_loader", "shard_files", "to_device"]


class BadSample(ValueError):
    """A sample that cannot be used; the message names shard and key."""


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
    index = json.loads((Path(shard_dir) / "index.json").read_text())
    written = (index.get("counts") or {}).get("written")
    per_shard = ((index.get("manifest") or {}).get("output") or {}).get("samples_per_shard")
    raise TooFewShards(_too_few_message(str(shard_dir), len(shards), world_size, num_workers,
                                        written if isinstance(written, int) else None,
                                        per_shard if isinstance(per_shard, int) else None))


def shard_files(shard_dir: Path | str) -> list[str]:
    """Absolute paths of the shards listed in ``shard_dir/index.json`` (in index order)."""
    shard_dir = Path(shard_dir)
    index_path = shard_dir / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no index.json (not a distillkit shard directory)")
    index = json.loads(index_path.read_text())
    files = [str(shard_dir / s["file"]) for s in index.get("shards", [])]
    if not files:
        raise ValueError(f"{index_path}: lists no shards")
    return files


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


def _identity(x: Any) -> Any:
    return x


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
    counted in ``held_out``, not in ``skipped``.
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
        self.bad_samples = 0  # counted in the process that iterates (per worker with workers > 0)
        self.skipped = 0  # samples ``select`` left out, counted the same way

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
        log.warning("skipping bad sample (%d so far): %s", self.bad_samples, msg)

    def _tar_error(self, exn: BaseException) -> bool:
        """WebDataset handler: a truncated/corrupt tar names its shard; skip it (or raise if strict)."""
        where = " ".join(str(a) for a in exn.args[1:] if isinstance(a, str)) or "?"
        self._bad(f"{where}: unreadable shard data: {exn.args[0] if exn.args else exn!r}", exn)
        return True

    def _raw_samples(self, shards: list[str], epoch: int = 0) -> Iterator[dict[str, Any]]:
        """Undecoded samples of ``shards`` that have the required fields and pass ``select`` (and, in epoch 0,
        are not held out)."""
        ds = wds.WebDataset(
            shards,
            shardshuffle=False,
            nodesplitter=_identity,
            workersplitter=_identity,
            empty_check=False,
            handler=self._tar_error,
        )
        for raw in ds:
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

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = worker_split()
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            shards = self.shards_for(epoch, worker, num_workers)
            if not shards:
                return  # more workers than shards: this worker has nothing to do
            buf_rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
            good, skipped_before, held_before = 0, self.skipped, self.held_out
            raws = (self._raw_samples(shards, epoch) if self.interleave == 1 else
                    _round_robin([self._raw_samples([s], epoch) for s in shards], self.interleave))
            for raw in _buffer_shuffle(raws, self.shuffle_buffer, buf_rng):
                sample = self._decoded(raw)
                if sample is None:
                    continue
                if self.transform is None:
                    good += 1
                    yield sample
                    continue
                rng, gen = sample_rngs(self.seed, epoch, sample["__key__"])
                try:
                    out = self.transform(sample, rng, gen)
                except (BadSample, ValueError) as e:
                    self._bad(f"{sample['__url__']}: sample {sample['__key__']}: {e}", e)
                    continue
                good += 1
                yield out
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
    """DataLoader for a ShardStream: pinned memory on CUDA, persistent workers when there are any.

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
