"""UniAP pseudo-masks: the torch path (one image, and a batch, on ``ctx.device``) against the scipy reference
on the same patch features of the synthetic images, plus the partitions' equality."""

from __future__ import annotations

import numpy as np

from bench.suite.common import Context, Figure, Result, best_of

TITLE = "UniAP (stats features, patch 8, longer side 128 px; synthetic images)"


def run(ctx: Context) -> Result:
    from distillkit.pipelines.uniseg import find_images
    from distillkit.preprocess.patch_features import grid_for, make_backbone, resize_to_grid
    from distillkit.preprocess.uniap import UniAPConfig, uniap, uniap_batch
    from distillkit.sensors.image_files import read_image_file
    from distillkit.sensors.synth.images import make_images

    data = ctx.scratch("images-small")
    if not (data / "images").is_dir():
        make_images(data, seed=0, size="small")
    backbone = make_backbone("stats", None, 8, "key", ctx.device)
    inputs = []
    for p in find_images(data / "images"):
        img = read_image_file(p)
        inputs.append(resize_to_grid(img.rgb, grid_for(*img.rgb.shape[:2], backbone.patch, 128), backbone.patch))
    feats = backbone(inputs)
    n = len(feats)
    cfg = UniAPConfig()
    ref_levels = [uniap(f) for f in feats]
    same = all(np.array_equal(a, b) for a, b in zip(ref_levels, uniap_batch(feats, cfg, device=ctx.device),
                                                    strict=True))
    t_ref = best_of(lambda: [uniap(f) for f in feats]) / n
    t_one = best_of(lambda: [uniap(f, backend="torch", device=ctx.device) for f in feats]) / n
    t_batch = best_of(lambda: uniap_batch(feats, cfg, device=ctx.device)) / n
    res = Result(TITLE, extra={"images": n, "partitions_identical": same})
    res.figures.append(Figure(f"torch path on {ctx.device}, one image at a time", t_one * 1e3, "ms/image",
                              "scipy path", t_ref * 1e3))
    res.figures.append(Figure(f"torch path on {ctx.device}, {n} images batched", t_batch * 1e3, "ms/image",
                              "scipy path", t_ref * 1e3))
    res.notes.append(f"scipy and torch partitions identical on all {n} images: {same}")
    return res
