"""Measurements on the toy's 16x16 images, from pixels (used by ``cfgbasin-demo``).

* memorization: :func:`similarity` (cosine of mean-centred pixels), :func:`nearest_training`, the
  copy thresholds :func:`copy_threshold` and :func:`layout_threshold` set from fresh caption-satisfying
  images (:func:`caption_variants`), and :func:`layout_iou`;
* caption alignment: :func:`object_checks` (colour at the captioned position, shape kind by template
  IoU) and :func:`alignment`;
* the noise-difference curve: :func:`first_local_min_t` (where DTP would switch).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cfgbasin_jax.toy import data as toy

def centred_unit(images: np.ndarray) -> np.ndarray:
    """uint8/float [N,H,W,3] -> float32 [N,D]: mean-centred, unit-norm pixel vectors."""
    x = np.asarray(images, np.float32).reshape(len(images), -1)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N,H,W,3] x [N,H,W,3] -> [N]: pairwise cosine of mean-centred pixels (1 = identical)."""
    return np.sum(centred_unit(a) * centred_unit(b), axis=1)


def nearest_training(images: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(similarity [N], index [N]) of each image's nearest training image."""
    sims = centred_unit(images) @ centred_unit(train).T
    idx = np.argmax(sims, axis=1)
    return sims[np.arange(len(images)), idx], idx


def caption_variants(objects: Sequence[toy.ShapeSpec], count: int, seed: int) -> np.ndarray:
    """uint8 [count,16,16,3]: fresh images that satisfy the caption of ``objects`` (same colours,
    shapes, positions; random background, sizes and jitter), as a generalizing model would draw."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        objs = [
            dataclasses.replace(o, size=int(rng.choice(toy.SHAPE_SIZES)),
                                jitter=(int(rng.integers(-toy.JITTER, toy.JITTER + 1)), int(rng.integers(-toy.JITTER, toy.JITTER + 1))))
            for o in objects
        ]
        out.append(toy.render(objs, str(rng.choice(list(toy.BACKGROUNDS)))))
    return np.stack(out)


def copy_threshold(dataset: toy.ToyDataset, count: int = 2000, quantile: float = 0.99, seed: int = 0) -> float:
    """Similarity above which an output counts as a copy of its duplicated image: the
    ``quantile`` of the similarity between each duplicated image and fresh non-identical images
    satisfying its caption (:func:`caption_variants`), over all memorized captions."""
    sims = []
    for i in np.nonzero(dataset.memorized)[0]:
        variants = caption_variants(dataset.objects[i], count // max(dataset.num_memorized, 1), seed + int(i))
        keep = np.any(variants.reshape(len(variants), -1) != dataset.images[i].reshape(1, -1), axis=1)
        sims.append(similarity(variants[keep], np.repeat(dataset.images[i][None], keep.sum(), 0)))
    return float(np.quantile(np.concatenate(sims), quantile))


def layout_iou(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean over the reference's object colours of the IoU between the pixels of that colour in
    ``image`` and in ``reference`` (nearest-palette classes): 1 when the objects are reproduced
    exactly (sizes, shapes, placement), whatever the background."""
    a, b = classify_colours(image), classify_colours(reference)
    colours = [c for c in np.unique(b) if c < len(toy.COLOURS)]
    if not colours:
        return float("nan")
    return float(np.mean([np.sum((a == c) & (b == c)) / max(np.sum((a == c) | (b == c)), 1) for c in colours]))


def layout_threshold(dataset: toy.ToyDataset, count: int = 2000, quantile: float = 0.99, seed: int = 0) -> float:
    """Layout IoU above which the objects copy the duplicated image: the ``quantile`` of the layout
    IoU between each duplicated image and fresh caption-satisfying images whose objects differ
    from it (another size or placement), as :func:`copy_threshold` does for the whole image."""
    ious = []
    for i in np.nonzero(dataset.memorized)[0]:
        variants = caption_variants(dataset.objects[i], count // max(dataset.num_memorized, 1), seed + int(i))
        ref = dataset.images[i]
        same_layout = [np.array_equal(classify_colours(v) < len(toy.COLOURS), classify_colours(ref) < len(toy.COLOURS)) for v in variants]
        ious += [layout_iou(v, ref) for v, same in zip(variants, same_layout) if not same]
    return float(np.quantile(ious, quantile))


_PALETTE_NAMES = list(toy.COLOURS) + [f"bg:{b}" for b in toy.BACKGROUNDS]
_PALETTE = np.asarray(list(toy.COLOURS.values()) + list(toy.BACKGROUNDS.values()), np.float32)


def classify_colours(image: np.ndarray) -> np.ndarray:
    """int [H,W]: index into the palette (toy colours, then backgrounds) of each pixel's nearest colour."""
    d = np.sum(np.square(np.asarray(image, np.float32)[:, :, None, :] - _PALETTE[None, None]), axis=-1)
    return np.argmin(d, axis=-1)


def _templates():
    out = []
    for shape in toy.SHAPES:
        for size in toy.SHAPE_SIZES:
            out.append((shape, size, toy.shape_mask(shape, size, (8, 8), 16)))
    return out


_TEMPLATES = None


def object_checks(image: np.ndarray, obj: toy.ShapeSpec) -> tuple[bool, bool]:
    """(colour-at-position ok, shape ok) for one captioned object, from pixels.

    Colour: at least 5 of the 3x3 pixels at the captioned position have the caption's colour as
    their nearest palette colour. Shape: the pixels of that colour within 5 px of the position,
    matched against every (shape, size, +-2 px offset) template; the best IoU names the shape.
    """
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _templates()
    labels = classify_colours(image)
    target = list(toy.COLOURS).index(obj.colour)
    r, c = toy.POSITIONS[obj.position]
    window = labels[r - 1: r + 2, c - 1: c + 2]
    colour_ok = int(np.sum(window == target)) >= 5
    mask = labels == target
    rows, cols = np.mgrid[0:16, 0:16]
    near = (np.abs(rows + 0.5 - r) <= 5.5) & (np.abs(cols + 0.5 - c) <= 5.5)
    mask = mask & near
    if not mask.any():
        return colour_ok, False
    best, best_shape = -1.0, None
    for shape, _size, tmpl in _TEMPLATES:
        for dr in range(-2, 3):
            for dc in range(-2, 3):
                t = np.roll(np.roll(tmpl, r - 8 + dr, axis=0), c - 8 + dc, axis=1) & near
                inter = np.sum(t & mask)
                iou = inter / max(np.sum(t | mask), 1)
                if iou > best:
                    best, best_shape = iou, shape
    return colour_ok, best_shape == obj.shape


def alignment(image: np.ndarray, objects: Sequence[toy.ShapeSpec]) -> float:
    """Fraction of the caption's attribute checks (colour at position, shape; per object) passed."""
    checks = [ok for obj in objects for ok in object_checks(image, obj)]
    return float(np.mean(checks))


def first_local_min_t(noise_diff: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """int [B]: timestep of each row's first strict local minimum of ||eps_c - eps_u|| (the DTP
    rule); -1 where there is none."""
    out = []
    for d in noise_diff:
        idx = [k for k in range(1, len(d) - 1) if d[k - 1] > d[k] < d[k + 1]]
        out.append(int(timesteps[idx[0]]) if idx else -1)
    return np.asarray(out)
