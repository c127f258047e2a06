"""CLIP score with transformers' FlaxCLIPModel: cosine similarity of image and caption embeddings.

Scale convention (both are reported by :func:`cfgbasin_jax.evaluate.evaluate`):
  * ``cos``        raw cosine similarity of the projected, L2-normalised embeddings, in [-1, 1];
  * ``clip_score`` ``100 * max(cos, 0)``, the common "CLIPScore" scale (torchmetrics; Hessel et al.
    use ``2.5 * max(cos, 0)`` instead).

Images follow CLIPImageProcessor: short edge to ``shortest_edge`` (bicubic), center crop, /255, CLIP
mean/std (read from ``preprocessor_config.json`` when the folder has one). Captions are tokenised by the
folder's CLIP tokenizer, truncated/padded to the text model's ``max_position_embeddings``.

A CLIP folder is either a Flax folder (``flax_model.msgpack`` + ``config.json``, loads without torch)
or a PyTorch ``CLIPModel`` folder (``model.safetensors`` / ``pytorch_model.bin``), converted in memory
(needs torch) or once and for all with :func:`convert_clip`::

    python -m cfgbasin_jax.metrics.clip_score PT_CLIP_DIR FLAX_CLIP_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfgbasin_jax.metrics.images import CLIP_MEAN, CLIP_STD, ClipPreprocess

FLAX_WEIGHTS = "flax_model.msgpack"
PT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
)


class ClipWeightsError(ValueError):
    """A CLIP folder that is missing files or cannot be read (message names the folder)."""


@dataclasses.dataclass
class ClipScorer:
    """A loaded CLIP: the Flax model, its params, the tokenizer and the image recipe."""

    model: Any
    params: Any
    tokenizer: Any
    recipe: ClipPreprocess
    max_length: int
    precision: str = "highest"


def _has(folder: str, name: str) -> bool:
    return os.path.isfile(os.path.join(folder, name))


def read_recipe(folder: str, image_size: int) -> ClipPreprocess:
    """Image recipe from ``preprocessor_config.json`` when present, else CLIP defaults at ``image_size``."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return ClipPreprocess(image_size, image_size, CLIP_MEAN, CLIP_STD)
    with open(path) as f:
        cfg = json.load(f)
    size = cfg.get("size", image_size)
    shortest = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
    crop = cfg.get("crop_size", image_size)
    if isinstance(crop, dict):
        crop = crop.get("height", crop.get("width", image_size))
    mean = tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in cfg.get("image_std", CLIP_STD))
    return ClipPreprocess(int(shortest), int(crop), mean, std)


def check_weights(folder: str) -> str:
    """"flax" or "pytorch": which weights ``folder`` holds; ClipWeightsError if unusable (no files read)."""
    if not os.path.isdir(folder):
        raise ClipWeightsError(f"CLIP folder not found: {folder}")
    if not _has(folder, "config.json"):
        raise ClipWeightsError(f"{folder} has no config.json: not a CLIPModel folder")
    if _has(folder, FLAX_WEIGHTS):
        return "flax"
    if any(_has(folder, n) for n in PT_WEIGHTS):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ClipWeightsError(
                f"{folder} holds PyTorch weights and torch is not installed: convert it once elsewhere with "
                "`python -m cfgbasin_jax.metrics.clip_score SRC DST`"
            ) from None
        return "pytorch"
    raise ClipWeightsError(f"{folder} has no {FLAX_WEIGHTS} nor {' / '.join(PT_WEIGHTS)}")


def check_folder(folder: str) -> None:
    """ClipWeightsError unless ``folder`` has a config, usable weights and a CLIP tokenizer."""
    check_weights(folder)
    if not (_has(folder, "vocab.json") and _has(folder, "merges.txt")):
        raise ClipWeightsError(f"{folder} has no CLIP tokenizer (vocab.json and merges.txt)")


def _load_flax_model(folder: str):
    from transformers import FlaxCLIPModel

    if check_weights(folder) == "flax":
        return FlaxCLIPModel.from_pretrained(folder, local_files_only=True)
    return FlaxCLIPModel.from_pretrained(folder, from_pt=True, local_files_only=True)


def load_clip(folder: str, precision: str = "highest") -> ClipScorer:
    """Load a Flax or PyTorch CLIPModel folder with its tokenizer (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    check_folder(folder)
    model = _load_flax_model(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    cfg = model.config
    recipe = read_recipe(folder, cfg.vision_config.image_size)
    return ClipScorer(model, model.params, tokenizer, recipe, cfg.text_config.max_position_embeddings, precision)


def convert_clip(src: str, dst: str) -> None:
    """PyTorch (or Flax) CLIPModel folder ``src`` -> Flax folder ``dst`` with tokenizer/processor files."""
    model = _load_flax_model(src)
    os.makedirs(dst, exist_ok=True)
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if _has(src, name) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


# ----------------------------------------------------------------------------- embeddings


def _precision_ctx(precision: str):
    return jax.default_matmul_precision("float32") if precision == "highest" else contextlib.nullcontext()


@functools.lru_cache(maxsize=8)
def image_fn(model, precision: str):
    """Jitted ``fn(params, pixels [N,crop,crop,3]) -> [N,P]`` unit image embeddings (cached per model)."""

    def fn(params, pixels_nhwc):
        with _precision_ctx(precision):
            feats = model.get_image_features(jnp.transpose(pixels_nhwc, (0, 3, 1, 2)), params=params)
        return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)

    return jax.jit(fn)


@functools.lru_cache(maxsize=8)
def _text_fn(model, precision: str):
    def fn(params, input_ids, attention_mask):
        with _precision_ctx(precision):
            feats = model.get_text_features(input_ids, attention_mask, params=params)
        return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)

    return jax.jit(fn)


def _pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    return x if x.shape[0] == size else np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def image_embeddings(scorer: ClipScorer, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """float32 [N,crop,crop,3] CLIP-normalised pixels -> float32 [N,P] unit image embeddings."""
    fn = image_fn(scorer.model, scorer.precision)
    n = pixels.shape[0]
    bs = min(batch_size, n)
    out = [np.asarray(fn(scorer.params, _pad_batch(pixels[i : i + bs], bs)))[: min(bs, n - i)] for i in range(0, n, bs)]
    return np.concatenate(out)


def tokenize(scorer: ClipScorer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (input_ids int32 [N,L], attention_mask int32 [N,L]), L = max_position_embeddings."""
    enc = scorer.tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=scorer.max_length, return_tensors="np"
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def text_embeddings(scorer: ClipScorer, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Captions -> float32 [N,P] unit text embeddings."""
    ids, mask = tokenize(scorer, texts)
    fn = _text_fn(scorer.model, scorer.precision)
    n = ids.shape[0]
    bs = min(batch_size, n)
    out = []
    for i in range(0, n, bs):
        e = fn(scorer.params, _pad_batch(ids[i : i + bs], bs), _pad_batch(mask[i : i + bs], bs))
        out.append(np.asarray(e)[: min(bs, n - i)])
    return np.concatenate(out)


def cosine(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine of unit embeddings [N,P] x [N,P] -> [N]."""
    return np.sum(np.asarray(image_emb, np.float64) * np.asarray(text_emb, np.float64), axis=-1)


def clip_score(cos: np.ndarray) -> np.ndarray:
    """The CLIPScore scale: ``100 * max(cos, 0)``."""
    return 100.0 * np.maximum(np.asarray(cos, np.float64), 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cfgbasin_jax.metrics.clip_score",
        description="Convert a PyTorch CLIPModel folder (safetensors / bin) to a Flax folder.",
    )
    parser.add_argument("src", help="PyTorch CLIPModel folder (config.json, model.safetensors, vocab.json, merges.txt)")
    parser.add_argument("dst", help="output Flax folder")
    args = parser.parse_args(argv)
    try:
        convert_clip(args.src, args.dst)
    except ClipWeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
