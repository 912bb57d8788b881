"""Checkpoints: ``torch.save`` of plain state dicts, tensors and numbers only; loaded with
``weights_only=True`` (a checkpoint never executes code). Writes are atomic (tmp + ``os.replace``)
so an interrupted save never leaves a half-written ``latest``.

Checkpoints written while a trainer trains (``current_method()``: every ``Trainer.train`` call runs inside
``training_as(trainer.name)``, see ``train.base``) also hold ``"method": name``, so ``eval`` and ``--resume``
can refuse another method's checkpoint in one line; ``checkpoint_info`` reads it back, with the stored
configuration.

Every checkpoint written here carries a digest of its contents (``distillkit.checkpoint_file``), and
``load_checkpoint`` verifies it: a corrupted file is refused in one line (``CheckpointError``), as is a file
that is no distillkit checkpoint; one written before digests were stored loads with a warning that it cannot
be checked.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillkit.checkpoint_file import DIGEST_KEY, CheckpointError, read_torch_file, stamped, verify_digest

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "checkpoint_info", "current_method", "latest_checkpoint",
           "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state", "training_as"]

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "latest.pt"
# The method whose run is being trained. A context variable rather than a LoopConfig field: the trainers build
# their loop configurations themselves, and every one of them would otherwise have to pass its name down.
_METHOD: ContextVar[str | None] = ContextVar("distillkit_checkpoint_method", default=None)


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors/ints (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {
            "version": py_state[0],
            "state": list(py_state[1]),
            "gauss": py_state[2] if py_state[2] is None else float(py_state[2]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (state dicts, tensors, numbers, strings) to ``path``, with the digest of its
    contents (``checkpoint_file.stamped``) that ``load_checkpoint`` verifies.

    Args:
        path: the file (``OUT/latest.pt``); its folder is created.
        state: the entries.
    """
    path = Path(path)
    method = _METHOD.get()
    if method is not None and "method" not in state:
        state = {**state, "method": method}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(stamped(state), tmp)
    os.replace(tmp, path)
    return path


# Files already warned about as unverifiable: the CLI reads a checkpoint's configuration, then the trainer
# loads it, and one warning per file is enough.
_UNCHECKED_WARNED: set[str] = set()


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a distillkit checkpoint (``save_checkpoint``'s) with ``weights_only=True`` (never unpickles
    arbitrary objects) and verify its digest.

    A checkpoint written before digests were stored loads with a one-line warning that it cannot be checked.
    Weights of other projects (a MoCo or DINO file) are no distillkit checkpoint (they hold no ``"model"``):
    read those with ``checkpoint_file.load_weights``.

    Args:
        path: the checkpoint file.
        map_location: where its tensors go.
        mmap: map tensor storage from the file instead of reading it (for reading only part of it; verifying
            the digest still reads every tensor once).

    Raises:
        CheckpointError: one line naming the file: not a readable torch file (empty, truncated, text, foreign
            zip), not a distillkit checkpoint, or contents that differ from its digest.
    """
    state = read_torch_file(path, map_location=map_location, mmap=mmap)
    if not isinstance(state, dict) or "model" not in state:
        if isinstance(state, dict):
            keys = ", ".join(map(str, list(state)[:4])) + (", ..." if len(state) > 4 else "")
            held = f"its entries are {keys}" if keys else "it is an empty dict"
        else:
            held = f"it holds a {type(state).__name__}"
        raise CheckpointError(path, f"not a distillkit training checkpoint (no 'model' entry; {held})")
    if verify_digest(path, state):
        del state[DIGEST_KEY]  # metadata of the file, not an entry: the caller gets what was saved
    else:
        key = str(Path(path).resolve())
        if key not in _UNCHECKED_WARNED:
            _UNCHECKED_WARNED.add(key)
            log.warning("%s: carries no digest (%s; written before distillkit checkpoints had one): its contents "
                        "cannot be checked", path, DIGEST_KEY)
    return state


def latest_checkpoint(out: Path | str) -> Path | None:
    p = Path(out) / CHECKPOINT_NAME
    return p if p.is_file() else None


def current_method() -> str | None:
    """The name of the method being trained in this context (``slidr``), None outside any ``training_as``.

    The one source of a run's method name: the checkpoint's ``"method"`` and the title of ``curves.png``.
    """
    return _METHOD.get()


@contextmanager
def training_as(name: str) -> Iterator[None]:
    """Within this context ``current_method()`` is ``name``: every ``save_checkpoint`` also stores
    ``"method": name`` (unless the state names one already). ``Trainer.train`` enters it by itself.

    Args:
        name: the trainer's name (``slidr``).
    """
    token = _METHOD.set(name)
    try:
        yield
    finally:
        _METHOD.reset(token)


def checkpoint_info(path: Path | str) -> tuple[str | None, dict[str, Any] | None]:
    """The method name and the training configuration stored in a checkpoint, each None when it holds none
    (checkpoints written before the method was stored, or outside ``training_as``).

    The file is memory-mapped, and its digest verified (so ``eval`` and ``--resume`` refuse a corrupted file
    before anything else): the caller loads the weights again afterwards and verifies them again, for the file
    may change in between. Mapped, the tensors are not copied into memory for that first pass.

    Args:
        path: the checkpoint file.

    Raises:
        CheckpointError: not a readable distillkit checkpoint, or a corrupted one (``load_checkpoint``).
    """
    state = load_checkpoint(path, mmap=True)
    if not isinstance(state, dict):
        return None, None
    method, config = state.get("method"), state.get("config")
    return (method if isinstance(method, str) else None), (dict(config) if isinstance(config, dict) else None)
