"""A plain-torch Vision Transformer in DINO's ``vision_transformer.py`` state-dict layout.

The parameter names and shapes are those of facebookresearch/dino (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 /
mlp.fc2``, ``norm``), so the public ``dino_vits8`` / ``dino_vits16`` / ``dino_vitb8`` /
``dino_vitb16`` checkpoints load with ``strict=True``. Nothing here downloads weights: a
checkpoint is a local file, read with ``torch.load(weights_only=True)``.

Beyond DINO's model:

- patch size may be rectangular, ``(ph, pw)`` (e.g. 64 x 4 patches over a 1-channel 64-mel x T
  spectrogram), and ``in_chans`` is free;
- the position embedding is interpolated (bicubic) to any ``(h, w)`` token grid, non-square and
  variable-length included; the stored table stays at its training grid (``img_size / patch``);
- ``forward_features(x, keys=True)`` also returns the last block's attention keys (heads
  concatenated), the features TokenCut and the released UniAP code read (reference/uniap.md §1).

Shapes: input ``(B, in_chans, H, W)`` float; H and W are cropped down to multiples of the patch
size (as DINO's feature extraction does). Output patch tokens ``(B, h, w, D)`` with
``h = H // ph``, ``w = W // pw``; CLS ``(B, D)``.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.checkpoint_file import load_weights

# name -> (embed_dim, depth, num_heads, mlp_ratio). "small"/"base" are DINO's ViT-S and ViT-B;
# "tiny" is a CPU-sized network for tests and the demo (not DeiT-Ti, which is 192 x 12).
SIZES: dict[str, tuple[int, int, int, float]] = {
    "tiny": (96, 4, 3, 4.0),
    "deit-tiny": (192, 12, 3, 4.0),
    "small": (384, 12, 6, 4.0),
    "base": (768, 12, 12, 4.0),
}


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: a strided convolution (DINO's ``patch_embed.proj``).

    Args:
        patch: patch size (ph, pw) in pixels.
        in_chans: input channels.
        embed_dim: token width D.
    """

    def __init__(self, patch: tuple[int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, D, h, w)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (DINO's ``attn.qkv``, ``attn.proj``).

    Args:
        dim: token width.
        num_heads: heads; ``dim`` must divide evenly.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, hd)
        # SDPA's default scale is hd^-0.5, DINO's scale; same numbers, fused kernel on GPU.
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))
        keys = k.transpose(1, 2).reshape(B, N, D) if return_keys else None
        return out, keys


class Mlp(nn.Module):
    """Two-layer GELU MLP (DINO's ``mlp.fc1``, ``mlp.fc2``).

    Args:
        dim: token width.
        hidden: hidden width.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with optional stochastic depth (DINO's ``drop_path``).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        drop_path: probability of dropping the residual branch per sample (training only).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor, return_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, keys = self.attn(self.norm1(x), return_keys)
        x = x + self._drop(y)
        x = x + self._drop(self.mlp(self.norm2(x)))
        return x, keys


@dataclass
class ViTOutput:
    """What ``ViT.forward_features`` returns.

    Attributes:
        cls: (B, D) CLS token after the final LayerNorm.
        patches: (B, h, w, D) patch tokens after the final LayerNorm, row-major grid.
        keys: (B, h, w, D) last block's attention keys (heads concatenated), CLS dropped; None
            unless asked for.
    """

    cls: torch.Tensor
    patches: torch.Tensor
    keys: torch.Tensor | None = None


class ViT(nn.Module):
    """Vision Transformer, DINO layout (no classification head: DINO checkpoints have none).

    Args:
        patch: patch size, int or (ph, pw).
        in_chans: input channels (3 for RGB, 1 for a spectrogram).
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / D.
        img_size: input size (H, W) or int the position table is stored for; the table has
            ``(H // ph) * (W // pw) + 1`` rows (224 -> DINO's 197 for /16, 785 for /8).
        drop_path_rate: stochastic depth, linearly increasing over blocks up to this value.
    """

    def __init__(
        self,
        patch: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        img_size: int | tuple[int, int] = 224,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch = _pair(patch)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        H, W = _pair(img_size)
        self.base_grid = (H // self.patch[0], W // self.patch[1])
        if min(self.base_grid) < 1:
            raise ValueError(f"img_size {(H, W)} is smaller than one patch {self.patch}")
        self.patch_embed = PatchEmbed(self.patch, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.base_grid[0] * self.base_grid[1] + 1, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an input of height x width pixels.

        Args:
            height: input height in pixels.
            width: input width in pixels.
        """
        return height // self.patch[0], width // self.patch[1]

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an (h, w) token grid, (1, 1 + h*w, D).

        Bicubic resampling of the stored table (as DINO's ``interpolate_pos_encoding``, but to the
        exact target size rather than by a scale factor, so any h, w is reached exactly).

        Args:
            h: grid rows.
            w: grid columns.
        """
        gh, gw = self.base_grid
        if (h, w) == (gh, gw):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, grid], dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, prepend CLS, add position embedding.

        Args:
            x: (B, in_chans, H, W); H, W are cropped to multiples of the patch size.

        Returns:
            tokens (B, 1 + h*w, D) and the grid (h, w).
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = self.grid(x.shape[2], x.shape[3])
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(x.shape[2:])} is smaller than one patch {self.patch}")
        x = x[:, :, : h * self.patch[0], : w * self.patch[1]]
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return t + self.interpolate_pos_embed(h, w), (h, w)

    def forward_features(self, x: torch.Tensor, keys: bool = False) -> ViTOutput:
        """CLS, patch tokens and optionally the last block's keys.

        Args:
            x: (B, in_chans, H, W) input.
            keys: also return the last block's attention keys.
        """
        t, (h, w) = self.prepare_tokens(x)
        k = None
        for i, blk in enumerate(self.blocks):
            t, k_i = blk(t, return_keys=keys and i == len(self.blocks) - 1)
            if k_i is not None:
                k = k_i
        t = self.norm(t)
        B = t.shape[0]
        out = ViTOutput(cls=t[:, 0], patches=t[:, 1:].reshape(B, h, w, -1))
        if k is not None:
            out.keys = k[:, 1:].reshape(B, h, w, -1)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens (B, h, w, D), CLS (B, D)).

        Args:
            x: (B, in_chans, H, W) input.
        """
        out = self.forward_features(x)
        return out.patches, out.cls


def init_vit_weights(m: nn.Module) -> None:
    """DINO's (and ATST's) ViT initialisation of one module, for ``module.apply``: truncated-normal (std 0.02)
    Linear weights, zero biases, unit LayerNorm weights and zero LayerNorm biases.

    Args:
        m: a module of the network.
    """
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def vit(size: str = "small", patch: int | tuple[int, int] = 16, **kwargs: object) -> ViT:
    """A ViT of a named size.

    Args:
        size: one of ``SIZES`` ("tiny" for CPU tests, "small" = ViT-S, "base" = ViT-B).
        patch: patch size, int or (ph, pw).
        **kwargs: other ``ViT`` arguments (in_chans, img_size, drop_path_rate; embed_dim, depth,
            num_heads or mlp_ratio override the named size).
    """
    if size not in SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(SIZES)}")
    dim, depth, heads, ratio = SIZES[size]
    args: dict = {"embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_ratio": ratio}
    args.update(kwargs)
    return ViT(patch=patch, **args)


def clean_state_dict(sd: dict) -> dict[str, torch.Tensor]:
    """Backbone weights out of a DINO-style checkpoint.

    Accepts the public backbone files (a bare state dict), DINO training checkpoints
    (``{"teacher": ..., "student": ...}`` with ``module.`` / ``backbone.`` prefixes; the teacher is
    taken) and this project's trainer checkpoints (``{"model": ...}`` or ``{"teacher": ...}``).
    Head weights (``head.*``) are dropped.

    Args:
        sd: the object ``torch.load`` returned.
    """
    for key in ("teacher", "model", "state_dict"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    # a trainer's method state dict holds student and teacher: take the teacher's backbone
    for prefix in ("teacher.backbone.", "teacher."):
        if any(k.startswith(prefix + "patch_embed.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = re.sub(r"^(module\.)?(backbone\.)?", "", k)
        if k.startswith("head.") or k.startswith("dino_head."):
            continue
        out[k] = v
    return out


def vit_config(
    sd: dict[str, torch.Tensor], num_heads: int | None = None, img_size: int | tuple[int, int] | None = None
) -> dict:
    """The ``ViT`` arguments matching a state dict, read from its tensor shapes (no model is built).

    Patch size, channels, width, depth and MLP ratio are read from the shapes. The number of heads
    is not in the shapes: by DINO/DeiT convention it is ``embed_dim // 64`` (ViT-S: 6, ViT-B: 12).
    The stored position grid is taken as square unless ``img_size`` says otherwise.

    Args:
        sd: backbone state dict (see ``clean_state_dict``).
        num_heads: attention heads; default from ``SIZES``, else ``embed_dim // 64`` (at least 1).
        img_size: input size the position table was stored for; default square.
    """
    w = sd["patch_embed.proj.weight"]
    dim, in_chans, ph, pw = w.shape
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    n = sd["pos_embed"].shape[1] - 1
    if img_size is None:
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"position table of {n} tokens is not square; pass img_size")
        img_size = (g * ph, g * pw)
    # a named size with this width and depth decides the heads (tiny: 96 wide, 3 heads), else dim // 64
    named = [h for d, n, h, _ in SIZES.values() if d == dim and n == depth]
    heads = num_heads or (named[0] if named else max(dim // 64, 1))
    return {"patch": (ph, pw), "in_chans": in_chans, "embed_dim": dim, "depth": depth, "num_heads": heads,
            "mlp_ratio": ratio, "img_size": img_size}


def vit_from_state_dict(
    sd: dict[str, torch.Tensor], num_heads: int | None = None, img_size: int | tuple[int, int] | None = None
) -> ViT:
    """Build a ViT whose architecture matches a state dict (:func:`vit_config`) and load it strictly.

    Args:
        sd: backbone state dict (see ``clean_state_dict``).
        num_heads: attention heads; default from ``SIZES``, else ``embed_dim // 64`` (at least 1).
        img_size: input size the position table was stored for; default square.
    """
    model = ViT(**vit_config(sd, num_heads=num_heads, img_size=img_size))
    model.load_state_dict(sd, strict=True)
    return model


def read_vit_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone state dict of a local checkpoint file (DINO's public backbones, DINO training
    checkpoints, or this project's uniseg trainer checkpoint), memory-mapped on the CPU.

    Args:
        path: the ``.pth`` file; read with ``weights_only=True`` (never executes code).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: (a ValueError) not a readable torch checkpoint (empty, truncated, text, a foreign zip),
            or distillkit's own (a uniseg checkpoint) with contents that differ from its digest
            (``checkpoint_file.load_weights``; DINO's files carry no digest and load as they are).
        ValueError: no ViT backbone in it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    # DINO's training checkpoints also hold its argparse Namespace ("args"): allow that one class
    obj = load_weights(path, map_location="cpu", mmap=True, safe_globals=[argparse.Namespace])
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: checkpoint is a {type(obj).__name__}, expected a state dict")
    sd = clean_state_dict(obj)
    if "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{path}: no ViT backbone weights (patch_embed.proj.weight missing)")
    return sd


def load_vit(path: str | Path, num_heads: int | None = None) -> ViT:
    """A ViT from a local checkpoint file (:func:`read_vit_state_dict`), in eval mode.

    Args:
        path: the ``.pth`` file; read with ``weights_only=True`` (never executes code).
        num_heads: attention heads, if not ``embed_dim // 64``.
    """
    return vit_from_state_dict(read_vit_state_dict(path), num_heads=num_heads).eval()
