"""The toy trainer: a student layer regresses the stored teacher embeddings (distillation in
miniature), through distillkit's own streaming and training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distillkit.pipelines.manifest import Key
from distillkit.train.base import Trainer
from distillkit.train.checkpoint import load_checkpoint
from distillkit.train.loop import LoopConfig, train_loop
from distillkit.train.streaming import ShardStream, make_loader


class Student(nn.Module):
    def __init__(self, length: int = 32, dim: int = 8, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(length, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(batch["signal"]), batch["teacher"])


def _example(sample: dict[str, Any], rng: Any = None, gen: Any = None) -> dict[str, Any]:
    return {"signal": torch.from_numpy(np.asarray(sample["signal.npy"], np.float32)),
            "teacher": torch.from_numpy(np.asarray(sample["teacher.npy"], np.float32))}


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class ToyTrainer(Trainer):
    name = "toy"
    pipeline = "toy"
    summary = "Toy distillation: a student regresses stored teacher embeddings"
    schema = {"hidden": Key(int, 32, doc="student hidden width"), "lr": Key(float, 1e-2, doc="AdamW learning rate")}

    def _student(self, shards: Path, config: dict[str, Any]) -> Student:
        first = next(iter(ShardStream(shards, epochs=1, shuffle_shards=False)))
        torch.manual_seed(config["seed"])
        return Student(len(first["signal.npy"]), len(first["teacher.npy"]), config["hidden"])

    def train(self, shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu",
              resume: bool = False, strict: bool = False) -> dict[str, Any]:
        student = self._student(shards, config)
        stream = ShardStream(shards, seed=config["seed"], shuffle_buffer=8, transform=_example, strict=strict,
                             required=["signal.npy", "teacher.npy"])
        loop = LoopConfig(max_steps=config["max_steps"], device=device, out=out, resume=resume, optimizer="adamw",
                          lr=config["lr"], weight_decay=0.0, log_every=config["log_every"], run_config=config)
        return train_loop(student, lambda: make_loader(stream, config["batch_size"], _collate,
                                                       num_workers=config["num_workers"]), loop,
                          batch_size=lambda b: len(b["signal"]))

    def evaluate(self, checkpoint: Path | None, shards: list[Path], config: dict[str, Any],
                 device: str = "cpu", options: dict[str, Any] | None = None) -> dict[str, Any]:
        examples = [_example(s) for d in shards for s in ShardStream(d, epochs=1, shuffle_shards=False)]
        batch = _collate(examples)
        result = {}
        random = self._student(shards[0], config)
        with torch.no_grad():
            result["mse_random"] = float(random.loss(batch))
            if checkpoint is not None:
                distilled = self._student(shards[0], config)
                distilled.load_state_dict(load_checkpoint(checkpoint)["model"])
                result["mse_distilled"] = float(distilled.loss(batch))
        return result
