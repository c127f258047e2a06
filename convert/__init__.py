"""Weight conversion: diffusers-format Stable Diffusion folders -> cfgbasin_jax parameter trees.

`weights` reads PyTorch weight files (safetensors or pickled .bin, sharded or not), `mapping` maps
every PyTorch weight onto the Flax parameter tree, `sd_folder` reads a diffusers folder and
`sd_folder.convert(src, dst)` (the `cfgbasin-convert` command) streams it into a converted directory
(:mod:`cfgbasin_jax.models.converted`). `sscd` converts SSCD's TorchScript checkpoints. This package
imports :mod:`cfgbasin_jax.models` and never the loaders above it (:mod:`cfgbasin_jax.loading`).
"""

from cfgbasin_jax.models.errors import ConversionError

__all__ = ["ConversionError"]
