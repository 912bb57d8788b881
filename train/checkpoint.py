"""Checkpoints: ``torch.save`` of plain state dicts, tensors and numbers only; loaded with
``weights_only=True`` (a checkpoint never executes code). Writes are atomic (tmp + ``os.replace``)
so an interrupted save never leaves a half-written ``latest``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


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
    p = Path(out) / "latest.pt"
    return p if p.is_file() else None
