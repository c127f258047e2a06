"""cfgbasin_jax: transition-point classifier-free guidance for Stable Diffusion in JAX/Flax.

    import cfgbasin_jax as cb
    pipe = cb.load_pipeline("converted/sd14")            # or a diffusers-format folder
    res = pipe.generate(prompts, guidance=cb.guidance.dynamic_transition(1.0, 7.5))
    res.images, res.transition_index, res.noise_diff
"""

from cfgbasin_jax import guidance
from cfgbasin_jax.pipeline import GenerationResult, Pipeline

__version__ = "0.1.0"


def load_pipeline(path, dtype: str = "float32", unet_path=None) -> Pipeline:
    """Load a converted checkpoint directory or a diffusers-format SD folder (converted in memory).

    dtype: "float32" | "bfloat16" | "float16" for params and UNet/VAE/text-encoder compute; the
    scheduler state and detector signals stay float32. unet_path: a fine-tuned ``unet/`` folder
    to swap in (the paper's ``--unet_path``).
    """
    from cfgbasin_jax.loading import load_components

    return Pipeline(load_components(path, dtype=dtype, unet_path=unet_path))


__all__ = ["GenerationResult", "Pipeline", "guidance", "load_pipeline", "__version__"]
