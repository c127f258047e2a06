"""Diffusion schedulers as pure JAX step functions (DPM-Solver++ 2M, DDIM, Euler, PNDM/PLMS).

Each scheduler is a :class:`Scheduler` pytree: per-step coefficient tables are array
children (built once on the host with numpy), the solver kind and options are static
fields. A sampler carries ``state = scheduler.init_state(latents)`` through one
``jax.lax.scan`` over the step index ``i`` (int32, traced) and calls::

    x_in = scheduler.scale_model_input(state, sample, i)
    eps = unet(x_in, scheduler.timesteps[i])
    sample, state = scheduler.step(state, eps, i, sample)

for ``i = 0 .. S-1`` in order (the multistep buffers assume the scan starts at 0).

The PyTorch schedulers of diffusers 0.39 (``scheduling_*.py``) are the reference; every
table reproduces their ``set_timesteps`` / ``step`` rules. Config resolution reproduces
``Target.from_config(Source.from_config(raw).config)`` of diffusers 0.39: keys present in
the raw config are used, keys that are missing (or listed in ``_use_default_values``)
take the *target* class's defaults.
"""

from cfgbasin_jax.schedulers.config import (PNDM_HISTORY, SCHEDULER_DEFAULTS, SCHEDULER_NAMES, alphas_cumprod_from_betas,
                                            betas_from_config, resolve_config, scheduler_name_from_config)
from cfgbasin_jax.schedulers.steps import Scheduler, make_scheduler, scheduler_tables, working_dtype

__all__ = [
    "PNDM_HISTORY", "SCHEDULER_DEFAULTS", "SCHEDULER_NAMES", "Scheduler", "alphas_cumprod_from_betas",
    "betas_from_config", "make_scheduler", "resolve_config", "scheduler_name_from_config", "scheduler_tables",
    "working_dtype",
]
