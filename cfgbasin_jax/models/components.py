"""What a loaded model is (:class:`Components`), the small JSON files of a model folder, and the
pixel-space model format (the shipped toy).

The loaders of every folder format (:mod:`cfgbasin_jax.models.converted`, diffusers folders in
:mod:`cfgbasin_jax.convert.sd_folder`, the dispatch in :mod:`cfgbasin_jax.loading`) return Components.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cfgbasin_jax.models.builders import build_text_encoder, build_unet, resolve_dtype
from cfgbasin_jax.models.errors import ConversionError
from cfgbasin_jax.models import tokenizer as T
from cfgbasin_jax.models.tokenizer import save_tokenizer

COMPONENTS = ("unet", "vae", "text_encoder")
SCHEDULER_CONFIG = "scheduler_config.json"


@dataclass
class Components:
    """Everything the sampler needs. Apply with
    `unet.apply({"params": params["unet"]}, sample_nchw, timesteps, encoder_hidden_states)`.

    unet: cfgbasin_jax.models.unet.UNet2DConditionModel (linen module, dtype set; the same parameter
        tree as diffusers' FlaxUNet2DConditionModel)
    vae: cfgbasin_jax.models.vae.AutoencoderKL (linen module; diffusers' FlaxAutoencoderKL parameter tree)
    text_encoder: transformers FlaxCLIPTextModule (bare linen module)
    tokenizer: transformers' CLIP tokenizer (:func:`cfgbasin_jax.models.tokenizer.load_tokenizer`)
    params: {"unet": tree, "vae": tree, "text_encoder": tree}, jnp arrays in `dtype`
    configs: {"unet": dict, "vae": dict, "text_encoder": dict}, the diffusers / transformers configs
    scheduler_config: dict, as in scheduler/scheduler_config.json
    dtype: jnp.dtype
    source: str, the path it was loaded from
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    params: dict
    configs: dict
    scheduler_config: dict
    dtype: Any
    source: str


def read_json(path: Path) -> dict:
    """A JSON object from `path`; ConversionError naming the file if absent or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"missing file {path}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: holds a {type(value).__name__}, not a JSON object")
    return value


def write_json(path: Path, value: dict) -> None:
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_model_config(folder: Path) -> dict:
    """`folder/config.json` (unet, vae or text_encoder)."""
    return read_json(Path(folder) / "config.json")


def read_scheduler_config(folder: Path) -> dict:
    """`folder/scheduler_config.json` of a scheduler/ subfolder."""
    return read_json(Path(folder) / SCHEDULER_CONFIG)


def load_tokenizer(folder: Path):
    """The CLIP tokenizer of a tokenizer/ folder, local files only (:mod:`cfgbasin_jax.models.tokenizer`)."""
    try:
        return T.load_tokenizer(folder)
    except T.TokenizerError as err:
        raise ConversionError(str(err)) from err


# ------------------------------------------------------------------------------------------------
# The pixel-space model format (the shipped toy, cfgbasin_jax/data/toy; written by training):
#     DST/model.json          {"format": "cfgbasin_jax.pixel_model", "format_version", "dtype",
#                              "configs": {"unet", "text_encoder", "scheduler"}, ...}
#     DST/params.safetensors  "unet/..." and "text_encoder/..." keys
#     DST/tokenizer/          CLIPTokenizer files
# A pixel-space model has no VAE (``Components.vae is None``): its UNet denoises RGB in [-1, 1].

PIXEL_FORMAT = "cfgbasin_jax.pixel_model"


def pixel_components(configs: dict, params: dict, tokenizer, dtype="float32", source: str = "toy") -> Components:
    """Components of a pixel-space model (``vae = None``) from configs {"unet", "text_encoder",
    "scheduler"} and params {"unet", "text_encoder"}."""
    dtype = resolve_dtype(dtype)
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float32).astype(dtype)), tree)  # noqa: E731
    return Components(
        unet=build_unet(configs["unet"], dtype),
        vae=None,
        text_encoder=build_text_encoder(configs["text_encoder"], dtype),
        tokenizer=tokenizer,
        params={"unet": cast(params["unet"]), "vae": None, "text_encoder": cast(params["text_encoder"])},
        configs={"unet": dict(configs["unet"]), "vae": None, "text_encoder": dict(configs["text_encoder"])},
        scheduler_config=dict(configs["scheduler"]),
        dtype=dtype,
        source=source,
    )


def save_pixel_model(components: Components, dst, save_dtype: str = "float16", extra: dict | None = None) -> Path:
    """Write a pixel-space model: model.json (format, configs), params.safetensors (``unet/...``,
    ``text_encoder/...`` keys in ``save_dtype``), tokenizer/."""
    from safetensors.numpy import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}[save_dtype]
    flat = {}
    for kind in ("unet", "text_encoder"):
        for key, value in traverse_util.flatten_dict(components.params[kind], sep="/").items():
            flat[f"{kind}/{key}"] = np.asarray(np.asarray(value, np.float32).astype(np_dtype))
    save_file(flat, str(dst / "params.safetensors"))
    meta = {
        "format": PIXEL_FORMAT,
        "format_version": 1,
        "dtype": save_dtype,
        "configs": {"unet": components.configs["unet"], "text_encoder": components.configs["text_encoder"], "scheduler": components.scheduler_config},
        **(extra or {}),
    }
    (dst / "model.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    save_tokenizer(components.tokenizer, dst / "tokenizer")
    return dst


def is_pixel_model(path) -> bool:
    """True when ``path`` holds a pixel-space model (model.json + params.safetensors)."""
    return (Path(path) / "model.json").is_file() and (Path(path) / "params.safetensors").is_file()


def load_pixel_components(path, dtype="float32") -> Components:
    """Components (``vae = None``) from a folder written by :func:`save_pixel_model`."""
    from safetensors.numpy import load_file

    path = Path(path)
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise ConversionError(f"{meta_path}: missing (not a pixel-space model folder)")
    meta = read_json(meta_path)
    if meta.get("format") != PIXEL_FORMAT:
        raise ConversionError(f"{meta_path}: format {meta.get('format')!r} is not {PIXEL_FORMAT!r}")
    weights = path / "params.safetensors"
    if not weights.is_file():
        raise ConversionError(f"missing file {weights} (the pixel model's params)")
    try:
        flat = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ConversionError(f"{weights}: cannot read ({err})") from err
    tree = traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep="/")
    return pixel_components(meta["configs"], tree, load_tokenizer(path / "tokenizer"), dtype=dtype, source=str(path))
