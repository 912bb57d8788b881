"""Frozen video teachers for COMODO: a clip of F RGB frames -> one embedding (plain torch).

Two architectures, chosen by name:

- ``"timesformer"`` (the paper's teacher; COMODO uses ``facebook/timesformer-base-finetuned-k400``): a ViT-B/16
  with divided space-time attention (each block attends over time at every patch position, then over space in
  every frame), 8 frames at 224 x 224, 768-d; the clip embedding is the mean of the output tokens, as COMODO
  mean-pools. ~121 M parameters: meant for a GPU.
- ``"conv3d"`` (default for CPU tests and the demo): three strided 3-D convolutions and a linear layer, 128-d.
  Its temporal kernels see frame differences, so even at random init its embedding moves with camera motion.

Weights load from a local ``torch.save`` file of this module's ``state_dict`` (or ``{"model": state_dict}``),
read with ``weights_only=True``, or, for ``"timesformer"``, from a Hugging Face TimeSformer checkpoint file
(``pytorch_model.bin`` or ``model.safetensors`` of ``facebook/timesformer-base-finetuned-k400``, a
``TimesformerModel`` or ``TimesformerForVideoClassification``), whose names :func:`from_hf_timesformer` maps and
whose sizes set the architecture (tested against ``transformers``' own model). With no checkpoint the teacher
is **randomly initialised** from a fixed seed (the same weights in every process, so shards stay reproducible)
and :func:`load_video_teacher` says so loudly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.checkpoint_file import CheckpointError, load_weights
from distillkit.messages import one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("conv3d", "timesformer")


class Conv3dTeacher(nn.Module):
    """A small 3-D CNN: (B, 3, F, H, W) normalised clips -> (B, dim)."""

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, dim: int = 128, width: int = 16, input_size: int = 112):
        super().__init__()
        self.input_size = input_size
        self.dim = dim
        self.features = nn.Sequential(
            nn.Conv3d(3, width, (3, 7, 7), stride=(1, 4, 4), padding=(1, 3, 3)), nn.ReLU(),
            nn.Conv3d(width, 2 * width, 3, stride=(1, 2, 2), padding=1), nn.ReLU(),
            nn.Conv3d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(4 * width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


class _DividedBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        # eps 1e-6: TimeSformer's (and the Hugging Face checkpoint's) LayerNorm
        self.norm_t, self.attn_t = nn.LayerNorm(dim, eps=1e-6), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm_s, self.attn_s = nn.LayerNorm(dim, eps=1e-6), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, frames: int) -> Tensor:
        b, _, d = x.shape
        cls, tok = x[:, :1], x[:, 1:]
        n = tok.shape[1] // frames
        # Time: each patch position attends over the F frames.
        xt = tok.reshape(b, frames, n, d).transpose(1, 2).reshape(b * n, frames, d)
        h = self.norm_t(xt)
        xt = self.temporal_fc(self.attn_t(h, h, h, need_weights=False)[0])
        tok = tok + xt.reshape(b, n, frames, d).transpose(1, 2).reshape(b, frames * n, d)
        # Space: each frame's patches attend over the frame, with the class token copied into every frame.
        xs = torch.cat([cls.expand(b, frames, d).reshape(b * frames, 1, d), tok.reshape(b * frames, n, d)], 1)
        h = self.norm_s(xs)
        xs = self.attn_s(h, h, h, need_weights=False)[0]
        cls = cls + xs[:, :1].reshape(b, frames, d).mean(1, keepdim=True)
        tok = tok + xs[:, 1:].reshape(b, frames * n, d)
        x = torch.cat([cls, tok], 1)
        return x + self.mlp(self.norm_mlp(x))


class TimeSformerTeacher(nn.Module):
    """Divided space-time ViT: (B, 3, F, H, W) normalised clips -> (B, dim), mean of the output tokens."""

    # TimeSformer's own normalisation, which the preprocessor_config.json of facebook/timesformer-base-finetuned-k400
    # states (and COMODO's Hugging Face image processor therefore applies): not ImageNet's
    mean, std = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, patch: int = 16, input_size: int = 224,
                 frames: int = 8):
        super().__init__()
        self.input_size, self.dim, self.patch = input_size, dim, patch
        n = (input_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.time_embed = nn.Parameter(torch.randn(1, frames, dim) * 0.02)
        self.blocks = nn.ModuleList(_DividedBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        b, _, f, h, w = x.shape
        tok = self.patch_embed(x.transpose(1, 2).reshape(b * f, 3, h, w)).flatten(2).transpose(1, 2)  # (BF, N, D)
        n = tok.shape[1]
        tok = tok + self.pos_embed[:, 1:]
        time = self.time_embed if f == self.time_embed.shape[1] else F.interpolate(
            self.time_embed.transpose(1, 2), size=f, mode="nearest").transpose(1, 2)
        tok = (tok.reshape(b, f, n, -1) + time[:, :, None]).reshape(b, f * n, -1)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, 1, -1), tok], 1)
        for block in self.blocks:
            x = block(x, f)
        return self.norm(x).mean(1)


# Hugging Face TimeSformer block names -> _DividedBlock names (each with .weight and .bias)
_HF_BLOCK = {
    "temporal_layernorm": "norm_t",
    "temporal_attention.attention.qkv": "attn_t.in_proj",
    "temporal_attention.output.dense": "attn_t.out_proj",
    "temporal_dense": "temporal_fc",
    "layernorm_before": "norm_s",
    "attention.attention.qkv": "attn_s.in_proj",
    "attention.output.dense": "attn_s.out_proj",
    "layernorm_after": "norm_mlp",
    "intermediate.dense": "mlp.0",
    "output.dense": "mlp.2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.time_embeddings": "time_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def is_hf_timesformer(state: dict[str, Tensor]) -> bool:
    """Whether ``state`` holds Hugging Face TimeSformer names (with or without the ``timesformer.`` prefix)."""
    return any(k.removeprefix("timesformer.") == "embeddings.cls_token" for k in state)


def from_hf_timesformer(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """A Hugging Face ``TimesformerModel`` (or ``...ForVideoClassification``, classifier dropped) state dict ->
    (:class:`TimeSformerTeacher` state dict, its constructor arguments read from the tensor shapes).

    Heads are not stored in the weights: ``dim // 64``, the ViT convention every TimeSformer checkpoint follows.

    Raises:
        ValueError: a tensor the teacher needs is missing.
    """
    src = {k.removeprefix("timesformer."): v for k, v in state.items() if not k.startswith("classifier.")}
    out: dict[str, Tensor] = {}
    try:
        for hf, ours in _HF_TOP.items():
            out[ours] = src.pop(hf)
        depth = 0
        while f"encoder.layer.{depth}.layernorm_before.weight" in src:
            for hf, ours in _HF_BLOCK.items():
                for kind in ("weight", "bias"):
                    name = f"blocks.{depth}.{ours}{'_' if ours.endswith('in_proj') else '.'}{kind}"
                    out[name] = src.pop(f"encoder.layer.{depth}.{hf}.{kind}")
            depth += 1
    except KeyError as exc:
        raise ValueError(f"not a complete Hugging Face TimeSformer state dict: {exc.args[0]} is missing") from None
    if src:
        raise ValueError(f"Hugging Face TimeSformer state dict has unexpected tensors: {sorted(src)[:5]}")
    dim, patch = out["cls_token"].shape[-1], out["patch_embed.weight"].shape[-1]
    side = round((out["pos_embed"].shape[1] - 1) ** 0.5)
    config = {"dim": dim, "depth": depth, "heads": max(1, dim // 64), "patch": patch, "input_size": side * patch,
              "frames": out["time_embed"].shape[1]}
    return out, config


def _read_state(path: Path) -> dict[str, Tensor]:
    """The state dict of a ``.safetensors`` or torch file (``weights_only``; a file distillkit wrote is verified
    against its digest, ``checkpoint_file.load_weights``), unwrapped from ``{"model": ...}``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_weights(path, map_location="cpu")
    return state.get("model", state) if isinstance(state, dict) else state


@dataclass(frozen=True)
class TeacherInfo:
    """What teacher produced an embedding: recorded in shards' ``index.json`` and in the trainer's log."""

    arch: str
    checkpoint: str
    random_init: bool
    dim: int
    input_size: int


def build_video_teacher(arch: str, dim: int | None = None) -> nn.Module:
    """An untrained teacher of architecture ``arch`` (one of :data:`ARCHS`) in eval mode."""
    if arch == "conv3d":
        model: nn.Module = Conv3dTeacher(dim=dim or 128)
    elif arch == "timesformer":
        model = TimeSformerTeacher(dim=dim or 768)
    else:
        raise ValueError(f"unknown video teacher {arch!r} (choose from {', '.join(ARCHS)})")
    return model.eval()


def load_video_teacher(arch: str, checkpoint: str | Path = "", seed: int = 0) -> tuple[nn.Module, TeacherInfo]:
    """A frozen video teacher: weights from ``checkpoint``, or a seeded random init (warned about).

    Args:
        arch: one of :data:`ARCHS`.
        checkpoint: path of a ``torch.save``-d state dict (or ``{"model": state_dict}``); ``""`` for none.
        seed: seed of the random init when there is no checkpoint.

    Returns:
        ``(model, info)``: the model in eval mode with gradients off.

    Raises:
        ValueError: unknown arch, missing/unreadable checkpoint or one whose keys do not match.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_video_teacher(arch)
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise ValueError(f"video teacher checkpoint {path} does not exist")
        try:
            state = _read_state(path)
        except CheckpointError:  # one line naming the file already (unreadable, or corrupted)
            raise
        except Exception as exc:
            raise ValueError(f"{path}: cannot load video teacher checkpoint ({exc})") from exc
        if arch == "timesformer" and isinstance(state, dict) and is_hf_timesformer(state):
            state, config = from_hf_timesformer(state)
            model = TimeSformerTeacher(**config).eval()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path}: not a {arch} teacher state dict ({one_line(exc)})") from exc
    else:
        msg = (f"video teacher {arch!r} has NO checkpoint: using a RANDOMLY INITIALISED teacher (seed {seed}); "
               "pass a checkpoint for real distillation")
        warnings.warn(msg, stacklevel=2)
    for p in model.parameters():
        p.requires_grad_(False)
    info = TeacherInfo(arch=arch, checkpoint=str(checkpoint), random_init=not checkpoint,
                       dim=int(model.dim), input_size=int(model.input_size))
    return model, info


def preprocess_clips(clips: np.ndarray | Tensor, input_size: int, device: torch.device | str = "cpu",
                     mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """uint8 (B, F, H, W, 3) RGB clips -> float32 (B, 3, F, S, S) resized (bilinear) and normalised with the
    teacher's ``mean``/``std`` (on [0, 1] values)."""
    x = torch.as_tensor(np.asarray(clips) if not isinstance(clips, Tensor) else clips).to(device)
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, F, H, W, 3) clips, got {tuple(x.shape)}")
    b, f, h, w, _ = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(b * f, 3, h, w).float().div_(255)
    if (h, w) != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.reshape(b, f, 3, input_size, input_size).transpose(1, 2).contiguous()


@torch.no_grad()
def embed_clips(model: nn.Module, clips: np.ndarray | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Embed uint8 (B, F, H, W, 3) clips with a frozen teacher: float32 (B, D) on ``device``."""
    x = preprocess_clips(clips, int(model.input_size), device, model.mean, model.std)
    return model(x).float()
