"""Read the parts of a diffusers-format Stable Diffusion folder.

    SRC/model_index.json            (optional here)
    SRC/unet/config.json + weights
    SRC/vae/config.json + weights
    SRC/text_encoder/config.json + weights
    SRC/tokenizer/vocab.json, merges.txt (or tokenizer.json), ...
    SRC/scheduler/scheduler_config.json
"""

from __future__ import annotations

import json
from pathlib import Path

from cfgbasin_jax.convert.errors import ConversionError
from cfgbasin_jax.convert.mapping import VAE_ATTENTION_ALIASES, lazy_flax_params, state_dict_to_flax, with_prefix
from cfgbasin_jax.convert.weights import read_component_state_dict

MODEL_FOLDERS = ("unet", "vae", "text_encoder")
SUBFOLDERS = MODEL_FOLDERS + ("tokenizer", "scheduler")
SCHEDULER_CONFIG = "scheduler_config.json"


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


def check_sd_folder(root: Path, subfolders=SUBFOLDERS) -> None:
    """ConversionError naming the first missing piece of a diffusers SD folder."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"{root}: not a directory")
    for name in subfolders:
        if not (root / name).is_dir():
            raise ConversionError(
                f"{root}: missing subfolder '{name}/' (a diffusers Stable Diffusion folder has "
                f"{', '.join(s + '/' for s in SUBFOLDERS)})"
            )


def read_model_config(folder: Path) -> dict:
    """`folder/config.json` (unet, vae or text_encoder)."""
    return read_json(Path(folder) / "config.json")


def read_scheduler_config(folder: Path) -> dict:
    """`folder/scheduler_config.json` of a scheduler/ subfolder."""
    return read_json(Path(folder) / SCHEDULER_CONFIG)


def load_tokenizer(folder: Path):
    """The CLIP tokenizer of a tokenizer/ folder, local files only (:mod:`cfgbasin_jax.models.tokenizer`)."""
    from cfgbasin_jax.models import tokenizer

    try:
        return tokenizer.load_tokenizer(folder)
    except tokenizer.TokenizerError as err:
        raise ConversionError(str(err)) from err


def _component_state(folder: Path, kind: str):
    """`folder`'s state dict (opened lazily) with the key prefix the mapping expects."""
    state = read_component_state_dict(Path(folder), kind)
    return with_prefix(state, "text_model") if kind == "text_encoder" else state


def _aliases(kind: str):
    return VAE_ATTENTION_ALIASES if kind == "vae" else None


def convert_weights(folder: Path, kind: str, target_shapes) -> dict:
    """Read `folder`'s PyTorch weights and map them onto the Flax tree `target_shapes` (float32 numpy)."""
    return state_dict_to_flax(_component_state(folder, kind), target_shapes, aliases=_aliases(kind))


def lazy_weights(folder: Path, kind: str, target_shapes, dtype) -> dict:
    """`folder`'s PyTorch weights as the Flax tree `target_shapes` of LazyLeaf in `dtype`: every key,
    shape and dtype is checked now, from the file headers; each tensor is read when its leaf is."""
    return lazy_flax_params(_component_state(folder, kind), target_shapes, dtype, aliases=_aliases(kind))
