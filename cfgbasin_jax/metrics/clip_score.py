"""CLIP score with our CLIP (:class:`cfgbasin_jax.models.clip.CLIPModel`): cosine similarity of image and
caption embeddings.

Scale convention (both are reported by :func:`cfgbasin_jax.runs.evaluation.evaluate`):
  * ``cos``        raw cosine similarity of the projected, L2-normalised embeddings, in [-1, 1];
  * ``clip_score`` ``100 * max(cos, 0)``, the common "CLIPScore" scale (torchmetrics; Hessel et al.
    use ``2.5 * max(cos, 0)`` instead).

Images follow CLIPImageProcessor: short edge to ``shortest_edge`` (bicubic), center crop, /255, CLIP
mean/std (read from ``preprocessor_config.json`` when the folder has one). Captions are tokenised by the
folder's CLIP tokenizer, truncated/padded to the text model's ``max_position_embeddings``.

A CLIP folder is either a Flax folder (``flax_model.msgpack`` + ``config.json``, as transformers'
FlaxCLIPModel saved them: the parameter tree is the same) or a PyTorch ``CLIPModel`` folder
(``model.safetensors``, or ``pytorch_model.bin`` which needs torch), converted in memory or once and
for all with :func:`convert_clip`::

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
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfgbasin_jax.models import tokenizer as T
from cfgbasin_jax.models.clip import CLIPModel, clip_config
from cfgbasin_jax.models.errors import ConversionError
from cfgbasin_jax.metrics.images import CLIP_MEAN, CLIP_STD, ClipPreprocess

FLAX_WEIGHTS = "flax_model.msgpack"
PT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Copied next to converted weights: the config, the tokenizer and the image processor's recipe.
FOLDER_FILES = ("config.json", *T.FILES, "preprocessor_config.json")


class ClipWeightsError(ValueError):
    """A CLIP folder that is missing files or cannot be read (message names the folder)."""


@dataclasses.dataclass
class ClipScorer:
    """A loaded CLIP: the model (:class:`cfgbasin_jax.models.clip.CLIPModel`), its params, the tokenizer
    and the image recipe."""

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
    if _has(folder, "model.safetensors"):
        return "pytorch"
    if _has(folder, "pytorch_model.bin"):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ClipWeightsError(
                f"{folder} holds pickled PyTorch weights (pytorch_model.bin) and torch is not installed: convert "
                "it once elsewhere with `python -m cfgbasin_jax.metrics.clip_score SRC DST`"
            ) from None
        return "pytorch"
    raise ClipWeightsError(f"{folder} has no {FLAX_WEIGHTS} nor {' / '.join(PT_WEIGHTS)}")


def check_folder(folder: str) -> None:
    """ClipWeightsError unless ``folder`` has a config, usable weights and a CLIP tokenizer."""
    check_weights(folder)
    if not ((_has(folder, "vocab.json") and _has(folder, "merges.txt")) or _has(folder, "tokenizer.json")):
        raise ClipWeightsError(f"{folder} has no CLIP tokenizer (vocab.json and merges.txt, or tokenizer.json)")


def read_model(folder: str) -> tuple[CLIPModel, dict]:
    """(CLIPModel, params) of a Flax or PyTorch CLIPModel folder; ClipWeightsError naming the folder,
    the config key or the weight at fault."""
    from flax import serialization

    from cfgbasin_jax.convert.mapping import state_dict_to_flax
    from cfgbasin_jax.convert.weights import find_weight_file, read_state_dict

    kind = check_weights(folder)
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = clip_config(json.load(f), what=os.path.join(folder, "config.json"))
        model = CLIPModel(config)
        shapes = param_shapes(model)
        if kind == "flax":
            with open(os.path.join(folder, FLAX_WEIGHTS), "rb") as f:
                params = serialization.msgpack_restore(f.read())
            _check_tree(params, shapes, os.path.join(folder, FLAX_WEIGHTS))
        else:
            state = read_state_dict(find_weight_file(Path(folder), ("model", "pytorch_model")))
            params = state_dict_to_flax(state, shapes)
    except ClipWeightsError:
        raise
    except ConversionError as err:
        raise ClipWeightsError(str(err)) from err
    except (OSError, ValueError) as err:  # unreadable config.json or msgpack file
        raise ClipWeightsError(f"{folder}: {err}") from err
    return model, jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)


def param_shapes(model: CLIPModel) -> dict:
    """The model's params tree of jax.ShapeDtypeStruct (eval_shape: nothing is computed)."""
    c = model.config
    ids = jax.ShapeDtypeStruct((1, c.text.max_position_embeddings), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels), jnp.float32)
    return jax.eval_shape(lambda i, x: model.init(jax.random.PRNGKey(0), i, x), ids, pixels)["params"]


def _check_tree(params, shapes, source: str) -> None:
    got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(shapes)}
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            raise ClipWeightsError(
                f"{source}: parameter {key} has shape {got.get(key)}, the config needs {want.get(key)}"
            )


def load_clip(folder: str, precision: str = "highest") -> ClipScorer:
    """Load a Flax or PyTorch CLIPModel folder with its tokenizer (vocab.json + merges.txt, or tokenizer.json)."""
    check_folder(folder)
    model, params = read_model(folder)
    try:
        tokenizer = T.load_tokenizer(folder)
    except T.TokenizerError as err:
        raise ClipWeightsError(str(err)) from err
    c = model.config
    recipe = read_recipe(folder, c.vision.image_size)
    params = jax.tree.map(jnp.asarray, params)
    return ClipScorer(model, params, tokenizer, recipe, c.text.max_position_embeddings, precision)


def convert_clip(src: str, dst: str) -> None:
    """PyTorch (or Flax) CLIPModel folder ``src`` -> Flax folder ``dst`` (flax_model.msgpack, as
    transformers' FlaxCLIPModel writes it) with its config, tokenizer and processor files."""
    from flax import serialization

    _, params = read_model(src)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, FLAX_WEIGHTS), "wb") as f:
        f.write(serialization.msgpack_serialize(params))
    for name in FOLDER_FILES:
        if _has(src, name) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


# ----------------------------------------------------------------------------- embeddings


def _precision_ctx(precision: str):
    return jax.default_matmul_precision("float32") if precision == "highest" else contextlib.nullcontext()


@functools.lru_cache(maxsize=8)
def image_fn(model: CLIPModel, precision: str):
    """Jitted ``fn(params, pixels [N,crop,crop,3]) -> [N,P]`` unit image embeddings (cached per model)."""

    def fn(params, pixels_nhwc):
        with _precision_ctx(precision):
            feats = model.apply({"params": params}, pixels_nhwc, method=CLIPModel.image_features)
        return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)

    return jax.jit(fn)


@functools.lru_cache(maxsize=8)
def _text_fn(model: CLIPModel, precision: str):
    """jit fn(params, input_ids [N,L], attention_mask [N,L]) -> unit text embeddings [N,P]."""

    def fn(params, input_ids, attention_mask):
        with _precision_ctx(precision):
            feats = model.apply({"params": params}, input_ids, attention_mask, method=CLIPModel.text_features)
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
        description="Convert a PyTorch CLIPModel folder (safetensors / bin) to a Flax folder (flax_model.msgpack).",
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
