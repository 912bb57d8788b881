"""COMODO pipeline benchmark on synthetic Ego4D-style recordings (not a test).

    .venv/bin/python bench/bench_comodo.py [--data bench/out/ego-medium] [--steps 40]

Figures, each beside its reference run in the same process on the same recordings:

- windows/s of ``distillkit build`` (COMODO's defaults: 5 s windows at 200 Hz, 8 frames at 224 px, no teacher)
  with a LocalCluster of 1 and 2 workers, against a serial script that does what COMODO's published
  preparation does: decode the *whole* video and keep frames at 10 fps (``extract_video.py`` runs ffmpeg at
  10 fps), centre-crop and resize every kept frame to 224, resample the whole IMU recording to 200 Hz, and pair
  IMU window i with video seconds [5i, 5i + 5) by index;
- the same in-process with ``stages.offset.mode = "zero"`` (no offset estimation, no cluster start-up): the
  per-window cost of decoding by presentation time against the whole-video decode;
- the trainer's samples/s and data-wait fraction on the CPU (small student, stored teacher embeddings).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distillkit.pipelines.catalog import load_manifest  # noqa: E402
from distillkit.pipelines.comodo import square_crop  # noqa: E402
from distillkit.pipelines.runner import build  # noqa: E402
from distillkit.sensors.imu import read_imu_csv  # noqa: E402
from distillkit.sensors.synth.ego import make_ego  # noqa: E402


def published_style(root: Path) -> int:
    """COMODO's preparation as released, in one process: returns the number of (IMU, clip) pairs."""
    import av
    import cv2

    pairs = 0
    for video in sorted((root / "full_scale").glob("*.mp4")):
        frames, next_t = [], 0.0
        with av.open(str(video)) as c:
            for frame in c.decode(c.streams.video[0]):
                if frame.time is None or frame.time + 1e-6 < next_t:
                    continue
                next_t += 0.1  # 10 fps, as ffmpeg -r 10 keeps one frame per 100 ms
                img = frame.to_ndarray(format="rgb24")
                frames.append(square_crop(img, 224))
        rec = read_imu_csv(root / "imu" / f"{video.stem}.csv")
        grid = np.arange(rec.t_ms[0], rec.t_ms[-1], 5.0)
        imu = np.stack([np.interp(grid, rec.t_ms, rec.x[c]) for c in range(6)]).astype(np.float32)
        n_imu = imu.shape[1] // 1000
        n_clip = len(frames) // 50
        for i in range(min(n_imu, n_clip)):  # by index: no clock offset, no timestamps
            clip = np.stack(frames[50 * i:50 * i + 50])[np.linspace(0, 49, 8).astype(int)]
            for img in clip:
                cv2.imencode(".jpg", img[..., ::-1])
            pairs += 1
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "out" / "ego-medium")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if not (args.data / "synth_truth.json").is_file():
        make_ego(args.data, seed=0, size="medium")
    figures: dict[str, float] = {}
    t = time.perf_counter()
    n_ref = published_style(args.data)
    figures["published_windows_per_s"] = n_ref / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            out = Path(tmp) / f"w{workers}"
            m = load_manifest("comodo-ego4d", [f"source.root={args.data}", f"output.dir={out}",
                                               f"cluster.workers={workers}"])
            t = time.perf_counter()
            result = build(m, progress=False)
            figures[f"build_{workers}w_windows_per_s"] = result.written / (time.perf_counter() - t)
            figures["windows"] = result.written
        # In-process, no clock-offset work (the published script has none): the per-window cost alone.
        out = Path(tmp) / "serial-zero"
        m = load_manifest("comodo-ego4d", [f"source.root={args.data}", f"output.dir={out}",
                                           "cluster.scheduler=serial", "stages.offset.mode=zero"])
        t = time.perf_counter()
        result = build(m, progress=False)
        figures["build_serial_no_offset_windows_per_s"] = result.written / (time.perf_counter() - t)
        teacher = Path(tmp) / "teacher"
        m = load_manifest("comodo-ego4d", [f"source.root={args.data}", f"output.dir={teacher}",
                                           "stages.teacher.enabled=true", "stages.teacher.arch=conv3d",
                                           "cluster.workers=2"])
        build(m, progress=False)
        from distillkit.train.registry import TRAINERS

        trainer = TRAINERS.get("comodo")
        cfg = trainer.resolve_config({"max_steps": args.steps, "batch_size": 32, "log_every": args.steps})
        metrics = trainer.train(teacher, None, cfg)
        figures["train_samples_per_s"] = metrics["samples_per_s"]
        figures["train_data_wait"] = metrics["data_wait_fraction"]
    figures["published_pairs"] = n_ref
    for k, v in figures.items():
        print(f"{k:32s} {v:10.3f}")
    for name in ("build_1w", "build_2w", "build_serial_no_offset"):
        ratio = figures[f"{name}_windows_per_s"] / figures["published_windows_per_s"]
        print(f"{name} / published script: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
