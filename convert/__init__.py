"""Weight conversion: diffusers-format Stable Diffusion folders -> cfgbasin_jax checkpoints.

`convert(src, dst)` reads a diffusers folder (safetensors or pickled .bin weights, sharded or not),
maps every PyTorch weight onto the Flax parameter tree and writes one directory holding an orbax
checkpoint of the UNet, VAE and text-encoder params with their configs, the tokenizer and the
scheduler config. `cfgbasin_jax.loading.load_components` reads that directory without torch.
"""

from cfgbasin_jax.convert.errors import ConversionError

__all__ = ["ConversionError", "convert"]


def convert(src, dst, dtype="float32", unet_path=None, overwrite=False):
    """Convert the diffusers SD folder `src` (optionally with the UNet folder `unet_path` swapped in)
    into the converted-checkpoint directory `dst`, params stored in `dtype`. Returns dst as a Path.

    Nothing is written at `dst` unless the whole conversion succeeds.
    """
    # Imported here: cfgbasin_jax.loading imports this package's submodules.
    from pathlib import Path

    from cfgbasin_jax.loading import load_components, save_components

    if Path(dst).exists() and not overwrite:  # fail before the (slow) load; save re-checks
        raise ConversionError(f"{Path(dst).absolute()} already exists (use overwrite=True / --overwrite to replace it)")
    # Streamed: every weight is checked from the file headers here, then read, laid out, cast and
    # written one tensor at a time by save_components (never two copies of the model in memory).
    components = load_components(src, dtype=dtype, unet_path=unet_path, lazy=True)
    return save_components(components, dst, overwrite=overwrite)
