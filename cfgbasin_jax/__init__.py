"""cfgbasin_jax: transition-point classifier-free guidance for Stable Diffusion in JAX/Flax.

    import cfgbasin_jax as cb
    pipe = cb.load_pipeline("converted/sd14")            # or a diffusers-format folder
    res = pipe.generate(prompts, guidance=cb.guidance.dynamic_transition(1.0, 7.5))
    res.images, res.transition_index, res.noise_diff

The functional core: :mod:`cfgbasin_jax.method.sampler` (the scan), :mod:`cfgbasin_jax.method.detectors`
(transition detectors), :mod:`cfgbasin_jax.method.guidance` (schedules), :mod:`cfgbasin_jax.schedulers`,
and :mod:`cfgbasin_jax.method.registry` (the method registry).
"""

from pathlib import Path

from cfgbasin_jax import schedulers
from cfgbasin_jax.method import detectors
from cfgbasin_jax.method import guidance
from cfgbasin_jax.method import registry as methods
from cfgbasin_jax.method import sampler
from cfgbasin_jax.pipeline import GenerationResult, Pipeline

__version__ = "0.1.0"

TOY_MODEL = Path(__file__).resolve().parent / "data" / "toy"
"""The shipped toy model (a 16x16 pixel-space model trained here): ``load_pipeline(TOY_MODEL)``."""


def load_pipeline(path, dtype: str = "float32", unet_path=None, compilation_cache=True, revision=None,
                  variant=None) -> Pipeline:
    """Load a converted checkpoint directory, a diffusers-format SD folder, a Hugging Face Hub id
    ("CompVis/stable-diffusion-v1-4", downloaded on first use) or a pixel-space model folder such as
    the shipped toy (:data:`TOY_MODEL`).

    dtype: "float32" | "bfloat16" | "float16" for params and UNet/VAE/text-encoder compute; the
    scheduler state and detector signals stay float32. unet_path: a fine-tuned ``unet/`` folder
    (or a Hub id holding one) to swap in (the paper's ``--unet_path``). compilation_cache: JAX's
    persistent compilation cache, which this loader asks for by default (True: the default
    directory; a directory; or False: leave JAX's global configuration alone, as
    ``Pipeline(components)`` does; see :mod:`cfgbasin_jax.runtime.compile_cache`). revision: of a Hub
    id (a branch, tag or commit); variant: e.g. "fp16", the weight files downloaded and read where a
    folder has them (else the plain ones), as in diffusers (see :mod:`cfgbasin_jax.loading.hub`). A diffusers folder is converted once into the conversion cache
    and read from there afterwards (:mod:`cfgbasin_jax.loading.cache`; ``CFGBASIN_JAX_CONVERSION_CACHE=0``
    converts in memory).
    Params go straight to the device, one tensor at a time (see :mod:`cfgbasin_jax.models.checkpoint`).
    """
    from cfgbasin_jax.loading import hub
    from cfgbasin_jax.loading.cache import load_cached

    folder = hub.resolve(path, revision=revision, variant=variant)
    unet = None if unet_path is None else hub.resolve_unet(unet_path, revision=revision, variant=variant)
    return Pipeline(load_cached(folder, dtype=dtype, unet_path=unet, variant=variant), compilation_cache=compilation_cache)


__all__ = ["GenerationResult", "Pipeline", "TOY_MODEL", "detectors", "guidance", "load_pipeline", "methods", "sampler",
           "schedulers", "__version__"]
