"""Deferred JPEG decoding (the GPU-feeding path) trains exactly what the loader-decode path trains."""

from __future__ import annotations

import torch

from distillkit.train.image_decode import decode_crops
from distillkit.train.slidr import SIZES, build_method, make_stream
from distillkit.train.slidr_aug import slidr_collate


def _batch(shards, deferred: bool):
    stream = make_stream(shards, "small", seed=3, strict=True, decode_on_device=deferred)
    it = iter(stream)
    return slidr_collate([next(it), next(it)])


def test_device_decode_equals_loader_decode(slidr_shards):
    eager, deferred = _batch(slidr_shards, False), _batch(slidr_shards, True)
    assert "images" not in deferred and len(deferred["jpegs"]) == 12
    assert all(isinstance(j, bytes) and j[:2] == b"\xff\xd8" for j in deferred["jpegs"])
    for k in ("coords", "feats", "pairing_points", "pairing_images", "superpixels"):
        assert torch.equal(eager[k], deferred[k]), k
    crops = decode_crops(deferred["jpegs"], deferred["boxes"], deferred["flips"], SIZES["small"].crop, "cpu")
    assert torch.equal(crops, eager["images"])
    assert deferred["flips"].any() and not deferred["flips"].all()  # both branches exercised
    torch.manual_seed(0)
    a = build_method("small", 0).loss(eager)
    b = build_method("small", 0).loss(deferred)
    assert torch.equal(a, b)
