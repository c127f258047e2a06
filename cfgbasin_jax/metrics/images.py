"""Image reading and the fixed preprocessing recipes used by the metrics (host side, numpy + PIL).

Every loader returns RGB ``uint8`` pixels whatever the file holds: palette (P), grey (L, I;16, I, F),
grey+alpha (LA), RGBA and CMYK images are converted, never rejected; odd sizes are fine.

Recipes (all return float32 [H,W,3], channels last):
  * :func:`sscd_pixels` with ``preset``:
      - ``"sscd"``       SSCD's recommended inference transform: resize the short edge to 288
        (bilinear, aspect kept), ImageNet mean/std. Output size depends on the aspect ratio.
      - ``"square320"``  SSCD's "skew_320": resize to 320x320 (bilinear), ImageNet mean/std.
      - ``"dcr224"``     the memorization-literature convention (Somepalli et al. DCR code, reused by
        Wen et al.): resize short edge to 256, center crop 224, mean = std = 0.5.
  * :func:`clip_pixels`: CLIP's processor: resize short edge (bicubic), center crop, /255, CLIP mean/std.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageInputError(ValueError):
    """A folder, listing or image file that the metrics cannot use (message names the path)."""


# ----------------------------------------------------------------------------- reading


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> mode "RGB". High-bit grey (I;16, I, F) is rescaled to 0..255 from its own
    range type; palette images with transparency go through RGBA first (alpha is dropped, as in
    ``Image.convert("RGB")`` used by the torchvision / transformers pipelines)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if image.mode == "F":
            top = 1.0 if arr.max() <= 1.0 else top
        grey = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Read an image file as an RGB PIL image (first frame of animations)."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise ImageInputError(f"image file not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageInputError(f"cannot read image {path}: {err}") from None


def list_images(folder: str, recursive: bool = True) -> list[str]:
    """Sorted image paths under ``folder`` (by extension, case-insensitive). Errors if none."""
    if not os.path.isdir(folder):
        raise ImageInputError(f"not a folder: {folder}")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.join(root, name))
        if not recursive:
            break
    if not found:
        raise ImageInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    return found


_LEADING_INTS = re.compile(r"^(\d+)(?:_(\d+))?")


def leading_ints(name: str) -> tuple[int, int] | None:
    """``"12_3.png" -> (12, 3)``, ``"7.png" -> (7, 0)``, anything else -> None."""
    m = _LEADING_INTS.match(os.path.basename(name))
    if not m:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


# ----------------------------------------------------------------------------- resizing


def short_edge_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(new_w, new_h) with the short edge at ``short``, long edge ``int(short*long/short_old)``
    (torchvision / transformers rounding)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def resize_short_edge(image: Image.Image, short: int, resample: int) -> Image.Image:
    """Resize so that the shorter side is ``short`` (no-op when it already is)."""
    w, h = image.size
    if min(w, h) == short:
        return image
    return image.resize(short_edge_size(w, h, short), resample=resample)


def center_crop(pixels: np.ndarray, size: int, rounding: str) -> np.ndarray:
    """[H,W,C] -> [size,size,C]; ``rounding="floor"`` (transformers) or ``"round"`` (torchvision).
    Images smaller than ``size`` are zero-padded (as both libraries do)."""
    h, w = pixels.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        pixels = np.pad(pixels, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = pixels.shape[:2]
    if rounding == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return pixels[top : top + size, left : left + size]


def _normalize(pixels_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    x = pixels_uint8.astype(np.float32) / np.float32(255.0)
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


# ----------------------------------------------------------------------------- recipes

SSCD_PRESETS = ("sscd", "square320", "dcr224")


def sscd_pixels(image: Image.Image, preset: str = "sscd") -> np.ndarray:
    """RGB PIL image -> float32 [H,W,3] SSCD input for ``preset`` (see module docstring)."""
    image = to_rgb(image)
    if preset == "sscd":
        out = resize_short_edge(image, 288, Image.BILINEAR)
        return _normalize(np.asarray(out), IMAGENET_MEAN, IMAGENET_STD)
    if preset == "square320":
        out = image.resize((320, 320), resample=Image.BILINEAR)
        return _normalize(np.asarray(out), IMAGENET_MEAN, IMAGENET_STD)
    if preset == "dcr224":
        out = center_crop(np.asarray(resize_short_edge(image, 256, Image.BILINEAR)), 224, "round")
        return _normalize(out, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    raise ValueError(f"unknown SSCD preprocessing preset {preset!r}; choose one of {SSCD_PRESETS}")


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
    """CLIP image recipe: short edge -> ``shortest_edge`` (bicubic), center crop ``crop``, CLIP mean/std."""

    shortest_edge: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def clip_pixels(image: Image.Image, recipe: ClipPreprocess) -> np.ndarray:
    """RGB PIL image -> float32 [crop,crop,3] (channels last) as CLIPImageProcessor computes it."""
    image = resize_short_edge(to_rgb(image), recipe.shortest_edge, Image.BICUBIC)
    out = center_crop(np.asarray(image), recipe.crop, "floor")
    return _normalize(out, recipe.mean, recipe.std)
