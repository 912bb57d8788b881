"""Torch weight files checked before they are trusted: a digest of a checkpoint's contents, and one-line
refusals of files that are no checkpoint.

**The digest.** Every checkpoint distillkit writes (``train.checkpoint.save_checkpoint``) carries, beside its
entries, ``DIGEST_KEY: {"scheme": 1, "sha256": HEX}``: the sha256 of its contents walked in order (every
tensor's dtype, shape and bytes; every number, string, list and dict key; a set's elements in an order of their
own, as a set loads in an order that depends on the string hash seed), the digest entry itself left out. A value
of any other type is refused when saving (``TypeError``): a digest that could not be recomputed is never written.
It lives inside the file, so the write stays one atomic ``os.replace`` and a copied ``latest.pt`` keeps it
(a sidecar file could be left behind, or be out of step after a kill between two renames). It is taken over
the loaded contents rather than the file's bytes: the digest cannot be in the bytes it covers, and the
walk is what a loader sees, so a flipped byte in any tensor, the pickled structure or a number is caught.
torch's zip reader checks no CRC, which is why 64 flipped bytes inside the weights used to load silently.

**The refusals.** ``read_torch_file`` looks at the file before handing it to ``torch.load``: a missing path,
a folder, an empty file, a text file, a zip archive that is not a torch checkpoint and a truncated one
each get one line naming the file (``CheckpointError``), instead of torch's traceback (for three of them
"mmap can only be used with files saved with ... _use_new_zipfile_serialization=True", which misleads).
Loading is always ``weights_only=True``: a checkpoint never executes pickled code.

**Foreign weights.** ``load_weights`` reads any torch weights file: one with distillkit's digest is verified,
one without (MoCo, DINO, a Hugging Face ``pytorch_model.bin``) is accepted as it is, as before.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NoReturn

import torch

from distillkit.messages import one_line

DIGEST_KEY = "distillkit_digest"
"""The checkpoint entry holding the digest; a name no other project's checkpoint uses."""
DIGEST_SCHEME = 1
"""Version of the walk ``state_digest`` hashes; a reader refuses a scheme it does not know."""

_ZIP_MAGIC = b"PK"
_PICKLE_PROTO = 0x80  # torch.save's legacy format is a pickle stream, which starts with the PROTO opcode
_HEAD = 64  # bytes read to tell a text file from a binary one


class CheckpointError(ValueError):
    """A weights file that must not be used. ``str()`` is one line naming the file and what is wrong.

    A ``ValueError``: callers that already turned a bad checkpoint's ``ValueError`` into a one-line message
    keep doing so.

    Attributes:
        path: the file.
        reason: what is wrong, without the file name.
        corrupted: the file reads, but its contents differ from its digest.
    """

    def __init__(self, path: Path | str, reason: str, corrupted: bool = False, message: str | None = None) -> None:
        self.path, self.reason, self.corrupted = Path(path), reason, corrupted
        super().__init__(message or f"{path}: {reason}")


# --------------------------------------------------------------------------- the digest


def state_digest(state: Mapping[str, Any], workers: int | None = None) -> str:
    """The sha256 (hex) of a checkpoint's contents, ``DIGEST_KEY`` left out.

    The walk is deterministic: dict entries in their order (pickle keeps it), each value tagged with its type,
    every tensor as dtype, shape and the sha256 of its elements' bytes in row-major order (so a tensor's storage
    layout, device and ``requires_grad`` do not count, only what a loader gets). Tensor bytes are hashed in
    ``CHUNK`` pieces on ``workers`` threads (hashlib releases the GIL): hashing is the whole cost of verifying,
    and one core hashes at ~2 GB/s where torch loads a cached file at several.

    Args:
        state: a checkpoint's top-level dict (tensors may be on any device; they are copied to the CPU to hash).
        workers: hashing threads (default: the CPUs, at most 8); the digest does not depend on it.

    Raises:
        TypeError: a tensor that has no plain bytes (sparse, quantised), or a value of a type the walk does not
            cover (a numpy scalar, an object): ``save_checkpoint`` fails rather than write a digest that could
            not be checked again.
    """
    plain = {k: v for k, v in state.items() if k != DIGEST_KEY}
    tensors: list[torch.Tensor] = []
    _collect(plain, tensors)
    sums = _tensor_sums(tensors, workers or min(8, os.cpu_count() or 1))
    h = hashlib.sha256()
    try:
        _feed(h, plain, iter(sums))
    except _Undigestable as exc:
        raise TypeError(f"checkpoint entry {''.join(exc.where)}: cannot digest a {exc.kind}: a checkpoint holds "
                        "tensors, numbers, strings, bytes, None, torch dtypes and devices, and dicts, lists, tuples "
                        "and sets of them (convert it, e.g. a numpy scalar with .item())") from None
    return h.hexdigest()


CHUNK = 16 << 20
"""Bytes of a tensor hashed as one piece (a tensor's sum is the sha256 of its pieces' sums, so one large tensor
is hashed on several threads too)."""


def _collect(obj: Any, out: list[torch.Tensor]) -> None:
    """The tensors in ``obj``, in ``_feed``'s order."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _collect(key, out)
            _collect(value, out)
    elif isinstance(obj, (list, tuple, set, frozenset)):  # a set: its iteration order, as _feed walks it
        for item in obj:
            _collect(item, out)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's elements as a flat uint8 CPU tensor, row-major (no copy for a contiguous CPU tensor)."""
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"cannot digest a {t.layout} / quantised tensor")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def _tensor_sums(tensors: list[torch.Tensor], workers: int) -> list[bytes]:
    """Per tensor, the sha256 of its ``CHUNK``-sized pieces' sha256s, pieces hashed on ``workers`` threads."""
    flat = [_flat_bytes(t) for t in tensors]
    pieces = [(i, start) for i, f in enumerate(flat) for start in range(0, max(1, f.numel()), CHUNK)]

    def piece_sum(piece: tuple[int, int]) -> bytes:
        i, start = piece
        return hashlib.sha256(flat[i][start:start + CHUNK].numpy()).digest()

    total = sum(f.numel() for f in flat)
    if workers > 1 and total > 4 * CHUNK:  # below that, starting threads costs more than it saves
        with ThreadPoolExecutor(workers) as pool:
            piece_sums = list(pool.map(piece_sum, pieces, chunksize=1))
    else:
        piece_sums = [piece_sum(p) for p in pieces]
    joined: list[bytearray] = [bytearray() for _ in flat]
    for (i, _), digest in zip(pieces, piece_sums, strict=True):
        joined[i] += digest
    return [hashlib.sha256(j).digest() for j in joined]


class _Undigestable(TypeError):
    """A value of a type the walk does not cover; ``where`` is filled in on the way out (``[key]`` per level)."""

    def __init__(self, obj: Any) -> None:
        super().__init__(obj)
        self.kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        self.where: list[str] = []


def _feed(h: Any, obj: Any, sums: Iterator[bytes]) -> None:
    """Hash ``obj`` into ``h``: a type tag, then the value (a tensor: its next sum from ``sums``); containers
    recursively, lengths included so that no two different structures give the same byte stream.

    Every type is covered explicitly: a value of any other type raises ``_Undigestable`` (a repr is no stable
    text of a value in general: a set's repr follows its iteration order, which the string hash seed changes).
    """
    if isinstance(obj, torch.Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)};".encode())
        h.update(next(sums))
    elif isinstance(obj, Mapping):
        h.update(f"{{{len(obj)};".encode())
        for key, value in obj.items():
            _feed_item(h, key, sums, f"[{key!r}]")
            _feed_item(h, value, sums, f"[{key!r}]")
    elif isinstance(obj, (list, tuple)):  # torch.Size is a tuple: the same (it pickles and loads as itself)
        h.update(f"{'[' if isinstance(obj, list) else '('}{len(obj)};".encode())
        for i, item in enumerate(obj):
            _feed_item(h, item, sums, f"[{i}]")
    elif isinstance(obj, (set, frozenset)):
        # Saved and loaded in iteration order, which for strings depends on PYTHONHASHSEED: hash the elements
        # one by one and feed their sums sorted, an order of the contents alone.
        element_sums = []
        for item in obj:
            one = hashlib.sha256()
            _feed_item(one, item, sums, "{element}")
            element_sums.append(one.digest())
        h.update(f"{'S' if isinstance(obj, set) else 'F'}{len(obj)};".encode())
        for digest in sorted(element_sums):
            h.update(digest)
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"s{len(data)};".encode())
        h.update(data)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(f"{'b' if isinstance(obj, bytes) else 'B'}{len(obj)};".encode())
        h.update(obj)
    elif obj is None or isinstance(obj, bool):
        h.update(f"{obj!r};".encode())
    elif isinstance(obj, int):
        h.update(f"i{obj};".encode())
    elif isinstance(obj, float):
        h.update(f"f{obj.hex()};".encode())  # exact, and -0.0 and nan included
    elif isinstance(obj, complex):
        h.update(f"c{obj.real.hex()},{obj.imag.hex()};".encode())
    elif isinstance(obj, torch.dtype):
        h.update(f"D{obj};".encode())  # "torch.float32"
    elif isinstance(obj, torch.device):
        h.update(f"V{obj.type}:{obj.index};".encode())
    else:
        raise _Undigestable(obj)


def _feed_item(h: Any, obj: Any, sums: Iterator[bytes], where: str) -> None:
    """``_feed`` of an item of a container, adding its place (``where``: ``['key']``, ``[3]``, ``{element}``) to
    an error's path."""
    try:
        _feed(h, obj, sums)
    except _Undigestable as exc:
        exc.where.insert(0, where)
        raise


def stamped(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with its digest entry (``DIGEST_KEY``) added last, replacing any it held.

    Args:
        state: the checkpoint's entries.
    """
    plain = {k: v for k, v in state.items() if k != DIGEST_KEY}
    return {**plain, DIGEST_KEY: {"scheme": DIGEST_SCHEME, "sha256": state_digest(plain)}}


def verify_digest(path: Path | str, state: Any) -> bool:
    """Check a loaded checkpoint against the digest it carries.

    Args:
        path: the file ``state`` came from (for the message).
        state: what ``torch.load`` returned.

    Returns:
        True when the digest matched; False when there is none (a foreign file, or distillkit's before
        digests were stored), which the caller judges.

    Raises:
        CheckpointError: the contents differ from the digest, or the digest entry is not one this version reads.
    """
    if not isinstance(state, Mapping) or DIGEST_KEY not in state:
        return False
    record = state[DIGEST_KEY]
    if not (isinstance(record, Mapping) and record.get("scheme") == DIGEST_SCHEME
            and isinstance(record.get("sha256"), str)):
        scheme = record.get("scheme") if isinstance(record, Mapping) else None
        raise CheckpointError(path, f"its digest entry {DIGEST_KEY} is not one this distillkit reads (scheme "
                                    f"{scheme!r}, expected {DIGEST_SCHEME}): written by a newer distillkit?")
    try:
        got = state_digest(state)
    except TypeError as exc:
        raise CheckpointError(path, f"its contents cannot be digested ({exc})", corrupted=True) from None
    if got != record["sha256"]:
        raise CheckpointError(path, f"corrupted: its contents do not match the sha256 digest stored when it was "
                                    f"saved (stored {record['sha256'][:12]}..., now {got[:12]}...); do not use it",
                              corrupted=True)
    return True


# --------------------------------------------------------------------------- reading a file


def torch_file_format(path: Path | str) -> str:
    """Look at a file before ``torch.load`` does, without reading its tensors: ``"zip"`` (what ``torch.save``
    writes) or ``"legacy"`` (the pickle format of torch < 1.6, e.g. MoCo's released ``.pth.tar``).

    Reads the first bytes and, for a zip, its central directory only: cheap at any size.

    Args:
        path: the file.

    Raises:
        CheckpointError: no such file, a folder, an empty file, a text file, a zip archive torch did not write,
            a truncated zip, or bytes of no torch format.
    """
    p = Path(path)
    if p.is_dir():
        _refuse(p, "a folder, not a checkpoint file")
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            head = f.read(_HEAD)
    except FileNotFoundError:
        _refuse(p, "no such file")
    except OSError as exc:
        _refuse(p, f"cannot read it ({exc.strerror or exc})")
    if size == 0:
        _refuse(p, "empty file (0 bytes)")
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            # a torch zip's directory is at its end: a cut-off copy or an interrupted write loses it first
            _refuse(p, f"truncated or damaged: a zip archive without a readable directory ({size} bytes)")
        # torch.save writes "<name>/data.pkl" (the pickled structure) beside "<name>/data/<n>" (the tensors)
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            _refuse(p, f"a zip archive, but not a torch checkpoint (no data.pkl among its {len(names)} "
                              f"entries: {listed or 'none'})")
        return "zip"
    if head[0] == _PICKLE_PROTO:
        return "legacy"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        shown = text.strip().splitlines()[0][:30] if text.strip() else ""
        _refuse(p, f"a text file ({size} bytes, starting {shown!r})")
    _refuse(p, f"neither torch.save's zip format nor its legacy pickle format (starts with bytes "
                      f"{head[:8].hex(' ')})")


def _refuse(path: Path, what: str) -> NoReturn:
    raise CheckpointError(path, f"not a readable checkpoint: {what}")


def read_torch_file(path: Path | str, map_location: str | torch.device = "cpu", mmap: bool = False,
                    safe_globals: Iterable[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` after ``torch_file_format``'s checks, any failure in one line.

    Args:
        path: the file.
        map_location: where tensors go.
        mmap: map tensor storage from the file instead of reading it; ignored for the legacy format, which
            cannot be mapped (torch would refuse it with a misleading message).
        safe_globals: classes a foreign file may hold beyond weights (DINO's ``argparse.Namespace``).

    Raises:
        CheckpointError: see ``torch_file_format``; or ``torch.load`` failed (named with torch's first line).
    """
    fmt = torch_file_format(path)
    allowed = list(safe_globals)
    try:
        with torch.serialization.safe_globals(allowed) if allowed else nullcontext():
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and fmt == "zip")
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(path, "refused: it holds Python objects besides weights, and loading them "
                                        "would run pickled code (weights_only)") from None
        failure, what = exc, "damaged"
    except EOFError as exc:  # the legacy format's pickle stream ends early
        failure, what = exc, "truncated"
    except Exception as exc:  # noqa: BLE001 - torch raises many types (RuntimeError, KeyError, ...)
        failure, what = exc, "torch.load failed"
    # raised here, outside the handlers: one line, no "during handling of the above exception" chain
    raise CheckpointError(path, f"not a readable checkpoint: {what} ({one_line(failure, with_type=True)})")


def load_weights(path: Path | str, map_location: str | torch.device = "cpu", mmap: bool = False,
                 safe_globals: Iterable[Any] = ()) -> Any:
    """Any torch weights file (a teacher, a student, an init checkpoint): read as ``read_torch_file`` does and,
    when it is distillkit's own (it carries a digest), verified, the digest entry then left out of what is
    returned. Files of other projects carry none and are accepted as they are.

    Args:
        path: the file.
        map_location: where tensors go.
        mmap: see ``read_torch_file``.
        safe_globals: see ``read_torch_file``.

    Raises:
        CheckpointError: the file is unreadable, or distillkit's and corrupted.
    """
    obj = read_torch_file(path, map_location=map_location, mmap=mmap, safe_globals=safe_globals)
    if verify_digest(path, obj):
        del obj[DIGEST_KEY]  # metadata of the file, not weights: loaders see what was saved
    return obj
