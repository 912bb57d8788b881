"""What checking shards while streaming costs: the trainers' stream (``train.streaming.ShardStream``) reading one
epoch of SLidR-sized synthetic shards with every shard's sha256 checked at its end, against the same stream with
the records removed (no hashing), in the same process, alternated so that machine load hits both alike.

Two loaders: JPEGs decoded in the loader (CPU training, what the issue's "loader time" is), and JPEGs left as
bytes (decoding on the GPU, ``decode_on_device``): there the loader only reads tars, so hashing is the largest
share it can ever be. Hashing is one ``sha256.update`` per MiB read, in the reading thread, so it adds about
bytes / 2 GB/s to each; what that is next to decoding depends on the bytes per decoded pixel.

    .venv/bin/python bench/run.py --device cpu --only integrity
"""

from __future__ import annotations

import time

import numpy as np

from bench.suite.common import Context, Figure, Result, recorded_shards, synthetic_jpeg

TITLE = "Shard integrity while streaming (sha256 per shard, SLidR-sized samples)"


def _sample_maker(quick: bool):
    """Sample ``n``: six camera JPEGs at nuScenes resolution (quick: a quarter of it) and a lidar sweep of ~34k
    points, as a SLidR shard holds them."""
    h, w = (450, 800) if quick else (900, 1600)
    jpegs = [synthetic_jpeg(h, w, seed) for seed in range(6)]
    lidar = np.random.default_rng(0).normal(size=(34_000, 4)).astype(np.float32)
    from distillkit.pipelines.codecs import npy_bytes

    def make(n: int) -> dict[str, bytes]:
        return {**{f"cam{i}.jpg": jpegs[(i + n) % 6] for i in range(6)}, "lidar.npy": npy_bytes(lidar + n)}

    return make


def _epoch(folder, images: str, hashed: bool) -> tuple[float, int]:
    """(wall s, samples) of one epoch of the stream."""
    from distillkit.train.streaming import ShardStream

    stream = ShardStream(folder, epochs=1, shuffle_shards=False, images=images, strict=True)
    if not hashed:
        stream.records = {}  # the same reader, without the hashing wrapper and the check
    t = time.perf_counter()
    n = sum(1 for _ in stream)
    return time.perf_counter() - t, n


def run(ctx: Context) -> Result:
    import logging

    shards, per_shard = (2, 6) if ctx.quick else (3, 24)
    folder = recorded_shards(ctx.scratch(f"integrity-shards-{shards}x{per_shard}"), shards, per_shard,
                             _sample_maker(ctx.quick))
    mb = sum(p.stat().st_size for p in folder.glob("*.tar")) / 1e6
    logging.getLogger("distillkit.train.streaming").setLevel(logging.ERROR)  # "unchecked" warnings of the reference
    res = Result(TITLE, extra={"shards": shards, "samples_per_shard": per_shard, "mb": mb})
    for images, label in (("rgb", "JPEGs decoded in the loader"), ("raw", "JPEGs left as bytes (GPU decode)")):
        runs: dict[bool, list[float]] = {True: [], False: []}
        n = 0
        for _ in range(5 if images == "rgb" else 9):  # alternated, least of each: both see the same machine load
            for hashed in (True, False):
                t, n = _epoch(folder, images, hashed)
                runs[hashed].append(t)
        on, off = min(runs[True]), min(runs[False])
        res.figures.append(Figure(f"one epoch, {n} samples, {mb:.0f} MB, {label}, sha256 checked", on, "s",
                                  "the same stream without hashing", off, note=f"overhead {on / off - 1:+.1%}"))
        res.extra[f"overhead_{images}"] = on / off - 1
    return res
