"""SLidR pipeline benchmark on nuScenes-sized synthetic data (not a test).

    .venv/bin/python bench/bench_slidr.py [--data bench/out/nuscenes-medium] [--keyframes 6]

Every figure is reported beside the reference it replaces, run in the same process:
projection against nuscenes-devkit's ``map_pointcloud_to_image`` (six calls per keyframe),
SLIC against skimage's own ``slic`` on the decoded image, the build against reading the
raw input files, and reading shards back against ``cat`` of the shards.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distillkit.pipelines.catalog import load_manifest  # noqa: E402
from distillkit.pipelines.runner import build  # noqa: E402
from distillkit.pipelines.shards import iter_samples, load_index  # noqa: E402
from distillkit.preprocess.projection import project_points  # noqa: E402
from distillkit.preprocess.superpixels import slic_superpixels  # noqa: E402
from distillkit.sensors.images import decode_rgb  # noqa: E402
from distillkit.sensors.nuscenes_reader import load_nuscenes, plan_keyframes, read_lidar_bin  # noqa: E402


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "out" / "nuscenes-medium")
    ap.add_argument("--keyframes", type=int, default=6, help="keyframes timed for projection and SLIC")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "bench_slidr.json")
    args = ap.parse_args()
    if not (args.data / "v1.0-mini").is_dir():
        from distillkit.sensors.synth.nuscenes import make_nuscenes

        make_nuscenes(args.data, seed=0, size="medium")
    from nuscenes.nuscenes import NuScenesExplorer

    nusc = load_nuscenes(args.data, "v1.0-mini")
    refs, _ = plan_keyframes(nusc)
    explorer = NuScenesExplorer(nusc)
    kfs = refs[: args.keyframes]
    res: dict[str, float] = {"points_per_keyframe": float(np.mean([len(read_lidar_bin(k.lidar_path)) for k in kfs]))}

    # --- projection: ours (load once, six cameras in one call) vs the devkit (six calls)
    def ours():
        for kf in kfs:
            pts = read_lidar_bin(kf.lidar_path)
            project_points(pts, np.array([c.T_cam_lidar for c in kf.cameras]), np.array([c.K for c in kf.cameras]),
                           np.array([[c.width, c.height] for c in kf.cameras]))

    def devkit():
        with contextlib.redirect_stdout(io.StringIO()):
            for kf in kfs:
                for c in kf.cameras:
                    explorer.map_pointcloud_to_image(kf.lidar_token, c.sample_data_token)

    res["projection_ours_ms"] = 1e3 * best_of(ours) / len(kfs)
    res["projection_devkit_ms"] = 1e3 * best_of(devkit) / len(kfs)

    # --- SLIC per image: skimage reference (what the stage runs) and decode cost beside it
    images = [decode_rgb(Path(c.path).read_bytes()) for c in kfs[0].cameras[:3]]
    res["jpeg_decode_ms"] = 1e3 * best_of(lambda: [decode_rgb(Path(c.path).read_bytes())
                                                    for c in kfs[0].cameras[:3]]) / 3
    from skimage.segmentation import slic

    res["slic_skimage_ms"] = 1e3 * best_of(lambda: [slic(im, n_segments=150, compactness=6, sigma=3,
                                                         start_label=0) for im in images], 1) / len(images)
    res["slic_stage_ms"] = 1e3 * best_of(lambda: [slic_superpixels(im) for im in images], 1) / len(images)

    # --- the one-off script a build replaces: serial, per keyframe, devkit + skimage
    def serial_script():
        from PIL import Image

        with contextlib.redirect_stdout(io.StringIO()):
            for kf in kfs[:2]:
                for c in kf.cameras:
                    explorer.map_pointcloud_to_image(kf.lidar_token, c.sample_data_token)
                    slic(np.asarray(Image.open(c.path)), n_segments=150, compactness=6, sigma=3, start_label=0)

    res["serial_script_keyframes_per_s"] = 2 / best_of(serial_script, 1)
    raw_files = [Path(r.lidar_path) for r in refs] + [Path(c.path) for r in refs for c in r.cameras]
    res["read_raw_s"] = best_of(lambda: [p.read_bytes() for p in raw_files])
    manifest = ROOT / "manifests" / "demo-slidr.toml"
    for workers in (1, 2):
        out = ROOT / "bench" / "out" / f"shards-w{workers}"
        for p in out.glob("*"):
            p.unlink()
        m = load_manifest(manifest, [f"source.dataroot={args.data}", f"output.dir={out}",
                                     "output.samples_per_shard=2"])
        t = time.perf_counter()
        build(m, workers=workers, progress=False)
        res[f"build_w{workers}_s"] = time.perf_counter() - t
        res[f"build_w{workers}_keyframes_per_s"] = len(refs) / res[f"build_w{workers}_s"]
    res["keyframes"] = len(refs)

    # --- reading shards back (stdlib tar grouping) against `cat` of the shards
    out = ROOT / "bench" / "out" / "shards-w2"
    tars = [str(out / s["file"]) for s in load_index(out)["shards"]]
    res["cat_shards_s"] = best_of(lambda: subprocess.run(["cat", *tars], stdout=subprocess.DEVNULL, check=True))
    res["read_shards_s"] = best_of(lambda: [sum(1 for _ in iter_samples(Path(t))) for t in tars])
    res["shard_mb"] = sum(Path(t).stat().st_size for t in tars) / 1e6

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print("| figure | ours | reference | ratio (reference / ours) |\n|---|---|---|---|")
    print(f"| projection, 6 cameras per keyframe ({res['points_per_keyframe']:.0f} points) | "
          f"{res['projection_ours_ms']:.1f} ms | {res['projection_devkit_ms']:.1f} ms (devkit) | "
          f"{res['projection_devkit_ms'] / res['projection_ours_ms']:.1f}x |")
    print(f"| SLIC per 1600x900 image | {res['slic_stage_ms']:.0f} ms | {res['slic_skimage_ms']:.0f} ms "
          f"(skimage) | {res['slic_skimage_ms'] / res['slic_stage_ms']:.2f}x |")
    serial = res["serial_script_keyframes_per_s"]
    for w in (1, 2):
        ours = res[f"build_w{w}_keyframes_per_s"]
        print(f"| build, {w} worker(s), {len(refs)} keyframes | {ours:.3f} keyframes/s | {serial:.3f} keyframes/s "
              f"(serial devkit + skimage script) | {ours / serial:.2f}x (ours / reference) |")
    print(f"| read shards back ({res['shard_mb']:.0f} MB) | {res['read_shards_s'] * 1e3:.1f} ms | "
          f"{res['cat_shards_s'] * 1e3:.1f} ms (cat) | {res['cat_shards_s'] / res['read_shards_s']:.2f}x |")
    print(f"| read shards back | {res['read_shards_s'] * 1e3:.1f} ms | {res['read_raw_s'] * 1e3:.1f} ms "
          f"(reading the raw .pcd.bin + JPEG files) | {res['read_raw_s'] / res['read_shards_s']:.2f}x |")
    print(f"JPEG decode per image: {res['jpeg_decode_ms']:.1f} ms")


if __name__ == "__main__":
    main()
