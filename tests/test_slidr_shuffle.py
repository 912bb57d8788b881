"""Batches mix the whole dataset: the slidr plan is a seeded permutation of every keyframe, and the
training stream's shuffle buffer varies batches from epoch to epoch (docs/decisions.md, "SLidR
splits and shuffling")."""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from distillkit.pipelines.base import SampleRef
from distillkit.pipelines.slidr import SlidrPipeline, shuffle_refs
from distillkit.train.slidr import make_stream
from distillkit.train.streaming import make_loader
from tests.index_helpers import write_index

from .conftest import slidr_manifest

BATCH = 4  # SLidR's batch size (reference/slidr.md §3)


# ---- the plan ----------------------------------------------------------------------------------
def _plan(dataroot: Path, tmp: Path, *extra: str) -> list[SampleRef]:
    return SlidrPipeline().plan(slidr_manifest(dataroot, tmp / "out", *extra))[0]


def test_plan_is_a_seeded_permutation_of_every_keyframe(synth_nuscenes, tmp_path):
    ordered = _plan(synth_nuscenes, tmp_path, "output.shuffle=false")
    scenes = [r.payload["scene"] for r in ordered]
    assert scenes == sorted(scenes)  # unshuffled: scene order, then time
    times = [r.payload["timestamp"] for r in ordered]
    assert all(a < b for a, b, s, t in zip(times, times[1:], scenes, scenes[1:], strict=False) if s == t)
    shuffled = _plan(synth_nuscenes, tmp_path)  # the default: output.shuffle = true, seed 0
    assert shuffled == shuffle_refs(ordered, 0) == _plan(synth_nuscenes, tmp_path)
    assert sorted(r.key for r in shuffled) == sorted(r.key for r in ordered) and shuffled != ordered
    runs = sum(1 for a, b in zip(shuffled, shuffled[1:], strict=False) if a.payload["scene"] != b.payload["scene"])
    assert runs > len(set(scenes)), "scenes still come in blocks"
    assert _plan(synth_nuscenes, tmp_path, "output.shuffle_seed=1") != shuffled


def test_permutation_depends_only_on_seed_and_key():
    refs = [SampleRef(f"k{i:04d}", f"s/{i}") for i in range(200)]
    full = shuffle_refs(refs, 7)
    subset = shuffle_refs(refs[::3], 7)  # fewer scenes selected: the rest keep their relative order
    kept = {r.key for r in refs[::3]}
    assert subset == [r for r in full if r.key in kept]
    assert shuffle_refs(list(reversed(refs)), 7) == full


# ---- batches -----------------------------------------------------------------------------------
def _dataset(out: Path, sizes: list[int], shuffle: bool, per_shard: int = 128) -> Path:
    """Shards of a nuScenes-like dataset (scenes of ~40 keyframes, key = token), cut from the plan
    order as the runner cuts it; each sample holds only its ``meta.json``."""
    refs = [SampleRef(hashlib.md5(f"{s}/{i}".encode()).hexdigest(), f"scene-{s:04d}/{i}", {"scene": f"scene-{s:04d}"})
            for s, n in enumerate(sizes) for i in range(n)]
    if shuffle:
        refs = shuffle_refs(refs, 0)
    out.mkdir(parents=True)
    shards = []
    for first in range(0, len(refs), per_shard):
        name = f"t-{first // per_shard:06d}.tar"
        with wds.TarWriter(str(out / name)) as tw:
            for r in refs[first:first + per_shard]:
                tw.write({"__key__": r.key, "meta.json": json.dumps({"scene": r.payload["scene"]}).encode()})
        shards.append({"file": name, "samples": len(refs[first:first + per_shard])})
    write_index(out, "slidr")
    return out


def _batches(shards: Path, epochs: int, **stream_kw) -> list[list[tuple[str, str]]]:
    """(key, scene) of each batch of the SLidR training stream, 2 loader workers, ``epochs`` epochs."""
    stream = make_stream(shards, "small", seed=0, strict=True, epochs=epochs, **stream_kw)
    # The order is decided by shards, buffer and workers; the per-sample checks and augmentations
    # (which never reorder) need fields these samples do not have.
    stream.required, stream.check, stream.transform = (), None, None
    loader = make_loader(stream, BATCH, collate=_key_scene, num_workers=2, timeout=60)
    return list(loader)


def _key_scene(batch: list[dict]) -> list[tuple[str, str]]:
    return [(s["__key__"], s["meta.json"]["scene"]) for s in batch]


def _same_scene_share(batches: list[list[tuple[str, str]]]) -> float:
    pairs = [a[1] == b[1] for batch in batches for a, b in itertools.combinations(batch, 2)]
    return sum(pairs) / len(pairs)


def _pairs(batches: list[list[tuple[str, str]]]) -> set[frozenset[str]]:
    return {frozenset((a[0], b[0])) for batch in batches for a, b in itertools.combinations(batch, 2)}


SIZES = [int(n) for n in np.random.default_rng(0).integers(38, 42, 30)]  # 30 scenes, 1192 keyframes
N = sum(SIZES)
GLOBAL_SHARE = sum(n * (n - 1) for n in SIZES) / (N * (N - 1))  # a pair drawn without replacement


@functools.cache
def _global_share_sd(trials: int = 2000) -> float:
    """Standard deviation of one epoch's same-scene share when every epoch is a global shuffle
    (batches of 4 over a fresh permutation), by simulation: ~0.0041 here."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(len(SIZES)), SIZES)
    shares = []
    for _ in range(trials):
        b = rng.permutation(labels)[: N // BATCH * BATCH].reshape(-1, BATCH)
        shares.append(np.mean([b[:, i] == b[:, j] for i, j in itertools.combinations(range(BATCH), 2)]))
    return float(np.std(shares))


DEFAULT_BUFFER = inspect.signature(make_stream).parameters["shuffle_buffer"].default


@pytest.mark.parametrize("shuffle,buffer,mixed", [
    (True, DEFAULT_BUFFER, True),  # this build and trainer
    (False, 16, False),  # before: shards of 128 keyframes in scene and time order, buffer 16
    (False, DEFAULT_BUFFER, False),  # the larger buffer alone is not enough: it spans ~6 scenes
])
def test_batches_mix_scenes_like_a_global_shuffle(tmp_path, shuffle, buffer, mixed):
    """The share of same-scene pairs inside batches, over one epoch, is within 4 standard deviations
    of a global shuffle's (its expectation sum n_s(n_s-1) / (N(N-1)) = 0.0325, sd ~0.004 for one
    epoch of 298 batches): a global shuffle itself would fail this less than once in 10^4 seeds,
    while scene-ordered shards give ~0.6 (buffer 16) or ~0.08 (buffer 256)."""
    batches = _batches(_dataset(tmp_path / "d", SIZES, shuffle), epochs=1, shuffle_buffer=buffer)
    assert sum(len(b) for b in batches) == N // BATCH * BATCH  # 2 workers of ~600 samples: drop_last loses < 8
    share, tolerance = _same_scene_share(batches), 4 * _global_share_sd()
    print(f"same-scene pair share {share:.4f}, global shuffle {GLOBAL_SHARE:.4f} +- {tolerance:.4f}")
    assert (abs(share - GLOBAL_SHARE) <= tolerance) == mixed, (share, GLOBAL_SHARE, tolerance)


@pytest.mark.parametrize("buffer,varied", [(DEFAULT_BUFFER, True), (16, False), (0, False)])
def test_batches_change_from_epoch_to_epoch(tmp_path, buffer, varied):
    """Over a global shuffle each epoch, a pair of samples that shared a batch shares one again in the
    next epoch with probability (BATCH-1)/(N-1) = 0.0025 (~4.5 of the ~1790 pairs; Poisson). The
    default buffer stays within 4x that (more than 18 recurring pairs has probability ~1e-5 under a
    global shuffle); buffer 16 repeats ~4.5% of the pairs and no buffer ~96%, since the permuted plan
    is fixed and shards are read whole."""
    batches = _batches(_dataset(tmp_path / "d", SIZES, shuffle=True), epochs=2, shuffle_buffer=buffer)
    half = len(batches) // 2
    first, second = _pairs(batches[:half]), _pairs(batches[half:])
    recurring = len(first & second) / len(first)
    print(f"buffer {buffer}: {recurring:.4f} of the pairs recur (global shuffle {(BATCH - 1) / (N - 1):.4f})")
    assert (recurring <= 4 * (BATCH - 1) / (N - 1)) == varied, recurring
