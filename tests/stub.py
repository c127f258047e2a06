"""A stub denoiser for unit tests of the sampler and the detectors: no model files, compiles in
seconds, smooth and nonlinear (so gradients and finite differences are meaningful), and with a
noise difference ||eps_c - eps_u|| whose shape over t has a local minimum (so DTP switches)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cfgbasin_jax import schedulers

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon",
}
C, HW, L, D = 2, 4, 3, 5


def unet(params, x, t, context):
    """eps = tanh(w x + bias), bias = (context features) * (1.2 + sin(6 t / 1000)): [N,C,h,w]."""
    u = jnp.asarray(t, x.dtype) / 1000.0
    features = jnp.einsum("nld,dc->nc", context.astype(x.dtype), params["proj"]) / context.shape[1]
    bias = features[:, :, None, None] * (1.2 + jnp.sin(6.0 * u))[:, None, None, None]
    return jnp.tanh(params["w"] * x + bias)


def params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(0.3, jnp.float32), "proj": jnp.asarray(rng.standard_normal((D, C)), jnp.float32)}


def inputs(batch: int, steps: int = 12, seed: int = 0) -> tuple:
    """(scheduler, x0 [B,C,h,w] scaled by init_noise_sigma, cond [B,L,D], uncond [B,L,D])."""
    rng = np.random.default_rng(seed)
    sched = schedulers.make_scheduler("ddim", SCHEDULER_CONFIG, steps)
    x0 = jnp.asarray(rng.standard_normal((batch, C, HW, HW)), jnp.float32) * sched.init_noise_sigma
    cond = jnp.asarray(rng.standard_normal((batch, L, D)) * np.linspace(0.5, 2.0, batch)[:, None, None], jnp.float32)
    uncond = jnp.zeros((batch, L, D), jnp.float32)
    return sched, x0, cond, uncond
