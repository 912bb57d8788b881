"""ATST-Frame's encoder: a transformer over 40 ms frame tokens of a log-mel spectrogram (FrameAST).

As released (Audio-WestlakeU/audiossl ec3a14d, ``audiossl/methods/atstframe/audio_transformer.py``):

- one token per ``patch_w`` = 4 frames (40 ms at the 10 ms hop) spanning *all* mel bands (``patch_h`` = n_mels =
  64): train_small.sh:23-25, made by a Linear layer over the flattened 64 x 4 patch in ``(p1 p2 c)`` order
  (``PatchEmbed_v2``, :77-96; ``patch_embed="Linear"`` is the default, model.py:30);
- no CLS token; a learnt position table of ``n_tokens + 1`` rows whose rows ``1..T`` are added to ``T`` tokens
  (``pos_type="cut"``, :171-173);
- masked tokens are *replaced* by one learnt ``mask_embed`` before the position embedding (:166-168);
- pre-norm blocks (LayerNorm eps 1e-6, no qkv bias, stochastic depth rising linearly to 0.1: :101-103, :138-143,
  :284-288) and a final ``norm_frame`` LayerNorm (:144, :204).

The blocks are ``preprocess.vit.Block`` (DINO's layout, the one ATST-Clip's encoder uses), so parameter names
follow the release's state dict (``patch_embed.patch_embed``, ``mask_embed``, ``pos_embed``, ``blocks.i.norm1 /
attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm_frame``). The release's attention mask for padded
clips (``length``) is not needed: every crop here is filled with audio (``train.audio_aug.window``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distillkit.preprocess.vit import Block, init_vit_weights


class FramePatchEmbed(nn.Module):
    """Frame tokens: each ``n_mels`` x ``patch_w`` patch flattened in ``(p1 p2 c)`` order through one Linear layer
    (the release's ``PatchEmbed_v2``).

    Args:
        n_mels: mel bands (the patch height: one token covers every band).
        patch_w: frames per token.
        embed_dim: token width.
    """

    def __init__(self, n_mels: int, patch_w: int, embed_dim: int) -> None:
        super().__init__()
        self.n_mels, self.patch_w = n_mels, patch_w
        self.patch_embed = nn.Linear(n_mels * patch_w, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, n_mels, T) -> (B, T // patch_w, D); trailing frames that do not fill a token are dropped."""
        B, C, Fq, T = x.shape
        if C != 1 or Fq != self.n_mels:
            raise ValueError(f"expected input (B, 1, {self.n_mels}, T), got {tuple(x.shape)}")
        w = T // self.patch_w
        if w < 1:
            raise ValueError(f"input of {T} frames is shorter than one {self.patch_w}-frame token")
        # b c h (w p2) -> b w (h p2 c) with c = 1: the release's Rearrange('b c (h p1) (w p2) -> b (w h) (p1 p2 c)')
        patches = x[:, 0, :, : w * self.patch_w].reshape(B, Fq, w, self.patch_w).permute(0, 2, 1, 3)
        return self.patch_embed(patches.reshape(B, w, Fq * self.patch_w))


class FrameTransformer(nn.Module):
    """ATST-Frame's encoder: frame tokens -> transformer -> one normalised vector per 40 ms.

    Args:
        n_mels: mel bands of the input.
        n_tokens: length of the position table in tokens (the training crop's; longer inputs are refused).
        embed_dim: token width.
        depth: blocks.
        num_heads: attention heads.
        patch_w: frames per token (4: 40 ms at a 10 ms hop).
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: bias of the qkv projection (the release has none).
        drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
    """

    def __init__(self, n_mels: int, n_tokens: int, embed_dim: int, depth: int, num_heads: int, patch_w: int = 4,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        self.embed_dim, self.n_tokens, self.patch_w = embed_dim, n_tokens, patch_w
        self.patch_embed = FramePatchEmbed(n_mels, patch_w, embed_dim)
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # row 0 is never used ("cut" adds rows 1..T); kept so the table has the release's shape
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens + 1, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # torch.linspace(0, rate, depth)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        if not qkv_bias:
            for blk in self.blocks:
                blk.attn.qkv.bias = None  # preprocess.vit always makes one; FrameAST_small/base have none
        self.norm_frame = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.mask_embed, std=0.02)
        # FrameAST._init_weights (audio_transformer.py:151-158) is the same as DINO's ViT init
        self.apply(init_vit_weights)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Frame representations (B, T, D), T = frames // patch_w.

        Args:
            x: (B, 1, n_mels, frames) normalised log-mel.
            mask: optional (B, T) bool; True tokens are replaced by ``mask_embed`` before the position embedding
                (the student's input); None: nothing masked (the teacher's input, feature extraction).
        """
        t = self.patch_embed(x)
        B, T, D = t.shape
        if T > self.n_tokens:
            raise ValueError(f"{T} tokens exceed the position table of {self.n_tokens} (the training crop)")
        if mask is not None:
            if mask.shape != (B, T):
                raise ValueError(f"mask {tuple(mask.shape)} does not match the {B} x {T} tokens")
            m = mask.unsqueeze(-1).to(t.dtype)
            t = (1 - m) * t + m * self.mask_embed.expand(B, T, D)
        t = t + self.pos_embed[:, 1: T + 1]
        for blk in self.blocks:
            t, _ = blk(t)
        return self.norm_frame(t)
