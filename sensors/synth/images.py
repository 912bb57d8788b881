"""Synthetic images of textured objects on textured backgrounds, with instance and semantic ground truth.

:func:`make_images` writes::

    OUT/images/scene_0000.jpg          the image (JPEG, PNG, WebP, BMP or TIFF, see below)
    OUT/images/scene_0000.inst.png     instance ids, 0 = background, 1..N visible objects (8-bit, 16-bit if > 255)
    OUT/images/scene_0000.sem.png      semantic classes, 0 = background, 1..4 = CLASSES[1:]
    OUT/classes.json                   {"semantic": [names by id], "formats": {...}}

Ground truth lies beside each image as ``{stem}.inst.png`` and ``{stem}.sem.png``: the layout the uniseg
pipeline reads (``pipelines/uniseg.py``).

**Scenes.** Each image shows two or three of the four object classes, two or three instances of each, on a
background of smooth colour variation and a faint oriented grain. A class is a shape *and* a texture *and* a
hue family; each instance draws its own hue (class hue +- 0.06), saturation, value, size, rotation and
texture phase, so instances of one class differ and colour alone does not separate every class:

========  ==============  ===============================  ============
id        shape           texture                          hue family
========  ==============  ===============================  ============
1 disc    ellipse         stripes (period 3-5 px)          red
2 box     rotated square  checkerboard (cell 2-4 px)       blue
3 blob    wobbly polygon  dots on a lattice (4-6 px)       green
4 tri     triangle        fine grain (smoothed noise)      orange
========  ==============  ===============================  ============

Objects are painted back to front, so later ones occlude earlier ones (the ground truth keeps only what is
visible; an instance hidden below 12 visible pixels is dropped and ids are renumbered 1..N). The second
instance of a class is often placed touching the first (centre distance about the sum of the radii), the
others at random, so scenes hold touching, separate and partly occluded instances. A global illumination
gradient and pixel noise (sigma 2/255) finish the picture.

**Formats and sizes.** Image ``i`` is JPEG (quality 92) except: ``i % 8 == 3`` PNG, ``i % 8 == 5`` WebP
(lossless), ``i == 6`` BMP and ``i == 7`` TIFF. Sizes cycle through four shapes per size (landscape,
portrait, square, wide). "small": 32 images of 96x128 .. 80x144 px (the tests; ~0.3 s); "medium": 200 images
of 192x256 .. 176x320 px (~4 s; the demo's, so its probe tests on 100 images: docs/uniseg.md "The demo").

Everything derives from ``seed``: equal seeds give equal files.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import cv2
import numpy as np

CLASSES: tuple[str, ...] = ("background", "disc", "box", "blob", "tri")
CLASS_HUES: dict[int, float] = {1: 0.0, 2: 0.62, 3: 0.33, 4: 0.09}


@dataclass(frozen=True)
class ImageSize:
    """Dataset size: number of images and the (height, width) shapes they cycle through."""

    n_images: int
    shapes: tuple[tuple[int, int], ...]
    radius: tuple[float, float]  # object radius range, fraction of the shorter side


SIZES: dict[str, ImageSize] = {
    "small": ImageSize(32, ((96, 128), (128, 96), (112, 112), (80, 144)), (0.13, 0.22)),
    "medium": ImageSize(200, ((192, 256), (256, 192), (224, 224), (176, 320)), (0.11, 0.2)),
}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) -> RGB float (3,)."""
    hsv = np.array([[[h % 1.0 * 180.0, s * 255.0, v * 255.0]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def _smooth_noise(shape: tuple[int, int], cell: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1] with features about ``cell`` px (bicubic upsampling of a coarse grid)."""
    h, w = shape
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    coarse = rng.random((gh, gw)).astype(np.float32)
    big = cv2.resize(coarse, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    return np.clip(big[:h, :w], 0.0, 1.0)


def _texture(cls: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture in [0, 1] of class ``cls`` over pixel coordinates (object-local, rotated)."""
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    if cls == 1:  # stripes
        period = rng.uniform(3.0, 5.0)
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    if cls == 2:  # checkerboard
        cell = rng.uniform(2.0, 4.0)
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    if cls == 3:  # dots on a lattice
        step = rng.uniform(4.0, 6.0)
        du = (u % step) - step / 2
        dv = (v % step) - step / 2
        return (du**2 + dv**2 > (step * 0.3) ** 2).astype(np.float32)
    # fine grain
    n = rng.random(yy.shape).astype(np.float32)
    return cv2.GaussianBlur(n, (0, 0), 0.8) * 1.8 - 0.4


def _shape_mask(cls: int, shape: tuple[int, int], cy: float, cx: float, r: float,
                rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of one object of class ``cls`` centred at (cy, cx) with radius ~r px."""
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    rot = rng.uniform(0, 360)
    if cls == 1:
        axes = (int(round(r)), int(round(r * rng.uniform(0.65, 1.0))))
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), axes, rot, 0, 360, 1, -1)
        return mask.astype(bool)
    if cls == 2:
        n, radii = 4, np.full(4, r * 1.05)
    elif cls == 3:
        n = 24
        k = np.arange(n) * 2 * np.pi / n
        radii = r * (1 + 0.18 * np.sin(2 * k + rng.uniform(0, 6.3)) + 0.12 * np.sin(3 * k + rng.uniform(0, 6.3)))
    else:
        n, radii = 3, np.full(3, r * 1.25)
    ang = np.deg2rad(rot) + np.arange(n) * 2 * np.pi / n
    pts = np.stack([cx + radii * np.cos(ang), cy + radii * np.sin(ang)], 1)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def render_scene(shape: tuple[int, int], rng: np.random.Generator,
                 radius: tuple[float, float] = (0.13, 0.22)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 (H, W, 3), instance ids uint16 (H, W), semantic ids uint8 (H, W)).

    Args:
        shape: (height, width) in pixels.
        rng: the scene's generator.
        radius: object radius range as a fraction of the shorter side.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # background: low-saturation colour field + faint oriented grain
    bg_a = _hsv_to_rgb(rng.uniform(0.05, 0.2), rng.uniform(0.1, 0.35), rng.uniform(0.45, 0.75))
    bg_b = _hsv_to_rgb(rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.8))
    mix = _smooth_noise(shape, rng.uniform(18, 40), rng)[..., None]
    img = bg_a * mix + bg_b * (1 - mix)
    grain = np.sin(2 * np.pi * (xx * 0.7 + yy * 0.3) / rng.uniform(6, 10)) * 0.03
    img = img + grain[..., None]
    inst = np.zeros(shape, np.int32)
    sem = np.zeros(shape, np.uint8)
    short = min(h, w)
    classes = rng.choice([1, 2, 3, 4], size=int(rng.integers(2, 4)), replace=False)
    objects: list[tuple[int, float, float, float]] = []
    for c in classes:
        n = int(rng.integers(2, 4))
        for j in range(n):
            r = short * rng.uniform(*radius)
            if j == 1 and rng.random() < 0.6:  # touching its predecessor of the same class
                pc, py, px, pr = next(o for o in reversed(objects) if o[0] == c)
                a = rng.uniform(0, 2 * np.pi)
                d = (pr + r) * rng.uniform(0.85, 0.98)
                cy, cx = py + d * np.sin(a), px + d * np.cos(a)
            else:
                cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
            objects.append((int(c), float(cy), float(cx), float(r)))
    order = rng.permutation(len(objects))  # painter's order mixes classes, so occlusions vary
    for k, idx in enumerate(order, start=1):
        c, cy, cx, r = objects[idx]
        m = _shape_mask(c, shape, cy, cx, r, rng)
        if not m.any():
            continue
        colour = _hsv_to_rgb(CLASS_HUES[c] + rng.uniform(-0.06, 0.06), rng.uniform(0.45, 0.9),
                             rng.uniform(0.55, 0.95))
        dark = colour * rng.uniform(0.35, 0.6)
        t = np.clip(_texture(c, yy - cy, xx - cx, rng), 0, 1)[..., None]
        img = np.where(m[..., None], dark + (colour - dark) * t, img)
        inst[m] = k
        sem[m] = c
    # drop instances hidden below 12 pixels; renumber the rest 1..N in order of appearance
    ids, counts = np.unique(inst[inst > 0], return_counts=True)
    lut = np.zeros(int(inst.max()) + 1, np.int32)
    keep = ids[counts >= 12]
    lut[keep] = np.arange(1, len(keep) + 1)
    sem[(inst > 0) & (lut[inst] == 0)] = 0  # a sliver of a dropped instance is background in both maps
    inst = lut[inst]
    gy, gx = rng.uniform(-0.12, 0.12, size=2)
    light = 1.0 + gy * (yy / h - 0.5) + gx * (xx / w - 0.5)
    img = img * light[..., None] + rng.normal(0, 2.0 / 255, size=img.shape)
    rgb = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    return rgb, inst.astype(np.uint16), sem


def image_format(i: int) -> str:
    """File extension of image ``i`` (see the module docstring)."""
    if i == 6:
        return "bmp"
    if i == 7:
        return "tif"
    return {3: "png", 5: "webp"}.get(i % 8, "jpg")


def _write(path: pathlib.Path, rgb: np.ndarray) -> None:
    ext = path.suffix.lower()
    params = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, 92], ".webp": [cv2.IMWRITE_WEBP_QUALITY, 101]}.get(ext, [])
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"{path}: encoding failed")
    path.write_bytes(buf.tobytes())


def _write_labels(path: pathlib.Path, labels: np.ndarray) -> None:
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    ok, buf = cv2.imencode(".png", labels.astype(dtype))
    if not ok:
        raise RuntimeError(f"{path}: encoding failed")
    path.write_bytes(buf.tobytes())


def make_images(out: pathlib.Path, seed: int = 0, size: str = "small") -> pathlib.Path:
    """Write a synthetic image dataset with ground truth at ``out`` (see the module docstring).

    Args:
        out: folder to create (existing files are overwritten).
        seed: seed of every random choice; equal seeds give equal files.
        size: a key of :data:`SIZES` ("small" or "medium").

    Returns:
        ``out``.

    Raises:
        ValueError: unknown size.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (choose from {sorted(SIZES)})")
    out = pathlib.Path(out)
    sz = SIZES[size]
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(sz.n_images):
        rng = np.random.default_rng([seed, i])
        rgb, inst, sem = render_scene(sz.shapes[i % len(sz.shapes)], rng, sz.radius)
        stem = f"scene_{i:04d}"
        _write(folder / f"{stem}.{image_format(i)}", rgb)
        _write_labels(folder / f"{stem}.inst.png", inst)
        _write_labels(folder / f"{stem}.sem.png", sem)
    (out / "classes.json").write_text(json.dumps({
        "semantic": list(CLASSES),
        "instance": "0 = background, 1..N visible objects of the image",
        "seed": seed,
        "size": size,
    }, indent=1) + "\n")
    return out
