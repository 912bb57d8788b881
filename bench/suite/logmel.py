"""The audio stage: decode + resample + 10 s log-mel segments, our librosa path and our batched torch path
(on ``ctx.device``, host-device copies included) against a per-file librosa script like the published loaders
(``bench/bench_audio.py``'s functions, on the same files in this process)."""

from __future__ import annotations

import time

from bench.suite.common import Context, Figure, Result

TITLE = "Log-mel stage (decode, resample to 16 kHz, 64-mel log-mel of 10 s segments; synthetic audio)"


def run(ctx: Context) -> Result:
    from bench.bench_audio import our_stage, published_loader
    from distillkit.preprocess.logmel import LogMelConfig
    from distillkit.sensors.audio import list_audio
    from distillkit.sensors.synth.audio import make_audio

    data = ctx.scratch("audio-small" if ctx.quick else "audio-medium")
    if not (data / "labels.csv").is_file():
        make_audio(data, seed=0, size="small" if ctx.quick else "medium")
    cfg = LogMelConfig()
    paths = [data / p for p in list_audio(data)][: 8 if ctx.quick else 40]
    our_stage(paths[:2], cfg, "torch")  # warm-up: imports, librosa's numba caches, torch kernels
    published_loader(paths[:2], cfg)

    def timed(fn, *args):
        t = time.perf_counter()
        n = fn(*args)
        return n, time.perf_counter() - t

    n, t_ref = timed(published_loader, paths, cfg)
    _, t_lib = timed(our_stage, paths, cfg, "librosa")
    _, t_tor = timed(our_stage, paths, cfg, "torch")
    ref = "per-file librosa.load + melspectrogram script"
    res = Result(TITLE, extra={"clips": n, "files": len(paths)})
    res.figures.append(Figure(f"ours, librosa path ({n} clips)", n / t_lib, "clips/s", ref, n / t_ref, True))
    res.figures.append(Figure(f"ours, torch path on {ctx.device}, batch 32", n / t_tor, "clips/s", ref, n / t_ref,
                              True))
    return res
