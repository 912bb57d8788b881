"""Audio pipeline and trainer benchmark on synthetic audio (not a test).

    .venv/bin/python bench/bench_audio.py [--data bench/out/audio-medium] [--steps 40]

Every figure is reported beside its reference, run in the same process:

1. the spectrogram stage, clips (10 s segments) per second, decode and resampling included, single
   process: a per-file script like the published loaders (``librosa.load(path, sr=16000)`` then
   ``melspectrogram`` + ``power_to_db`` per segment; UnFuSeD / ATST's offline scripts do this) is
   the reference; against it our stage with the librosa path (``sensors.audio.read_audio``, soxr HQ,
   ``preprocess.logmel.logmel_librosa``) and with the batched torch path on the CPU;
2. the whole build (``distillkit build``: plan, decode, log-mel, shard writing, index) on a dask
   LocalCluster of 1 and of 2 workers;
3. the trainer (``small``, CPU): samples/s and the fraction of step time spent waiting for data,
   from the shared loop's own counters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distillkit.pipelines.catalog import load_manifest  # noqa: E402
from distillkit.pipelines.runner import build  # noqa: E402
from distillkit.preprocess.logmel import LogMelConfig, cut_segment, logmel, segment_bounds  # noqa: E402
from distillkit.sensors.audio import list_audio, read_audio  # noqa: E402


def published_loader(paths: list[Path], cfg: LogMelConfig) -> int:
    """The reference: one file at a time, librosa.load (decode, mono, soxr_hq) + librosa mel + dB."""
    import librosa

    n = 0
    seg = int(10.0 * cfg.sample_rate)
    for p in paths:
        y, _ = librosa.load(str(p), sr=cfg.sample_rate, mono=True)
        for start in range(0, max(len(y), 1), seg):
            chunk = np.zeros(seg, np.float32)
            part = y[start:start + seg]
            chunk[: len(part)] = part
            mel = librosa.feature.melspectrogram(y=chunk, sr=cfg.sample_rate, n_fft=cfg.n_fft,
                                                 hop_length=cfg.hop_length, win_length=cfg.win_length,
                                                 n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
            librosa.power_to_db(mel, ref=1.0, top_db=cfg.top_db)
            n += 1
    return n


def our_stage(paths: list[Path], cfg: LogMelConfig, backend: str, batch: int = 32) -> int:
    """Our stage: read_audio (soundfile + soxr HQ) -> segments -> log-mel (librosa or batched torch)."""
    seg = int(10.0 * cfg.sample_rate)
    pending, n = [], 0
    for p in paths:
        audio = read_audio(p, cfg.sample_rate)
        for start, end in segment_bounds(len(audio.samples), seg, "pad"):
            pending.append(cut_segment(audio.samples, start, end))
            if len(pending) >= (batch if backend == "torch" else 1):
                logmel(np.stack(pending), cfg, backend)
                n += len(pending)
                pending.clear()
    if pending:
        logmel(np.stack(pending), cfg, backend)
        n += len(pending)
    return n


def timed(fn, *args) -> tuple[int, float]:
    t = time.perf_counter()
    n = fn(*args)
    return n, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "out" / "audio-medium")
    ap.add_argument("--files", type=int, default=40, help="files timed in the stage comparison")
    ap.add_argument("--steps", type=int, default=40, help="trainer steps")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "bench_audio.json")
    args = ap.parse_args()
    if not (args.data / "labels.csv").is_file():
        from distillkit.sensors.synth.audio import make_audio

        make_audio(args.data, seed=0, size="medium")
    import torch

    cfg = LogMelConfig()
    paths = [args.data / p for p in list_audio(args.data)][: args.files]
    our_stage(paths[:2], cfg, "torch")  # warm-up: imports, numba caches of librosa, torch kernels
    published_loader(paths[:2], cfg)
    res: dict[str, float] = {"torch_threads": torch.get_num_threads()}
    n_ref, t_ref = timed(published_loader, paths, cfg)
    n_lib, t_lib = timed(our_stage, paths, cfg, "librosa")
    n_tor, t_tor = timed(our_stage, paths, cfg, "torch")
    assert n_ref == n_lib == n_tor, (n_ref, n_lib, n_tor)
    res.update(clips=n_ref, files=len(paths), ref_clips_per_s=n_ref / t_ref, librosa_clips_per_s=n_lib / t_lib,
               torch_clips_per_s=n_tor / t_tor)
    print(f"stage, {n_ref} clips of 10 s from {len(paths)} files, one process:")
    print(f"  published per-file librosa loader  {n_ref / t_ref:7.1f} clips/s  (1.00x)")
    print(f"  ours, librosa path                 {n_lib / t_lib:7.1f} clips/s  ({t_ref / t_lib:.2f}x)")
    print(f"  ours, torch path (CPU, batch 32)   {n_tor / t_tor:7.1f} clips/s  ({t_ref / t_tor:.2f}x)")

    out = args.json.parent / "bench-audio-shards"
    walls = {}
    for workers in (1, 2):
        shutil.rmtree(out, ignore_errors=True)
        m = load_manifest(ROOT / "manifests" / "audio-dir.toml",
                          [f"source.root={args.data}", f"output.dir={out}", f"cluster.workers={workers}",
                           "output.files_per_shard=8"])
        t = time.perf_counter()
        result = build(m, progress=False)
        walls[workers] = time.perf_counter() - t
        print(f"build, {workers} worker(s) (LocalCluster start-up included): {walls[workers]:.1f} s, "
              f"{result.written} samples from {result.planned} files")
    res.update(build_1_worker_s=walls[1], build_2_workers_s=walls[2], build_speedup=walls[1] / walls[2])
    print(f"  2 workers vs 1: {walls[1] / walls[2]:.2f}x")

    from distillkit.train.audio import AudioTrainer

    trainer = AudioTrainer()
    config = trainer.resolve_config({"max_steps": args.steps, "log_every": args.steps})
    metrics = trainer.train(out, None, config, device="cpu")
    res.update(train_samples_per_s=metrics["samples_per_s"], train_data_wait=metrics["data_wait_fraction"])
    print(f"trainer ({config['size']}, CPU, batch {metrics.get('batch_size', 'default')}, in-process loading): "
          f"{metrics['samples_per_s']:.1f} samples/s, "
          f"data wait {100 * metrics['data_wait_fraction']:.0f}% of step time")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
