"""UniAP pseudo-mask quality and speed on synthetic images (not a test).

    .venv/bin/python bench/bench_uniseg.py [--size small|medium] [--max-side 128] [--checkpoint DINO.pth]

Writes ``distillkit synth images`` (seed 0) to a temporary folder, then per image: the patch features of the
stats backbone (or of a ViT checkpoint), UniAP on them, and TokenCut on the same features.

Quality: best-match mIoU (``train.uniseg_eval.best_match_iou``): for every ground-truth instance (objects
only) and every semantic class present (objects only), the best IoU of any region of a level, averaged;
per level and over all levels' regions together ("any level", UniAP's multi-granular output). The
"oracle" row is the ceiling of the patch grid: each token labelled with the instance covering most of it.
TokenCut gives one mask per image: its IoU with the union of the objects is reported.

Speed, every figure against the scipy path in the same process: UniAP's scipy path (the reference), the
torch path one image at a time and batched (CPU here; CUDA when available), TokenCut, and the feature
extraction. Best of 3 runs over the whole set, ms per image.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.suite.common import best_of  # noqa: E402
from distillkit.pipelines.uniseg import find_images  # noqa: E402
from distillkit.preprocess.patch_features import grid_for, make_backbone, resize_to_grid  # noqa: E402
from distillkit.preprocess.tokencut import tokencut  # noqa: E402
from distillkit.preprocess.uniap import UniAPConfig, uniap, uniap_batch  # noqa: E402
from distillkit.sensors.image_files import read_image_file  # noqa: E402
from distillkit.sensors.synth.images import make_images  # noqa: E402
from distillkit.train.uniseg_eval import best_match_iou  # noqa: E402


def oracle_levels(inst: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(1, h, w): each token labelled with the instance covering most of its pixels."""
    h, w = grid
    n = int(inst.max()) + 1
    votes = np.stack([cv2.resize((inst == i).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                      for i in range(n)], -1)
    return votes.argmax(-1)[None].astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="synth images size (small: 32 images, medium: 200)")
    ap.add_argument("--max-side", type=int, default=128, help="longer image side after resizing, px")
    ap.add_argument("--checkpoint", default=None, help="ViT checkpoint (DINO layout) instead of the stats backbone")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-uniseg-"))
    make_images(tmp, seed=0, size=args.size)
    backbone = make_backbone("vit" if args.checkpoint else "stats", args.checkpoint, 8, "key", args.device)
    images, inputs, gts = [], [], []
    for p in find_images(tmp / "images"):
        img = read_image_file(p)
        grid = grid_for(*img.rgb.shape[:2], backbone.patch, args.max_side)
        inputs.append(resize_to_grid(img.rgb, grid, backbone.patch))
        stem = p.name.rsplit(".", 1)[0]
        gts.append(tuple(cv2.imread(str(p.with_name(stem + s)), cv2.IMREAD_UNCHANGED)
                         for s in (".inst.png", ".sem.png")))
        images.append(p)
    n = len(images)
    feats = backbone(inputs)
    cfg = UniAPConfig()
    levels = [uniap(f) for f in feats]
    sem_levels = [uniap(f, semantic=True) for f in feats]

    inst_rows = np.concatenate([best_match_iou(lv, g[0]) for lv, g in zip(levels, gts, strict=True)], axis=1)
    sem_rows = np.concatenate([best_match_iou(lv, g[1]) for lv, g in zip(levels, gts, strict=True)], axis=1)
    sem_pool = np.concatenate([best_match_iou(lv[5:], g[1]) for lv, g in zip(sem_levels, gts, strict=True)], axis=1)
    oracle = np.concatenate([best_match_iou(oracle_levels(g[0], f.shape[:2]), g[0])[:1]
                             for f, g in zip(feats, gts, strict=True)], axis=1)
    tc_iou = []
    for f, g in zip(feats, gts, strict=True):
        m = tokencut(f).astype(np.uint8)
        up = cv2.resize(m, g[0].shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
        fg = g[0] > 0
        tc_iou.append((up & fg).sum() / max((up | fg).sum(), 1))

    grid = feats[0].shape[:2]
    print(f"{n} images ({args.size}), {backbone.describe()['kind']} features, patch {backbone.patch}, "
          f"max side {args.max_side} px (grid {grid[0]}x{grid[1]} for the first image), "
          f"{inst_rows.shape[1]} instances, {sem_rows.shape[1]} (image, class) segments")
    print("\n| UniAP level | regions / image | instance best-match mIoU | semantic best-match mIoU |")
    print("|---|---|---|---|")
    for i, name in enumerate(cfg.level_names()):
        regions = np.mean([lv[i].max() + 1 for lv in levels])
        print(f"| {name} | {regions:.1f} | {inst_rows[i].mean():.3f} | {sem_rows[i].mean():.3f} |")
    print(f"| any level | | {inst_rows[-1].mean():.3f} | {sem_rows[-1].mean():.3f} |")
    print(f"| semantic pooling, any level | | | {sem_pool[-1].mean():.3f} |")
    print(f"| oracle (majority instance per token) | | {oracle.mean():.3f} | |")
    print(f"\nTokenCut foreground IoU with the union of the objects: {np.mean(tc_iou):.3f}")

    t_scipy = best_of(lambda: [uniap(f) for f in feats]) / n
    t_torch1 = best_of(lambda: [uniap(f, backend="torch", device=args.device) for f in feats]) / n
    t_torch_b = best_of(lambda: uniap_batch(feats, cfg, device=args.device)) / n
    t_sem = best_of(lambda: [uniap(f, semantic=True) for f in feats]) / n
    t_tc = best_of(lambda: [tokencut(f) for f in feats], repeat=1) / n
    t_feat = best_of(lambda: backbone(inputs), repeat=1) / n
    print("\n| stage | ms / image | ratio (UniAP scipy / this) |\n|---|---|---|")
    for name, t in (("UniAP, scipy path (reference)", t_scipy),
                    (f"UniAP, torch path, one image ({args.device})", t_torch1),
                    (f"UniAP, torch path, {n} images batched ({args.device})", t_torch_b),
                    ("UniAP + semantic pooling, scipy", t_sem), ("TokenCut (dense eigenproblem)", t_tc),
                    (f"features ({backbone.describe()['kind']})", t_feat)):
        print(f"| {name} | {t * 1e3:.1f} | {t_scipy / t:.2f} |")
    assert all(np.array_equal(a, b) for a, b in zip(levels, uniap_batch(feats, cfg, device=args.device), strict=True))
    print("\nscipy and torch partitions identical on every image")


if __name__ == "__main__":
    main()
