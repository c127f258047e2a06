"""Weight conversion: diffusers-format Stable Diffusion folders -> cfgbasin_jax checkpoints.

`convert(src, dst)` reads a diffusers folder (safetensors or pickled .bin weights, sharded or not),
maps every PyTorch weight onto the Flax parameter tree and writes one directory holding an orbax
checkpoint of the UNet, VAE and text-encoder params with their configs, the tokenizer and the
scheduler config. `cfgbasin_jax.loading.load_components` reads that directory without torch.
"""

from cfgbasin_jax.convert.errors import ConversionError

__all__ = ["ConversionError", "convert"]


def convert(src, dst, dtype="float32", unet_path=None, overwrite=False, log=None):
    """Convert the diffusers SD folder `src` (optionally with the UNet folder `unet_path` swapped in)
    into the converted-checkpoint directory `dst`, params stored in `dtype`. Returns dst as a Path.

    Nothing is written at `dst` unless the whole conversion succeeds; `dst` may not be, contain or
    lie inside `src` or `unet_path`, and `overwrite` replaces only a converted directory (see
    :func:`cfgbasin_jax.loading.save_components`, which also describes ``log``).
    """
    # Imported here: cfgbasin_jax.loading imports this package's submodules.
    from cfgbasin_jax.loading import check_destination, load_components, save_components

    sources = [src, unet_path]
    check_destination(dst, sources, overwrite)  # fail before the (slow) load; save re-checks
    components = load_components(src, dtype=dtype, unet_path=unet_path)
    return save_components(components, dst, overwrite=overwrite, sources=sources, log=log)
