"""Weight conversion: diffusers-format Stable Diffusion folders -> cfgbasin_jax parameter trees.

`sd_folder` reads a diffusers folder (safetensors or pickled .bin weights, sharded or not) and
`mapping` maps every PyTorch weight onto the Flax parameter tree. This package never imports the
loader: `cfgbasin_jax.models.loading.convert(src, dst)` (the `cfgbasin-convert` command) loads a folder
through it and writes one directory holding an orbax checkpoint (one file per tensor) of the UNet, VAE and text-encoder
params with their configs, the tokenizer and the scheduler config.
"""

from cfgbasin_jax.convert.errors import ConversionError

__all__ = ["ConversionError"]
