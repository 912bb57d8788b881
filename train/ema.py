"""Exponential moving average of a network's weights (the momentum teacher of DINO / iBOT / QuerySD).

``ema_update`` moves every floating-point parameter of the teacher towards the student's:
``t <- m * t + (1 - m) * s``. Buffers are not learned: by default they are copied from the
student (BatchNorm running statistics then follow the network that produced them; a ViT has
none). ``cosine_momentum`` is DINO's schedule, rising from ``base`` to ``final`` over training.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, buffers: str = "copy") -> None:
    """In place: teacher = momentum * teacher + (1 - momentum) * student.

    Parameters are matched by name, so the two modules must have the same architecture (wrap-free:
    pass ``model.module`` for DDP). Integer parameters/buffers are copied.

    Args:
        teacher: the EMA network (its parameters should have ``requires_grad=False``).
        student: the network being trained.
        momentum: in [0, 1]; 1 keeps the teacher unchanged, 0 copies the student.
        buffers: "copy" (student's buffers copied), "ema" (floating buffers averaged like
            parameters) or "keep" (teacher's buffers untouched).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if buffers not in ("copy", "ema", "keep"):
        raise ValueError(f"buffers must be 'copy', 'ema' or 'keep', got {buffers!r}")
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters())
    if s_params.keys() != t_params.keys():
        raise ValueError("teacher and student have different parameters")
    pairs = [(t_params[k], s_params[k]) for k in t_params]
    floating = [(t, s) for t, s in pairs if t.dtype.is_floating_point]
    if floating:
        ts = [t for t, _ in floating]
        ss = [s.detach().to(t.dtype) for t, s in floating]
        # one fused kernel over all tensors instead of a Python loop of small ops
        torch._foreach_lerp_(ts, ss, 1.0 - momentum)
    for t, s in pairs:
        if not t.dtype.is_floating_point:
            t.copy_(s)
    if buffers == "keep":
        return
    s_bufs = dict(student.named_buffers())
    for k, t in teacher.named_buffers():
        s = s_bufs.get(k)
        if s is None:
            continue
        if buffers == "ema" and t.dtype.is_floating_point:
            t.lerp_(s.to(t.dtype), 1.0 - momentum)
        else:
            t.copy_(s)


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """DINO's teacher momentum schedule: ``final + (base - final) * (1 + cos(pi * step / total)) / 2``.

    Args:
        step: current optimisation step (0-based); clamped to [0, total_steps].
        total_steps: length of training in steps (>= 1).
        base: momentum at step 0 (DINO: 0.996).
        final: momentum at the last step (DINO: 1.0).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    t = min(max(step, 0), total_steps) / total_steps
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))
