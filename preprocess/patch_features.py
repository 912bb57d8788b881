"""Patch features of RGB images: the input of UniAP and TokenCut.

Every backbone maps images to an (h, w, C) grid of patch features, one row-major cell per ``patch`` x
``patch`` pixels of the resized image (``grid_for``: the longer side scaled to ``max_side`` pixels, each
side rounded to whole patches, so the grid covers the whole image with at most half a patch of aspect
change). Three backbones:

- ``"vit"``: a frozen ViT (``preprocess.vit``) from a local checkpoint file: DINO's public backbones
  (``dino_vits8``, ``dino_vits16``, ``dino_vitb8``, ...), DINO training checkpoints, or this project's
  ``distillkit train uniseg`` checkpoint (its EMA teacher). Input normalised with ImageNet mean/std;
  features are the last block's attention keys (``feature="key"``, heads concatenated, TokenCut's and the
  released code's option) or its output tokens after the final LayerNorm (``"feat"``); CLS dropped.
  Nothing is downloaded: without a checkpoint file there is no ViT backbone.
- ``"stats"``: weight-free, for running without any checkpoint (tests, the demo). Per patch: mean and
  standard deviation of CIELAB colour, the gradient structure tensor (mean gx², gy², gx·gy of the L
  channel) and the mean absolute Laplacian, each divided by a fixed scale (``STATS_SCALES``); then
  random Fourier features of a Gaussian kernel (``rff_dim`` = 256 cosines, fixed seed 0, bandwidth 1
  in scaled units), so that the cosine of two patch features approximates
  ``exp(-||d_i - d_j||^2 / 2)`` and the cosine of *summed* features (UniAP's rule) compares the
  regions' descriptor distributions (a kernel mean embedding). Same-coloured, same-textured patches
  score near 1, different ones near 0: UniAP's thresholds then mean what they mean on DINO features.
- a trainer checkpoint is read by ``"vit"`` as above.

Shapes and units: images (H, W, 3) uint8 RGB; features float32 (h, w, C).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# descriptor scales: L a b means, L a b stds, structure tensor (gx², gy², gx·gy, as square roots), |Laplacian|.
# Chosen on `synth images` (bench/bench_uniseg.py): best-level instance mIoU 0.52 at 128 px (0.38 at 1/2.5 of these).
STATS_SCALES = np.array([22.5, 22.5, 22.5, 15.0, 15.0, 15.0, 15.0, 15.0, 15.0, 15.0], np.float32)


def grid_for(height: int, width: int, patch: int, max_side: int) -> tuple[int, int]:
    """Token grid (h, w) for an image: the longer side scaled to ``max_side`` px, rounded to patches.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        patch: patch size in pixels.
        max_side: target length of the longer side in pixels (up- or down-scaling).
    """
    scale = max_side / max(height, width)
    return max(1, int(round(height * scale / patch))), max(1, int(round(width * scale / patch)))


def resize_to_grid(rgb: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h * patch, w * patch, 3) uint8 (area filter when shrinking, else bilinear).

    Args:
        rgb: the image.
        grid: (h, w) token grid.
        patch: patch size in pixels.
    """
    th, tw = grid[0] * patch, grid[1] * patch
    shrink = th < rgb.shape[0] or tw < rgb.shape[1]
    return cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _patch_mean(x: np.ndarray, patch: int) -> np.ndarray:
    """(h*p, w*p, C) -> (h, w, C) means over non-overlapping patches."""
    H, W, C = x.shape
    return x.reshape(H // patch, patch, W // patch, patch, C).mean(axis=(1, 3))


def patch_descriptors(rgb: np.ndarray, patch: int) -> np.ndarray:
    """The stats backbone's per-patch descriptor, scaled: (h, w, 10) float32.

    Args:
        rgb: (h * patch, w * patch, 3) uint8, already resized to the grid.
        patch: patch size in pixels.
    """
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)  # L 0..100, a b about -100..100
    mean = _patch_mean(lab, patch)
    std = np.sqrt(np.maximum(_patch_mean(lab**2, patch) - mean**2, 0.0))
    L = lab[..., 0]
    gx = cv2.Sobel(L, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(L, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    st = _patch_mean(np.stack([gx * gx, gy * gy, gx * gy], -1), patch)
    st = np.sign(st) * np.sqrt(np.abs(st))
    lap = _patch_mean(np.abs(cv2.Laplacian(L, cv2.CV_32F, ksize=1))[..., None], patch)
    d = np.concatenate([mean, std, st, lap], axis=-1)
    return (d / STATS_SCALES).astype(np.float32)


def random_fourier(d: np.ndarray, dim: int = 256, seed: int = 0, bandwidth: float = 1.0) -> np.ndarray:
    """Random Fourier features of a Gaussian kernel: ``sqrt(2/dim) cos(d W / bandwidth + b)``.

    Args:
        d: (..., k) descriptors.
        dim: number of features.
        seed: seed of W ~ N(0, I) and b ~ U(0, 2 pi) (fixed: features are comparable across images).
        bandwidth: kernel bandwidth in descriptor units.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d.shape[-1], dim)).astype(np.float32)
    b = rng.uniform(0, 2 * np.pi, dim).astype(np.float32)
    return (np.sqrt(2.0 / dim) * np.cos(d @ w / bandwidth + b)).astype(np.float32)


@dataclass
class StatsBackbone:
    """The weight-free backbone (module docstring).

    Attributes:
        patch: patch size in pixels.
        rff_dim: output channels.
    """

    patch: int = 8
    rff_dim: int = 256
    name: str = "stats"

    def describe(self) -> dict:
        """What ``uniap.json`` records about the backbone."""
        return {"kind": "stats", "patch": self.patch, "channels": self.rff_dim, "rff_seed": 0,
                "scales": STATS_SCALES.tolist()}

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Features of images already resized to whole patches.

        Args:
            images: (h_i * patch, w_i * patch, 3) uint8 RGB.
        """
        return [random_fourier(patch_descriptors(im, self.patch), self.rff_dim) for im in images]


class ViTBackbone:
    """A frozen ViT from a local checkpoint (module docstring).

    Construction reads only the checkpoint's shapes (patch size, width, depth, heads), so a process
    that needs the backbone's description but never runs it (a CPU worker whose torch stages go to
    a GPU worker) does not build the model; the first call builds it on ``device``.

    Args:
        checkpoint: the checkpoint file.
        feature: "key" (last block's keys) or "feat" (last block's output tokens).
        device: torch device.

    Raises:
        FileNotFoundError, ValueError: the checkpoint is missing, unreadable, holds no ViT, or has
            non-square patches (at construction, not at the first call).
    """

    def __init__(self, checkpoint: str | Path, feature: str = "key", device: str = "cpu") -> None:
        import torch

        from distillkit.preprocess.vit import read_vit_state_dict, vit_config

        if feature not in ("key", "feat"):
            raise ValueError(f"feature must be 'key' or 'feat', got {feature!r}")
        self.checkpoint = str(checkpoint)
        self.config = vit_config(read_vit_state_dict(checkpoint))
        self.feature = feature
        self.device = torch.device(device)
        ph, pw = self.config["patch"]
        if ph != pw:
            raise ValueError(f"{checkpoint}: patch {ph}x{pw} is not square; image backbones need square patches")
        self.patch = ph
        self.name = "vit"
        self._model: Any = None

    @property
    def model(self) -> Any:
        """The frozen ``ViT`` on ``device``, built at first use."""
        if self._model is None:
            from distillkit.preprocess.vit import load_vit

            model = load_vit(self.checkpoint, num_heads=self.config["num_heads"]).to(self.device)
            self._model = model.requires_grad_(False)
        return self._model

    def describe(self) -> dict:
        """What ``uniap.json`` records about the backbone."""
        c = self.config
        return {"kind": "vit", "patch": self.patch, "channels": c["embed_dim"], "depth": c["depth"],
                "heads": c["num_heads"], "feature": self.feature, "checkpoint": Path(self.checkpoint).name}

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Features of images already resized to whole patches; images of equal size run as one batch.

        Args:
            images: (h_i * patch, w_i * patch, 3) uint8 RGB.
        """
        import torch

        out: list[np.ndarray | None] = [None] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(im.shape, []).append(i)
        for idx in by_shape.values():
            x = np.stack([(images[i].astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD for i in idx])
            t = torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device)
            with torch.inference_mode():
                res = self.model.forward_features(t, keys=self.feature == "key")
            f = res.keys if self.feature == "key" else res.patches
            f = f.float().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = f[j]
        return out  # type: ignore[return-value]


def make_backbone(kind: str = "stats", checkpoint: str | Path | None = None, patch: int = 8,
                  feature: str = "key", device: str = "cpu") -> StatsBackbone | ViTBackbone:
    """A backbone by name.

    Args:
        kind: "stats" (weight-free) or "vit" (needs ``checkpoint``).
        checkpoint: local checkpoint file of the ViT.
        patch: patch size of the stats backbone (a ViT's comes from its checkpoint).
        feature: the ViT's "key" or "feat".
        device: torch device of the ViT.
    """
    if kind == "stats":
        return StatsBackbone(patch=patch)
    if kind == "vit":
        if not checkpoint:
            raise ValueError("backbone 'vit' needs a checkpoint file (nothing is downloaded)")
        return ViTBackbone(checkpoint, feature=feature, device=device)
    raise ValueError(f"unknown backbone {kind!r} (stats | vit)")
