"""Image files -> bytes to store and the RGB pixels every reader of those bytes will see.

A pipeline that stores an image's original bytes and computes something on its pixels (UniAP masks on
a patch grid) must compute on the pixels that the shard's readers decode, or the masks drift from the
image. Readers decode photographs with :func:`distillkit.sensors.images.decode_rgb` (OpenCV, through
``pipelines.codecs``), so :func:`read_image_file` returns exactly that decoding of the bytes it says
to store. It also checks the file with Pillow first, because OpenCV is lenient where a build should not
be (it returns a grey-padded picture for a truncated JPEG, without an error).

What happens to each kind of input (one rule per line; ``ImageFile.notes`` says which applied):

- unreadable, empty, not an image, truncated or corrupt (Pillow cannot decode it completely):
  ``ImageFileError`` naming the file;
- more than ``max_pixels`` pixels (default 40 M, i.e. 120 MB as RGB plus the decoder's own copy):
  ``ImageFileError`` before any pixel is decoded (a decompression bomb, or a scan too large for the
  worker memory the pipeline is sized for);
- EXIF orientation: applied (OpenCV and Pillow's ``exif_transpose`` agree; the stored bytes keep the tag);
- grayscale and palette: replicated / expanded to RGB;
- 16-bit: reduced to 8 bits by dropping the low byte (``v >> 8``, OpenCV's rule);
- alpha: dropped (the colour channels are kept as stored, OpenCV's rule);
- CMYK JPEG: converted to RGB;
- multi-page TIFF, animated WebP: the first frame;
- a format outside JPEG/PNG/WebP/BMP/TIFF, or a file OpenCV cannot decode or decodes differently from
  Pillow (shape, or colours more than 8 levels apart on average): the Pillow decoding is stored instead,
  re-encoded as lossless PNG, and the notes say why. The stored field then decodes to the same pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distillkit.sensors.images import decode_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Image files found in the wild that are not read (no decoder here, or animations): listed as rejected, not
# skipped in silence (HEIC is the iPhone's default).
UNSUPPORTED_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".gif", ".jp2", ".raw", ".cr2", ".nef", ".dng")
DEFAULT_MAX_PIXELS = 40_000_000
# Pillow format name -> the extension of the stored field (``image.{ext}``).
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
# Mean absolute difference (levels of 255) above which OpenCV's and Pillow's decodings disagree.
DECODER_TOLERANCE = 8.0


class ImageFileError(ValueError):
    """An image file that cannot be used; the message starts with the file's path."""


@dataclass
class ImageFile:
    """One image as it will be stored.

    Attributes:
        path: the source file.
        data: the bytes to store (the original file, or a lossless PNG re-encoding, see ``notes``).
        ext: field extension of ``data``: "jpg", "png", "webp", "bmp" or "tif".
        rgb: (H, W, 3) uint8 RGB, exactly ``decode_rgb(data)``.
        mode: Pillow's mode of the file ("RGB", "L", "I;16", "CMYK", "RGBA", ...).
        notes: what was done beyond plain decoding (EXIF rotation, alpha dropped, re-encoded, ...).
        orientation: the EXIF orientation tag applied to ``rgb`` (1 = none).
    """

    path: Path
    data: bytes
    ext: str
    rgb: np.ndarray
    mode: str
    notes: list[str] = field(default_factory=list)
    orientation: int = 1

    @property
    def reencoded(self) -> bool:
        """True when ``data`` is a re-encoding rather than the original bytes."""
        return any(n.startswith("re-encoded") for n in self.notes)


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """``arr`` (H, W, ...) as EXIF ``orientation`` says to display it: Pillow's ``exif_transpose`` on arrays.

    Args:
        arr: pixels as stored in the file.
        orientation: EXIF tag 0x0112 (1-8).
    """
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops[orientation](arr)) if orientation in ops else arr


def _pillow_rgb(im, notes: list[str]) -> np.ndarray:
    """A loaded Pillow image -> (H, W, 3) uint8 by the module's rules (EXIF already applied)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.int64)
        if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
            arr = np.clip(arr, 0, 65535)  # 32-bit integer pixels: a shift alone would wrap around
            notes.append("32-bit values clipped to 0..65535")
        if arr.max(initial=0) <= 255:
            # 8-bit data in a 16-bit container: reducing by 8 bits would turn it black (what OpenCV does)
            notes.append("16-bit image with values <= 255 kept as 8-bit values")
            arr = arr.astype(np.uint8)
        else:
            arr = (arr >> 8).astype(np.uint8)
            notes.append("16-bit reduced to 8 bits")
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, np.float32)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=1.0))
        arr = np.round((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
        notes.append("float image scaled min..max to 0..255")
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
    if mode in ("L", "1", "LA", "I;16"):
        notes.append("grayscale replicated to RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa") or (mode == "P" and "transparency" in im.info):
        notes.append("alpha channel dropped")
    return np.asarray(im.convert("RGB"))


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFile:
    """Read one image file by the rules of the module docstring.

    Args:
        path: the file.
        max_pixels: refuse images with more pixels than this (width x height).

    Raises:
        ImageFileError: the file cannot be used; the message names it and says why.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not data:
        raise ImageFileError(f"{path}: empty file")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's own bomb limit (~89 M pixels) must not undercut max_pixels, which is checked just below
            # before anything is decoded; raising it for this process only ever widens it to a larger request
            if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
                Image.MAX_IMAGE_PIXELS = max_pixels
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise ImageFileError(
                    f"{path}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                    f"(~{width * height * 3 // 2**20} MB decoded; raise max_pixels to accept it)"
                )
            fmt = im.format or "?"
            mode = im.mode
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"first of {im.n_frames} frames")
            im.load()
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            if orientation not in (None, 1):
                im = ImageOps.exif_transpose(im)
                notes.append(f"EXIF orientation {orientation} applied")
            rgb_pil = _pillow_rgb(im, notes)
    except ImageFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageFileError(f"{path}: refused as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageFileError(f"{path}: not a readable image (format not recognised)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        what = "truncated or corrupt" if "truncated" in str(exc).lower() else "not a readable image"
        raise ImageFileError(f"{path}: {what} ({type(exc).__name__}: {exc})") from None
    if rgb_pil.ndim != 3 or min(rgb_pil.shape[:2]) < 1:
        raise ImageFileError(f"{path}: decoded to an empty picture {rgb_pil.shape}")
    ext = FORMAT_EXT.get(fmt)
    reason = None
    if ext is None:
        reason = f"format {fmt} is not stored as is"
    else:
        try:
            rgb = decode_rgb(data)
        except ValueError:
            rgb, reason = None, "OpenCV cannot decode it"
        if rgb is not None:
            if rgb.shape != rgb_pil.shape:
                reason = f"OpenCV decodes {rgb.shape[1]}x{rgb.shape[0]}, Pillow {rgb_pil.shape[1]}x{rgb_pil.shape[0]}"
            else:
                diff = float(np.abs(rgb.astype(np.int16) - rgb_pil.astype(np.int16)).mean())
                if diff > DECODER_TOLERANCE:
                    reason = f"OpenCV and Pillow colours differ by {diff:.1f} levels on average"
    if reason is None:
        return ImageFile(path, data, ext, rgb, mode, notes, orientation)  # type: ignore[arg-type]
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb_pil), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageFileError(f"{path}: PNG re-encoding failed")
    notes.append(f"re-encoded as PNG ({reason})")
    png = buf.tobytes()
    return ImageFile(path, png, "png", decode_rgb(png), mode, notes, orientation)
