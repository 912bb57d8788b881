"""A frozen DINO ViT image teacher for SLidR: patch tokens as a (B, D, H/8, W/8) feature map.

The released code offers DINO ViT-S/8 and ViT-B/8 as image encoders (valeoai/SLidR
model/image_model.py:177-182, ``images_encoder: vit_small_p8 | vit_base_p8``): it ImageNet-normalises the
image (``Preprocessing``, model/image_model.py:73), runs the ViT, keeps the final-norm patch tokens without
CLS (model/modules/dino/vision_transformer.py:207-213, model/image_model.py:222-223), then a trainable 1x1
conv and a bilinear x8 upsampling with ``align_corners=True`` (model/image_model.py:203-206). The weights
are DINO's published backbones (dino_deitsmall8_pretrain.pth, dino_vitbase8_pretrain.pth;
model/modules/dino/vision_transformer.py:312-317). This module is the frozen part; SLidR's decoder and
upsampling (``train.slidr.SLidR.image_features``: 1x1 conv, then bilinear to the crop size with
``align_corners=True``, which equals x8 when the crop is a multiple of 8) are shared with the ResNet teacher.

The ViT itself is ``distillkit.preprocess.vit.ViT`` (DINO's key layout), loaded with strict key matching.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from distillkit.preprocess.vit import ViT, read_vit_state_dict, vit, vit_from_state_dict

# teacher name -> (preprocess.vit size, patch, width): the release's vit_small_p8 / vit_base_p8
# (valeoai/SLidR model/image_model.py:179, :181)
DINO_TEACHERS: dict[str, tuple[str, int, int]] = {
    "dino_vits8": ("small", 8, 384),
    "dino_vitb8": ("base", 8, 768),
}


class ViTTeacher(nn.Module):
    """ImageNet-normalising, frozen (no grad, always eval) ViT: (B, 3, H, W) in [0, 1] ->
    (B, D, H/p, W/p) final-norm patch tokens (CLS dropped), as the release's ``DinoVitFeatureExtractor``.

    Args:
        net: the ViT.
    """

    def __init__(self, net: ViT):
        super().__init__()
        self.net = net
        self.out_channels = net.embed_dim
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> ViTTeacher:
        super().train(mode)
        self.net.eval()  # frozen, whatever the caller asks
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        ph, pw = self.net.patch
        if x.shape[-2] % ph or x.shape[-1] % pw:
            # the release asserts it too (model/image_model.py:214-215): a remainder would be cropped away
            raise ValueError(f"image {tuple(x.shape[-2:])} is not a multiple of the ViT patch {(ph, pw)}")
        patches = self.net.forward_features((x - self.mean) / self.std).patches  # (B, h, w, D)
        return patches.permute(0, 3, 1, 2).contiguous()


def build_vit_teacher(name: str, size: str, checkpoint: Path | None = None) -> ViTTeacher:
    """The DINO ViT teacher ``name`` (``DINO_TEACHERS``).

    With ``checkpoint`` (DINO's released backbone file or a DINO training checkpoint, read by
    ``preprocess.vit.read_vit_state_dict``), the architecture is read from its shapes and the weights are
    loaded with strict key matching; its patch must be 8, and at ``size="paper"`` its width must be the named
    ViT's (384 or 768). Without one: a randomly initialised ViT, at ``size="small"`` preprocess.vit's "tiny"
    (96 wide, 4 blocks, so CPU tests stay cheap), at ``"paper"`` the named ViT.

    Args:
        name: "dino_vits8" or "dino_vitb8".
        size: SLidR's size ("small" or "paper").
        checkpoint: the weights file, or None.

    Raises:
        ValueError: unknown name, or a checkpoint of another patch size or (paper) width.
    """
    if name not in DINO_TEACHERS:
        raise ValueError(f"unknown ViT teacher {name!r} ({' | '.join(DINO_TEACHERS)})")
    vit_size, patch, width = DINO_TEACHERS[name]
    if checkpoint is None:
        return ViTTeacher(vit("tiny" if size == "small" else vit_size, patch=patch))
    net = vit_from_state_dict(read_vit_state_dict(checkpoint))
    if net.patch != (patch, patch):
        raise ValueError(f"{checkpoint}: a ViT with patch {net.patch}, teacher {name} needs {patch}x{patch}")
    if size == "paper" and net.embed_dim != width:
        raise ValueError(f"{checkpoint}: a ViT {net.embed_dim} wide, teacher {name} is {width} wide")
    return ViTTeacher(net)
