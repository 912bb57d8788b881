"""Ground-truth class maps of the synthetic nuScenes cameras, for superpixel quality checks.

The generator (sensors/synth/nuscenes.py) writes images, lidar and lidarseg but no per-pixel class map, so
:func:`render_camera` re-casts a camera's rays from the scene the generator built (same seed, same scene,
same pose) and keeps the shader's class label beside its colour. The test below checks that the rendered
colours are the dataset's JPEG (up to its noise and compression), i.e. that the class map is aligned with
the image the superpixels are computed on. bench/suite/superpixels.py uses the same helper.

It reaches into the generator's private helpers (``_scene_setup``, ``_sensor_to_world``, ``_camera_rect``);
a public ``class_maps`` option of ``make_nuscenes`` would be the better home (proposed in the report).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pyquaternion import Quaternion

from distillkit.sensors.synth import nuscenes as synth
from distillkit.sensors.synth.raycast import cast
from distillkit.sensors.synth.scene import shade


def render_camera(seed: int, size: str, scene: int, keyframe: int, camera: int,
                  jpeg: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic camera image and its ground-truth class map.

    Args:
        seed: the dataset's seed (``make_nuscenes(seed=...)``).
        size: a key of ``synth.SIZES`` (sets the resolution).
        scene: scene index (0..n_scenes-1).
        keyframe: keyframe index within the scene.
        camera: index into ``synth.CAMERAS``.
        jpeg: add the generator's sensor noise (own seed) and JPEG round trip, so the image looks like a
            dataset image; otherwise the noise-free render.

    Returns:
        (H, W, 3) uint8 image and (H, W) uint8 nuScenes-lidarseg class per pixel (0 = sky).
    """
    sz = synth.SIZES[size]
    spec = synth.CAMERAS[camera]
    world, traj = synth._scene_setup(seed, scene)
    tab = world.table()
    # The generator's timing: keyframe at kf * 0.5 s, the camera fires as the sweep passes it.
    t = (keyframe * synth.KEYFRAME_US + int(round(synth.camera_offset_s(spec) * 1e6))) / 1e6
    rot = synth._quat_list(Quaternion(matrix=synth.camera_rotation(spec.yaw_deg, spec.pitch_deg)))
    r_wc, o_c = synth._sensor_to_world(traj.pose(t), list(spec.translation), rot)
    k = synth.intrinsics(spec, sz.width, sz.height)
    dirs = synth.camera_rays(k, sz.width, sz.height, r_wc)
    hits = cast(o_c, dirs, world.primitives, synth._camera_rect(k, sz.width, sz.height, r_wc, o_c))
    label, rgb, _ = shade(hits, dirs, world, tab)
    if jpeg:
        rgb = rgb + np.random.default_rng([seed, scene, keyframe, camera, 7]).normal(0.0, 2.0, rgb.shape)
    img = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if jpeg:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=92, subsampling=0, optimize=False)
        img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return img, label


def test_rendered_truth_is_aligned_with_the_dataset_images(synth_nuscenes):
    from distillkit.sensors.images import decode_rgb
    from distillkit.sensors.nuscenes_reader import load_nuscenes, plan_keyframes

    nusc = load_nuscenes(synth_nuscenes, "v1.0-mini")
    kf = plan_keyframes(nusc)[0][0]
    scene = synth.SCENE_NAMES.index(kf.scene)
    keyframe = [s["token"] for s in nusc.sample if s["scene_token"] == nusc.get("sample", kf.sample_token)[
        "scene_token"]].index(kf.sample_token)
    cam = 0
    img, label = render_camera(0, "small", scene, keyframe, cam, jpeg=False)
    disk = decode_rgb(open(kf.cameras[cam].path, "rb").read())
    diff = np.abs(img.astype(float) - disk.astype(float)).mean()
    assert diff < 4.0, diff  # noise sigma 2 + JPEG q92
    # a one-pixel shift of the render would already be far off: the alignment is what is tested
    shifted = np.abs(img[:, 1:].astype(float) - disk[:, :-1].astype(float)).mean()
    assert shifted > diff + 1.0
    assert len(np.unique(label)) >= 4  # sky, road, sidewalk/terrain, buildings at least
