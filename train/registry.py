"""Method name -> trainer module (each exposes ``train_main`` and ``eval_main``)."""

from __future__ import annotations

from types import ModuleType

from train import slidr

TRAINERS: dict[str, ModuleType] = {"slidr": slidr}
