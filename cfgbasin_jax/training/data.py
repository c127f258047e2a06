"""Training data: the image-folder reader and the memorization recipe's sample order.

  * :func:`read_folder`: image + caption pairs (``x.png`` + ``x.txt``) -> uint8 [N,H,W,3], captions.
  * :func:`epoch_indices`: the recipe: the first ``end`` samples (sorted file order) are the
    memorized subset, each repeated ``repeats`` times, mixed with ``non_mem_ratio * end`` other
    samples (all of them when None), one copy each. Batches are drawn from this list.
  * :func:`batch_indices`: step ``step``'s batch, a function of (seed, step) only (resume-safe).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from cfgbasin_jax.training.config import TrainingError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass
class Dataset:
    """images: uint8 [N,H,W,3]; captions: N strings; names: N file stems (sorted); skipped: count."""

    images: np.ndarray
    captions: list
    names: list
    skipped: int = 0


def read_folder(folder, resolution: int | None = None, skip_bad: bool = False) -> Dataset:
    """Image + caption pairs ``STEM.png`` + ``STEM.txt`` (sorted by stem), resized to
    ``resolution`` (square, bicubic) when given, else all images must share one size.

    An image without caption, a caption without image or an unreadable image raises one
    TrainingError naming the files; with ``skip_bad`` they are skipped and counted instead.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"--data {folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = {p.stem: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    texts = {p.stem: p for p in files if p.suffix.lower() == ".txt"}
    unmatched = sorted([images[s].name for s in images.keys() - texts.keys()] + [texts[s].name for s in texts.keys() - images.keys()])
    if unmatched and not skip_bad:
        raise TrainingError(
            f"--data {folder}: {len(unmatched)} file(s) without a partner (image needs STEM.txt, caption needs "
            f"an image): {', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''} (or pass --skip_bad_files)"
        )
    stems = sorted(images.keys() & texts.keys())
    pixels, captions, names, bad = [], [], [], list(unmatched)
    for stem in stems:
        try:
            with Image.open(images[stem]) as im:
                im = im.convert("RGB")
                if resolution is not None and im.size != (resolution, resolution):
                    im = im.resize((resolution, resolution), Image.BICUBIC)
                arr = np.asarray(im, np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            if not skip_bad:
                raise TrainingError(f"--data {folder}: cannot read image {images[stem].name} ({err}) (or pass --skip_bad_files)") from None
            bad.append(images[stem].name)
            continue
        if pixels and arr.shape != pixels[0].shape:
            raise TrainingError(
                f"--data {folder}: image {images[stem].name} is {arr.shape[1]}x{arr.shape[0]} but "
                f"{names[0]} is {pixels[0].shape[1]}x{pixels[0].shape[0]}; pass --resolution"
            )
        pixels.append(arr)
        captions.append(texts[stem].read_text(encoding="utf-8").strip())
        names.append(stem)
    if not pixels:
        raise TrainingError(f"--data {folder}: no image + caption pairs found")
    return Dataset(np.stack(pixels), captions, names, skipped=len(bad))


def epoch_indices(num_samples: int, end: int, repeats: int, non_mem_ratio: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The recipe's epoch as (sample indices [M], is_memorized bool [M]): samples 0..end-1 each
    ``repeats`` times, then ``round(non_mem_ratio * end)`` samples from end on (all when None),
    once each. With end=0 it is every sample once."""
    if end > num_samples:
        raise TrainingError(f"--end {end} exceeds the {num_samples} samples of the dataset")
    rest = num_samples - end
    n_plain = rest if non_mem_ratio is None else min(rest, int(round(non_mem_ratio * end)))
    mem = np.repeat(np.arange(end), repeats)
    plain = np.arange(end, end + n_plain)
    idx = np.concatenate([mem, plain]).astype(np.int64)
    if idx.size == 0:
        raise TrainingError("the recipe selects no samples (check --end / --non_mem_ratio)")
    return idx, idx < end


def batch_indices(epoch: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Step ``step``'s batch: the seeded shuffle of epoch ``step*B // M``, sliced (wrapping into the
    next epoch's shuffle). Depends only on (seed, step): resume reproduces the stream."""
    m = epoch.size
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        ep, off = divmod(start + len(out), m)
        perm = np.random.default_rng([seed, 7, ep]).permutation(m)
        out.extend(epoch[perm[off: off + batch_size - len(out)]].tolist())
    return np.asarray(out, np.int64)


def to_model_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W] in [-1, 1]."""
    return np.transpose(images.astype(np.float32) / 127.5 - 1.0, (0, 3, 1, 2))


def tokenize(tokenizer, captions: Sequence[str]) -> np.ndarray:
    """int32 [N, model_max_length], padded like the pipeline."""
    out = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np")
    return out.input_ids.astype(np.int32)
