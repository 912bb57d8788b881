"""Method name -> trainer, from the ``distillkit.trainers`` entry points (imported on demand)."""

from __future__ import annotations

from typing import Any

from distillkit.pipelines.registry import TRAINERS_GROUP, PluginError, Registry
from distillkit.train.base import Trainer


def _make_trainer(obj: Any) -> Trainer:
    trainer = obj() if isinstance(obj, type) else obj
    if not isinstance(trainer, Trainer):
        raise PluginError(f"{obj!r} is not a distillkit.train.base.Trainer")
    return trainer


TRAINERS: Registry[Trainer] = Registry(TRAINERS_GROUP, "method", _make_trainer)


def get_trainer(name: str) -> Trainer:
    """The registered trainer called ``name``; raises ``PluginError`` for an unknown name."""
    return TRAINERS.get(name)
