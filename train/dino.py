"""DINO's projection head and self-distillation loss (Caron et al. 2021, facebookresearch/dino).

``DINOHead``: MLP (``nlayers`` linear layers, GELU, hidden 2048) -> bottleneck (256) -> L2
normalisation -> weight-normalised linear layer to K prototypes without bias. The parameter names
are DINO's (``mlp.{0,2,4}``, ``last_layer.weight_g``, ``last_layer.weight_v``), so DINO heads load;
the weight norm is written out here rather than taken from ``torch.nn.utils.weight_norm``
(deprecated) or its parametrization (which renames the parameters).

``DINOLoss``: cross-entropy between the sharpened, centred teacher distribution and the student
distribution, ``-sum_k softmax((t - c) / tau_t)_k * log_softmax(s / tau_s)_k``. The centre ``c`` is an
EMA (momentum 0.9) of the mean teacher output, all-reduced across ranks when distributed; the teacher
temperature warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
``warmup_steps``. Two entry points: ``forward`` for already matched rows (QuerySD's matched region
pairs, one row per pair) and ``multicrop`` for DINO's view pairing (every teacher view against every
other student view).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is ``g * v / ||v||`` per output row.

    Args:
        in_dim: input width.
        out_dim: output width (K).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(x, w)


class DINOHead(nn.Module):
    """DINO projection head.

    Args:
        in_dim: input width (the backbone's embed dim).
        out_dim: K, the number of prototypes (DINO 65536; S2-UniSeg 512).
        nlayers: linear layers in the MLP (>= 1; DINO 3).
        hidden_dim: MLP hidden width (DINO 2048).
        bottleneck_dim: MLP output width before the L2 norm (DINO 256).
        norm_last_layer: freeze the weight-norm gains at 1 (DINO's default, stabilises training).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 512,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., K) for inputs (..., in_dim).

        Args:
            x: embeddings, any leading shape.
        """
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def teacher_temperature(step: int, warmup_teacher_temp: float, teacher_temp: float, warmup_steps: int) -> float:
    """DINO's teacher-temperature schedule: linear warm-up, then constant.

    Args:
        step: optimisation step (0-based).
        warmup_teacher_temp: temperature at step 0 (DINO 0.04).
        teacher_temp: temperature after warm-up (DINO 0.04-0.07).
        warmup_steps: warm-up length in steps (0: no warm-up).
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return teacher_temp
    return warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * max(step, 0) / warmup_steps


def dino_cross_entropy(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float, teacher_temp: float
) -> torch.Tensor:
    """Per-row DINO cross-entropy, shape (N,): ``-sum_k p_t * log p_s``.

    Args:
        student: (N, K) student logits.
        teacher: (N, K) teacher logits (detached here).
        center: (1, K) or (K,) centre subtracted from the teacher logits.
        student_temp: student temperature (DINO 0.1).
        teacher_temp: teacher temperature.
    """
    q = F.softmax((teacher.detach().float() - center) / teacher_temp, dim=-1)
    return -(q * F.log_softmax(student.float() / student_temp, dim=-1)).sum(dim=-1)


class DINOLoss(nn.Module):
    """DINO loss with centring and a teacher-temperature warm-up.

    The centre is a buffer (saved in the state dict, so a resumed run continues it).

    Args:
        out_dim: K.
        teacher_temp: teacher temperature after warm-up.
        warmup_teacher_temp: teacher temperature at step 0.
        warmup_steps: warm-up length in steps.
        student_temp: student temperature.
        center_momentum: EMA momentum of the centre (DINO 0.9).
    """

    def __init__(
        self,
        out_dim: int,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_steps: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_steps = warmup_steps
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def temperature(self, step: int) -> float:
        """Teacher temperature at a step.

        Args:
            step: optimisation step.
        """
        return teacher_temperature(step, self.warmup_teacher_temp, self.teacher_temp, self.warmup_steps)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, step: int, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy over matched rows; updates the centre from ``teacher`` (training only).

        Args:
            student: (N, K) student logits of N matched items (regions, views).
            teacher: (N, K) teacher logits of the same items.
            step: optimisation step (for the temperature schedule).
            weight: optional (N,) non-negative weights; the loss is their weighted mean.
        """
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
        ce = dino_cross_entropy(student, teacher, self.center, self.student_temp, self.temperature(step))
        if weight is None:
            loss = ce.mean() if ce.numel() else ce.sum()
        else:
            loss = (ce * weight).sum() / weight.sum().clamp_min(1e-12)
        if self.training:
            self.update_center(teacher)
        return loss

    def multicrop(
        self, student_views: list[torch.Tensor], teacher_views: list[torch.Tensor], step: int
    ) -> torch.Tensor:
        """DINO's multi-crop loss: every teacher view against every student view but its own.

        Student view ``i`` and teacher view ``i`` are the same crop for ``i < len(teacher_views)``
        (DINO: the global crops come first); those pairs are skipped.

        Args:
            student_views: list of (B, K) student logits, one per crop.
            teacher_views: list of (B, K) teacher logits, one per global crop.
            step: optimisation step.
        """
        temp = self.temperature(step)
        total, n = student_views[0].new_zeros((), dtype=torch.float32), 0
        for it, t in enumerate(teacher_views):
            for iv, s in enumerate(student_views):
                if iv == it:
                    continue
                total = total + dino_cross_entropy(s, t, self.center, self.student_temp, temp).mean()
                n += 1
        if self.training:
            self.update_center(torch.cat(teacher_views))
        return total / max(n, 1)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """EMA of the mean teacher logit, averaged over all ranks when distributed.

        Args:
            teacher: (N, K) teacher logits; N may be 0 (the centre is then left unchanged).
        """
        t = teacher.detach().float()
        stats = torch.cat([t.sum(dim=0), t.new_tensor([t.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        count = stats[-1]
        if count <= 0:
            return
        batch_center = (stats[:-1] / count).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center * (1.0 - self.center_momentum))
