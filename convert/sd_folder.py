"""Read a diffusers-format Stable Diffusion folder, and convert it into a converted directory.

    SRC/model_index.json            (optional here)
    SRC/unet/config.json + weights
    SRC/vae/config.json + weights
    SRC/text_encoder/config.json + weights
    SRC/tokenizer/vocab.json, merges.txt (or tokenizer.json), ...
    SRC/scheduler/scheduler_config.json

:func:`load_sd_folder` maps every weight onto our Flax trees in memory (safetensors need no torch;
``.bin`` weights import it); :func:`convert` streams one into a converted directory
(``cfgbasin-convert``); :func:`folder_fingerprint` is its cheap fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path

from cfgbasin_jax.convert.mapping import VAE_ATTENTION_ALIASES, lazy_flax_params, state_dict_to_flax, with_prefix
from cfgbasin_jax.convert import weight_names
from cfgbasin_jax.convert.weights import WEIGHT_STEMS, find_weight_file, read_component_state_dict
from cfgbasin_jax.models import checkpoint
from cfgbasin_jax.models import fingerprint as fp
from cfgbasin_jax.models.builders import build_module, check_compatible, component_param_shapes, resolve_dtype
from cfgbasin_jax.models.components import (COMPONENTS, Components, load_tokenizer, read_model_config,
                                            read_scheduler_config)
from cfgbasin_jax.models.converted import check_destination, save_components
from cfgbasin_jax.models.errors import ConversionError

MODEL_FOLDERS = COMPONENTS
SUBFOLDERS = MODEL_FOLDERS + ("tokenizer", "scheduler")


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


def _component_state(folder: Path, kind: str, variant: str | None = None):
    """`folder`'s state dict (opened lazily; the ``variant``'s weights where present) with the key
    prefix the mapping expects."""
    state = read_component_state_dict(Path(folder), kind, variant)
    return with_prefix(state, "text_model") if kind == "text_encoder" else state


def _aliases(kind: str):
    return VAE_ATTENTION_ALIASES if kind == "vae" else None


def convert_weights(folder: Path, kind: str, target_shapes) -> dict:
    """Read `folder`'s PyTorch weights and map them onto the Flax tree `target_shapes` (float32 numpy)."""
    return state_dict_to_flax(_component_state(folder, kind), target_shapes, aliases=_aliases(kind))


def lazy_weights(folder: Path, kind: str, target_shapes, dtype, variant: str | None = None) -> dict:
    """`folder`'s PyTorch weights as the Flax tree `target_shapes` of LazyLeaf in `dtype`: every key,
    shape and dtype is checked now, from the file headers; each tensor is read when its leaf is."""
    return lazy_flax_params(_component_state(folder, kind, variant), target_shapes, dtype, aliases=_aliases(kind))


def component_weights(folder: Path, kind: str, module, dtype, lazy: bool = False, variant: str | None = None) -> dict:
    """Params of one diffusers model subfolder in `dtype`, checked from the file headers first: as
    LazyLeafs (`lazy`, read when written) or read tensor by tensor straight to the device. variant:
    e.g. "fp16", the weights read where the folder has them (:func:`find_weight_file`)."""
    params = lazy_weights(folder, kind, component_param_shapes(kind, module), dtype, variant)
    return params if lazy else checkpoint.materialize(params)


def load_unet_folder(folder, dtype="float32", variant: str | None = None) -> tuple:
    """(UNet2DConditionModel, config dict, params) from a diffusers `unet/` folder, e.g. a
    fine-tuned `checkpoint-20000/unet`."""
    dtype = resolve_dtype(dtype)
    config = read_model_config(Path(folder))
    module = build_module("unet", config, dtype)
    return module, config, component_weights(Path(folder), "unet", module, dtype, variant=variant)


def load_sd_folder(path, dtype="float32", unet_path=None, lazy: bool = False, variant: str | None = None) -> Components:
    """Components of the diffusers SD folder ``path``, its weights mapped in memory.

    unet_path: a diffusers `unet/` folder whose UNet replaces the folder's (which may then be absent).
    lazy: params stay LazyLeafs (checked, not read) until save_components writes them one at a time
    (streamed conversion). variant: e.g. "fp16", the weight files read where a folder has them (else
    the plain ones), as diffusers' ``from_pretrained(variant=...)``. Raises ConversionError naming
    the file, key or setting at fault."""
    dtype = resolve_dtype(dtype)
    root = Path(path)
    swap = unet_path is not None
    check_sd_folder(root, tuple(s for s in SUBFOLDERS if not (swap and s == "unet")))
    folders = {kind: root / kind for kind in COMPONENTS}
    if swap:
        folders["unet"] = check_unet_path(unet_path)
    configs = {kind: read_model_config(folder) for kind, folder in folders.items()}
    check_compatible(configs)
    modules = {kind: build_module(kind, configs[kind], dtype) for kind in COMPONENTS}
    params = {kind: component_weights(folders[kind], kind, modules[kind], dtype, lazy, variant) for kind in COMPONENTS}
    return Components(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=load_tokenizer(root / "tokenizer"),
        params=params,
        configs=configs,
        scheduler_config=read_scheduler_config(root / "scheduler"),
        dtype=dtype,
        source=str(path),
    )


def check_unet_path(unet_path) -> Path:
    """``unet_path`` as a Path; ConversionError unless it is a directory."""
    if not Path(unet_path).is_dir():
        raise ConversionError(f"unet_path {unet_path}: not a directory (need a diffusers unet/ folder)")
    return Path(unet_path)


def convert(src, dst, dtype="float32", unet_path=None, overwrite=False, log=None, variant: str | None = None) -> Path:
    """Convert the diffusers SD folder ``src`` (optionally with the UNet folder ``unet_path`` swapped
    in) into the converted-checkpoint directory ``dst``, params stored in ``dtype``, from the
    ``variant``'s weight files where present (:func:`load_sd_folder`). Returns dst as a Path
    (``cfgbasin-convert``).

    Nothing is written at ``dst`` unless the whole conversion succeeds; ``dst`` may not be, contain or
    lie inside ``src`` or ``unet_path``, and ``overwrite`` replaces only a converted directory (see
    :func:`cfgbasin_jax.models.converted.save_components`, which also describes ``log``).
    """
    sources = [src, unet_path]
    check_destination(dst, sources, overwrite)  # fail before the (slow) load; save re-checks
    # Streamed: every weight is checked from the file headers here, then read, laid out, cast and
    # written one tensor at a time by save_components (never two copies of the model in memory).
    components = load_sd_folder(src, dtype=dtype, unet_path=unet_path, lazy=True, variant=variant)
    return save_components(components, dst, overwrite=overwrite, sources=sources, log=log)


# ------------------------------------------------------------------------------------ fingerprints


def weight_files(folder, kind: str, variant: str | None = None) -> list[Path]:
    """The config and the weight file(s) the loader reads from a diffusers component folder."""
    folder = Path(folder)
    chosen = find_weight_file(folder, WEIGHT_STEMS[kind], variant)
    out = [folder / "config.json", chosen]
    if weight_names.parse(chosen.name).kind == "index":
        try:
            shards = set(json.loads(chosen.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = set()
        out += [folder / s for s in sorted(shards) if (folder / s).is_file()]
    return [p for p in out if p.is_file()]


def folder_fingerprint(path, mtimes: bool = False, variant: str | None = None) -> str:
    """``"files:<hex>"`` of the files the loader reads from the diffusers SD folder ``path`` (with the
    ``variant``'s weights where present; cheap: see :mod:`cfgbasin_jax.models.fingerprint`;
    ``mtimes``: large files' modification times too)."""
    root = Path(path)
    files = []
    for kind in COMPONENTS:
        if (root / kind).is_dir():
            files += weight_files(root / kind, kind, variant)
    for sub in ("tokenizer", "scheduler"):
        if (root / sub).is_dir():
            files += fp.visible_files(root / sub)
    if (root / "model_index.json").is_file():
        files.append(root / "model_index.json")
    return fp.files_fingerprint(root, files, mtimes)


def unet_fingerprint(folder, mtimes: bool = False, variant: str | None = None) -> str:
    """The fingerprint of a diffusers ``unet/`` folder (``--unet_path``)."""
    return fp.files_fingerprint(folder, weight_files(folder, "unet", variant), mtimes)
