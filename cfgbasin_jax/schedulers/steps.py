"""The :class:`Scheduler` pytree and its pure step functions (``scale_model_input``, ``step``), and
the factory :func:`make_scheduler`."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import struct

from cfgbasin_jax.schedulers.config import (CLASS_TO_NAME, PNDM_HISTORY, SCHEDULER_NAMES, alphas_cumprod_from_betas,
                                            betas_from_config, resolve_config, scheduler_name_from_config)
from cfgbasin_jax.schedulers.tables import TABLE_BUILDERS

# --------------------------------------------------------------------------- the pytree


@struct.dataclass
class Scheduler:
    """One configured scheduler; pass it to jit as an argument (tables are pytree leaves).

    timesteps: [S] int32 (float32 for "euler", whose timesteps can be fractional), the
    model's timestep for each of the S model evaluations. init_noise_sigma: float32 []
    (scale for the initial N(0, 1) latents). tables: dict of float32 per-step arrays.
    """

    timesteps: jnp.ndarray
    init_noise_sigma: jnp.ndarray
    tables: dict
    kind: str = struct.field(pytree_node=False)
    num_train_timesteps: int = struct.field(pytree_node=False)
    num_inference_steps: int = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False)
    solver_order: int = struct.field(pytree_node=False)
    clip_sample_range: float | None = struct.field(pytree_node=False)

    @property
    def num_steps(self) -> int:
        """S, the number of model evaluations (PNDM: num_inference_steps + 1)."""
        return int(self.timesteps.shape[0])

    def init_state(self, sample: jnp.ndarray) -> dict:
        """Zeroed solver memory for latents of shape [B, C, H, W] (float64 for float64 latents, else
        float32)."""
        shape, dtype = jnp.shape(sample), working_dtype(sample)
        if self.kind == "dpm++2m":
            return {"x0_history": jnp.zeros((self.solver_order, *shape), dtype)}
        if self.kind == "pndm":
            return {
                "ets": jnp.zeros((PNDM_HISTORY, *shape), dtype),
                "first_sample": jnp.zeros(shape, dtype),
            }
        return {}

    def scale_model_input(self, state: dict, sample: jnp.ndarray, i) -> jnp.ndarray:
        """UNet input for step i: sample / sqrt(sigma^2 + 1) for Euler, else sample. [B,C,H,W]."""
        del state
        sample = jnp.asarray(sample, working_dtype(sample))
        if self.kind == "euler":
            return sample / self.tables["input_divisor"][i]
        return sample

    def step(self, state: dict, model_output: jnp.ndarray, i, sample: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
        """Advance sample [B,C,H,W] from step i to i+1 with the model output at step i. Computed in
        float64 for float64 samples, else float32 (the tables are float32 values either way)."""
        dtype = working_dtype(sample)
        sample = jnp.asarray(sample, dtype)
        model_output = jnp.asarray(model_output, dtype)
        i = jnp.asarray(i, jnp.int32)
        step_fn = {"ddim": _ddim_step, "pndm": _pndm_step, "euler": _euler_step, "dpm++2m": _dpm_step}[self.kind]
        return step_fn(self, state, model_output, i, sample)


def working_dtype(sample) -> jnp.dtype:
    """The dtype schedulers and the sampler compute in: float64 for float64 samples, float32 for
    any other dtype (bfloat16 and float16 latents are stepped in float32)."""
    return jnp.dtype(jnp.float64) if jnp.result_type(sample) == jnp.float64 else jnp.dtype(jnp.float32)


def _ddim_step(sched: Scheduler, state, model_output, i, sample):
    tab = sched.tables
    sqrt_a, sqrt_b = tab["sqrt_alpha"][i], tab["sqrt_one_minus_alpha"][i]
    if sched.prediction_type == "epsilon":
        x0 = (sample - sqrt_b * model_output) / sqrt_a
        eps = model_output
    elif sched.prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_b
    else:  # v_prediction
        x0 = sqrt_a * sample - sqrt_b * model_output
        eps = sqrt_a * model_output + sqrt_b * sample
    if sched.clip_sample_range is not None:
        x0 = jnp.clip(x0, -sched.clip_sample_range, sched.clip_sample_range)
    prev = tab["sqrt_alpha_prev"][i] * x0 + tab["sqrt_one_minus_alpha_prev"][i] * eps
    return prev, state


def _euler_step(sched: Scheduler, state, model_output, i, sample):
    tab = sched.tables
    return tab["sample_coef"][i] * sample + tab["output_coef"][i] * model_output, state


def _weighted_sum(weights: jnp.ndarray, stack: jnp.ndarray) -> jnp.ndarray:
    """sum_k weights[k] * stack[k]: [K] x [K, ...] -> [...]."""
    return jnp.tensordot(weights, stack, axes=1)


def _dpm_step(sched: Scheduler, state, model_output, i, sample):
    tab = sched.tables
    x0 = tab["x0_sample_coef"][i] * sample + tab["x0_output_coef"][i] * model_output
    history = jnp.concatenate([state["x0_history"][1:], x0[None]], axis=0)
    prev = tab["sample_coef"][i] * sample + _weighted_sum(tab["history_coefs"][i], history)
    return prev, {"x0_history": history}


def _pndm_step(sched: Scheduler, state, model_output, i, sample):
    tab = sched.tables
    ets, first_sample = state["ets"], state["first_sample"]
    appended = jnp.concatenate([ets[1:], model_output[None]], axis=0)
    ets = jnp.where(i == 1, ets, appended)  # step 1 does not store its output
    first_sample = jnp.where(i == 0, sample, first_sample)
    x = jnp.where(i == 1, first_sample, sample)
    combined = _weighted_sum(tab["history_coefs"][i], ets) + tab["current_coef"][i] * model_output
    prev = tab["sample_coef"][i] * x + tab["output_coef"][i] * combined
    return prev, {"ets": ets, "first_sample": first_sample}


# --------------------------------------------------------------------------- factory


def scheduler_tables(name: str | None, config: Mapping, num_inference_steps: int) -> tuple:
    """The host-side (numpy) half of :func:`make_scheduler`: validation and tables, no JAX backend.

    Returns (name, resolved config, timesteps [S], init_noise_sigma, tables). Raises ValueError for
    unknown names, unsupported options or a bad step count, exactly as make_scheduler does.
    """
    if name is None:
        if not isinstance(config, Mapping) or config.get("_class_name") not in CLASS_TO_NAME:
            found = config.get("_class_name") if isinstance(config, Mapping) else None
            raise ValueError(f"scheduler: name=None takes the scheduler from the config's _class_name, which is "
                             f"{found!r}; pass a name ({', '.join(SCHEDULER_NAMES)}) or a config with one of "
                             f"{', '.join(sorted(CLASS_TO_NAME))}")
        name = scheduler_name_from_config(config)
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    if not isinstance(config, Mapping):
        raise ValueError(f"scheduler config must be a mapping, got {type(config).__name__}")
    cfg = resolve_config(name, config)
    num_train = cfg["num_train_timesteps"]
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, (int, np.integer))
        or not 1 <= num_inference_steps <= num_train
    ):
        raise ValueError(
            f"num_inference_steps={num_inference_steps!r} must be an int in [1, num_train_timesteps={num_train}]"
        )
    alphas_cumprod = alphas_cumprod_from_betas(betas_from_config(cfg))
    timesteps, init_noise_sigma, tables = TABLE_BUILDERS[name](cfg, int(num_inference_steps), alphas_cumprod)
    return name, cfg, np.asarray(timesteps), init_noise_sigma, tables


def make_scheduler(name: str | None, config: Mapping, num_inference_steps: int) -> Scheduler:
    """Build the ``name`` scheduler (None: from ``config["_class_name"]``) for num_inference_steps.

    config: a diffusers scheduler config dict (e.g. scheduler/scheduler_config.json).
    Raises ValueError for unknown names, unsupported options or a bad step count.
    """
    name, cfg, timesteps, init_noise_sigma, tables = scheduler_tables(name, config, num_inference_steps)
    timestep_dtype = jnp.float32 if name == "euler" else jnp.int32
    clip = cfg.get("clip_sample_range") if name == "ddim" and cfg.get("clip_sample") else None
    return Scheduler(
        timesteps=jnp.asarray(timesteps, timestep_dtype),
        init_noise_sigma=jnp.asarray(init_noise_sigma, jnp.float32),
        tables={k: jnp.asarray(v, jnp.float32) for k, v in tables.items()},
        kind=name,
        num_train_timesteps=cfg["num_train_timesteps"],
        num_inference_steps=int(num_inference_steps),
        prediction_type=cfg["prediction_type"],
        solver_order=cfg.get("solver_order", 1) if name == "dpm++2m" else 1,
        clip_sample_range=None if clip is None else float(clip),
    )
