"""Checkpoints: ``torch.save`` of plain state dicts, tensors and numbers only; loaded with
``weights_only=True`` (a checkpoint never executes code). Writes are atomic (tmp + ``os.replace``)
so an interrupted save never leaves a half-written ``latest``.

Checkpoints written while a trainer trains (``current_method()``: every ``Trainer.train`` call runs inside
``training_as(trainer.name)``, see ``train.base``) also hold ``"method": name``, so ``eval`` and ``--resume``
can refuse another method's checkpoint in one line; ``checkpoint_info`` reads it back, with the stored
configuration.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    """Atomically write ``state`` (state dicts, tensors, numbers, strings) to ``path``."""
    path = Path(path)
    method = _METHOD.get()
    if method is not None and "method" not in state:
        state = {**state, "method": method}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (never unpickles arbitrary objects); ``mmap``
    maps tensor storage from the file instead of reading it (for reading only part of it)."""
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


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

    The file is memory-mapped: the caller loads the weights afterwards anyway, and reading a paper-size
    checkpoint twice just for these would double that I/O.

    Args:
        path: the checkpoint file.

    Raises:
        Exception: whatever ``torch.load`` raises for a file that is not a checkpoint (the caller words it).
    """
    state = load_checkpoint(path, mmap=True)
    if not isinstance(state, dict):
        return None, None
    method, config = state.get("method"), state.get("config")
    return (method if isinstance(method, str) else None), (dict(config) if isinstance(config, dict) else None)
