"""Load a model from wherever it is: a converted directory, a diffusers SD folder (converted in
memory) or a pixel-space model folder (the shipped toy), and tell models apart by fingerprint.

This layer sits above :mod:`cfgbasin_jax.models` (the formats we write) and :mod:`cfgbasin_jax.convert`
(the diffusers folders we read); the pipeline and the command lines load through it.
"""

from __future__ import annotations

from pathlib import Path

from cfgbasin_jax.convert import sd_folder
from cfgbasin_jax.models.builders import build_module, check_compatible, resolve_dtype
from cfgbasin_jax.models.components import (COMPONENTS, PIXEL_FORMAT, Components, is_pixel_model,
                                            load_pixel_components, read_model_config)
from cfgbasin_jax.models.converted import (FORMAT_FILE, check_marker, converted_fingerprint, is_converted,
                                           load_converted)
from cfgbasin_jax.models.errors import ConversionError

__all__ = [
    "COMPONENTS", "Components", "ConversionError", "FORMAT_FILE", "PIXEL_FORMAT", "is_converted", "is_pixel_model",
    "load_components", "load_unet_folder", "model_fingerprint", "unet_fingerprint",
]

load_unet_folder = sd_folder.load_unet_folder


def unet_fingerprint(folder, variant: str | None = None) -> str:
    """The fingerprint of a diffusers ``unet/`` folder (of the files read with ``variant``)."""
    return sd_folder.unet_fingerprint(folder, variant=variant)


def load_components(path, dtype="float32", unet_path=None, lazy: bool = False, variant: str | None = None) -> Components:
    """Components from a converted directory, a diffusers SD folder (converted in memory) or a
    pixel-space model folder (the shipped toy).

    dtype: 'float32' | 'bfloat16' | 'float16' for both params and module computation.
    unet_path: a diffusers `unet/` folder whose UNet replaces the pipeline's.
    lazy: params read from diffusers weight files stay LazyLeafs (checked, not read) until
    save_components writes them one at a time (streamed conversion).
    variant: e.g. "fp16", the diffusers weight files read where a folder has them (else the plain ones).
    Raises ConversionError naming the file, key or setting at fault.
    """
    dtype = resolve_dtype(dtype)
    root = Path(path)
    if not root.is_dir():
        raise ConversionError(f"{root}: not a directory")
    if is_pixel_model(root):
        if unet_path is not None:
            raise ConversionError(f"{root}: a pixel-space model takes no unet_path (got {unet_path})")
        return load_pixel_components(root, dtype)
    if not is_converted(root):
        return sd_folder.load_sd_folder(root, dtype, unet_path=unet_path, lazy=lazy, variant=variant)
    if unet_path is None:
        return load_converted(root, dtype)
    # A converted model with a fine-tuned UNet swapped in: check the swap before the (slow) restore.
    check_marker(root)
    unet_folder = sd_folder.check_unet_path(unet_path)
    configs = {kind: read_model_config(root / kind) for kind in COMPONENTS}
    configs["unet"] = read_model_config(unet_folder)
    check_compatible(configs)
    components = load_converted(root, dtype)
    unet = build_module("unet", configs["unet"], dtype)
    components.params["unet"] = sd_folder.component_weights(unet_folder, "unet", unet, dtype, lazy, variant)
    components.unet, components.configs["unet"] = unet, configs["unet"]
    return components


def model_fingerprint(path, variant: str | None = None) -> str:
    """The fingerprint of a converted directory or a diffusers-format SD folder (of the files read
    with ``variant``; cheap: see :mod:`cfgbasin_jax.models.fingerprint`)."""
    return converted_fingerprint(path) if is_converted(path) else sd_folder.folder_fingerprint(path, variant=variant)
