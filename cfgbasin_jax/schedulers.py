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

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULER_NAMES = ("dpm++2m", "ddim", "euler", "pndm")

_CLASS_TO_NAME = {
    "DPMSolverMultistepScheduler": "dpm++2m",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "PNDMScheduler": "pndm",
}
_NAME_TO_CLASS = {name: cls for cls, name in _CLASS_TO_NAME.items()}

_NEG_INF = float("-inf")

# __init__ defaults of the diffusers 0.39 PyTorch classes (only the keys that exist there).
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "PNDMScheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    },
    "DDIMScheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "DPMSolverMultistepScheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": _NEG_INF,
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
    "EulerDiscreteScheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
}

# Options that change the algorithm and are not implemented: key -> value(s) that are fine.
_UNSUPPORTED_UNLESS: dict[str, dict[str, tuple]] = {
    "PNDMScheduler": {"skip_prk_steps": (True,)},
    "DDIMScheduler": {"thresholding": (False, None), "rescale_betas_zero_snr": (False, None)},
    "DPMSolverMultistepScheduler": {
        "thresholding": (False, None),
        "algorithm_type": ("dpmsolver++", "deis"),  # diffusers maps "deis" to "dpmsolver++"
        "use_karras_sigmas": (False, None),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "use_lu_lambdas": (False, None),
        "use_flow_sigmas": (False, None),
        "lambda_min_clipped": (_NEG_INF, None),
        "variance_type": (None,),
        "rescale_betas_zero_snr": (False, None),
        "use_dynamic_shifting": (False, None),
    },
    "EulerDiscreteScheduler": {
        "interpolation_type": ("linear",),
        "use_karras_sigmas": (False, None),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "timestep_type": ("discrete",),
        "rescale_betas_zero_snr": (False, None),
    },
}

_PREDICTION_TYPES = {
    "pndm": ("epsilon", "v_prediction"),
    "ddim": ("epsilon", "v_prediction", "sample"),
    "dpm++2m": ("epsilon", "v_prediction", "sample"),
    "euler": ("epsilon", "v_prediction", "sample"),
}
_SPACINGS = ("leading", "linspace", "trailing")

PNDM_HISTORY = 4  # PLMS keeps the last 4 model outputs


# --------------------------------------------------------------------------- config


def scheduler_name_from_config(config: Mapping) -> str:
    """Our scheduler name for a diffusers config's ``_class_name`` (default ``"dpm++2m"``)."""
    return _CLASS_TO_NAME.get(config.get("_class_name"), "dpm++2m")


def resolve_config(name: str, config: Mapping) -> dict[str, Any]:
    """Options that diffusers' ``Target.from_config(Source.from_config(config).config)`` ends up with.

    Keys present in ``config`` win unless listed in its ``_use_default_values``; every other
    key takes the target class's default. Raises ValueError for unimplemented options.
    """
    class_name = _NAME_TO_CLASS[name]
    defaults_used = set(config.get("_use_default_values") or ())
    resolved = dict(SCHEDULER_DEFAULTS[class_name])
    for key in resolved:
        if key in config and key not in defaults_used:
            resolved[key] = config[key]
    for key, allowed in _UNSUPPORTED_UNLESS[class_name].items():
        value = resolved[key]
        if not any(value == ok or (value is ok) for ok in allowed):
            raise ValueError(
                f"scheduler config: {key}={value!r} is not supported by the JAX {name!r} scheduler "
                f"(supported: {', '.join(repr(v) for v in allowed if v is not None) or 'None'})"
            )
    if resolved["prediction_type"] not in _PREDICTION_TYPES[name]:
        raise ValueError(
            f"scheduler config: prediction_type={resolved['prediction_type']!r} is not supported by the "
            f"{name!r} scheduler (supported: {', '.join(_PREDICTION_TYPES[name])})"
        )
    if resolved["timestep_spacing"] not in _SPACINGS:
        raise ValueError(
            f"scheduler config: timestep_spacing={resolved['timestep_spacing']!r} is not supported "
            f"(supported: {', '.join(_SPACINGS)})"
        )
    if resolved.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise ValueError(
            f"scheduler config: final_sigmas_type={resolved['final_sigmas_type']!r} must be 'zero' or 'sigma_min'"
        )
    if name == "dpm++2m":
        if resolved["solver_order"] not in (1, 2, 3):
            raise ValueError(f"scheduler config: solver_order={resolved['solver_order']!r} must be 1, 2 or 3")
        if resolved["solver_type"] in ("logrho", "bh1", "bh2"):  # diffusers maps these to midpoint
            resolved["solver_type"] = "midpoint"
        if resolved["solver_type"] not in ("midpoint", "heun"):
            raise ValueError(
                f"scheduler config: solver_type={resolved['solver_type']!r} must be 'midpoint' or 'heun'"
            )
        resolved["algorithm_type"] = "dpmsolver++"
    for key, minimum in (("num_train_timesteps", 2), ("steps_offset", 0)):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"scheduler config: {key}={value!r} must be an int >= {minimum}")
    return resolved


# --------------------------------------------------------------------------- noise schedule


def _torch_like_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """float32 linspace the way torch's CPU kernel forms it (from both ends), to ~1 ulp."""
    start32, end32 = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(num - 1))
    idx = np.arange(num)
    from_start = start32 + step * idx.astype(np.float32)
    from_end = end32 - step * (num - idx - 1).astype(np.float32)
    return np.where(idx < num // 2, from_start, from_end).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """squaredcos_cap_v2 betas (Nichol & Dhariwal), float32 [T]."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, np.float32)


def betas_from_config(cfg: Mapping) -> np.ndarray:
    """float32 betas [num_train_timesteps] from trained_betas or beta_schedule."""
    num_train = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
        if betas.shape != (num_train,):
            raise ValueError(
                f"scheduler config: trained_betas has shape {betas.shape}, expected ({num_train},) "
                "from num_train_timesteps"
            )
        return betas
    schedule = cfg["beta_schedule"]
    if schedule == "linear":
        return _torch_like_linspace_f32(cfg["beta_start"], cfg["beta_end"], num_train)
    if schedule == "scaled_linear":
        root = _torch_like_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, num_train)
        return (root * root).astype(np.float32)
    if schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train)
    raise ValueError(
        f"scheduler config: beta_schedule={schedule!r} is not supported "
        "(supported: linear, scaled_linear, squaredcos_cap_v2)"
    )


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """float32 cumulative product of (1 - beta) [T], accumulated in float64 like torch's CPU cumprod."""
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Karras sigma = sqrt((1 - a) / a), float32 [T]."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod).astype(np.float32)


# --------------------------------------------------------------------------- timesteps


def _leading_trailing_linspace(cfg: Mapping, num_steps: int, *, ascending: bool) -> np.ndarray:
    """DDIM/PNDM-style timesteps (float64 values, integral) [num_steps]."""
    num_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, num_steps).round()
    elif spacing == "leading":
        ts = (np.arange(0, num_steps) * (num_train // num_steps)).round() + cfg["steps_offset"]
    else:  # trailing
        ts = np.round(np.arange(num_train, 0, -num_train / num_steps))[::-1] - 1
    return ts if ascending else ts[::-1].copy()


def _dpm_timesteps(cfg: Mapping, num_steps: int) -> np.ndarray:
    """DPMSolverMultistep timesteps (int64) [num_steps]; lambda_min_clipped is -inf."""
    num_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    last = num_train
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, num_steps + 1) * (last // (num_steps + 1))).round()[::-1][:-1] + cfg["steps_offset"]
    else:
        ts = np.arange(last, 0, -num_train / num_steps).round() - 1
    return ts.astype(np.int64)


def _euler_timesteps(cfg: Mapping, num_steps: int) -> np.ndarray:
    """EulerDiscrete timesteps (float32, possibly fractional) [num_steps]."""
    num_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ts = (np.arange(0, num_steps) * (num_train // num_steps)).round()[::-1].astype(np.float32)
        return ts + np.float32(cfg["steps_offset"])
    ts = np.arange(num_train, 0, -num_train / num_steps).round().astype(np.float32)
    return ts - np.float32(1)


def _final_sigma(cfg: Mapping, alphas_cumprod: np.ndarray) -> np.float32:
    if cfg["final_sigmas_type"] == "sigma_min":
        return np.sqrt((np.float32(1.0) - alphas_cumprod[0]) / alphas_cumprod[0]).astype(np.float32)
    return np.float32(0.0)


def _interp_sigmas(cfg: Mapping, timesteps: np.ndarray, alphas_cumprod: np.ndarray) -> np.ndarray:
    """Sigmas at (fractional) timesteps plus the final sigma, float32 [S+1]."""
    train_sigmas = _sigmas_from_alphas_cumprod(alphas_cumprod)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    return np.concatenate([sigmas, [_final_sigma(cfg, alphas_cumprod)]]).astype(np.float32)


def _check_timestep_range(name: str, values: np.ndarray, num_train: int) -> None:
    if values.size and (values.max() > num_train - 1 or values.min() < 0):
        raise ValueError(
            f"{name} scheduler: timesteps {values.min()}..{values.max()} fall outside [0, {num_train - 1}] "
            "(check steps_offset / timestep_spacing / num_inference_steps)"
        )


# --------------------------------------------------------------------------- per-kind tables


def _ddim_tables(cfg: Mapping, num_steps: int, alphas_cumprod: np.ndarray):
    """DDIM (eta=0): sqrt(alpha_t), sqrt(1-alpha_t), sqrt(alpha_prev), sqrt(1-alpha_prev), each [S]."""
    timesteps = _leading_trailing_linspace(cfg, num_steps, ascending=False).astype(np.int64)
    _check_timestep_range("ddim", timesteps, cfg["num_train_timesteps"])
    final_alpha = np.float32(1.0) if cfg["set_alpha_to_one"] else alphas_cumprod[0]
    prev = timesteps - cfg["num_train_timesteps"] // num_steps
    alpha_t = alphas_cumprod[timesteps]
    alpha_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final_alpha).astype(np.float32)
    one = np.float32(1.0)
    tables = {
        "sqrt_alpha": np.sqrt(alpha_t),
        "sqrt_one_minus_alpha": np.sqrt(one - alpha_t),
        "sqrt_alpha_prev": np.sqrt(alpha_prev),
        "sqrt_one_minus_alpha_prev": np.sqrt(one - alpha_prev),
    }
    return timesteps, np.float32(1.0), tables


def _pndm_tables(cfg: Mapping, num_steps: int, alphas_cumprod: np.ndarray):
    """PLMS (skip_prk_steps) tables for S = num_steps + 1 model evaluations (one timestep repeats).

    Per step: ``prev = sample_coef * x + output_coef * combined`` where ``x`` is the current
    sample (the first sample at step 1), ``combined = sum_k history_coefs[k] * ets[k] +
    current_coef * model_output`` and ``ets`` is the 4-slot model-output history (oldest first)
    after this step's update.
    """
    num_train = cfg["num_train_timesteps"]
    ascending = _leading_trailing_linspace(cfg, num_steps, ascending=True)
    plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
    timesteps = plms.astype(np.int64)
    _check_timestep_range("pndm", timesteps, num_train)
    final_alpha = 1.0 if cfg["set_alpha_to_one"] else float(alphas_cumprod[0])
    stride = num_train // num_steps
    plms_weights = {
        1: [1.0],
        2: [-1 / 2, 3 / 2],
        3: [5 / 12, -16 / 12, 23 / 12],
        4: [-9 / 24, 37 / 24, -59 / 24, 55 / 24],
    }
    num_evals = len(timesteps)
    sample_coef = np.zeros(num_evals)
    output_coef = np.zeros(num_evals)
    history_coefs = np.zeros((num_evals, PNDM_HISTORY))
    current_coef = np.zeros(num_evals)
    for i, t in enumerate(timesteps.tolist()):
        if i == 1:  # second evaluation re-steps from the first sample with the averaged output
            t_cur, t_prev = t + stride, t
            history_coefs[i, -1], current_coef[i] = 0.5, 0.5
        else:
            t_cur, t_prev = t, t - stride
            n_history = 1 if i == 0 else min(i, PNDM_HISTORY)
            history_coefs[i, PNDM_HISTORY - n_history :] = plms_weights[n_history]
        if t_cur > num_train - 1:
            raise ValueError(f"pndm scheduler: timestep {t_cur} exceeds num_train_timesteps - 1")
        a_t = float(alphas_cumprod[t_cur])
        a_prev = float(alphas_cumprod[t_prev]) if t_prev >= 0 else final_alpha
        denom = a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev)
        s_coef, o_coef = math.sqrt(a_prev / a_t), -(a_prev - a_t) / denom
        if cfg["prediction_type"] == "v_prediction":  # eps = sqrt(a) * v + sqrt(1 - a) * x
            s_coef, o_coef = s_coef + o_coef * math.sqrt(1 - a_t), o_coef * math.sqrt(a_t)
        sample_coef[i], output_coef[i] = s_coef, o_coef
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    tables = {
        "sample_coef": f32(sample_coef),
        "output_coef": f32(output_coef),
        "history_coefs": f32(history_coefs),
        "current_coef": f32(current_coef),
    }
    return timesteps, np.float32(1.0), tables


def _euler_tables(cfg: Mapping, num_steps: int, alphas_cumprod: np.ndarray):
    """Euler: ``prev = sample_coef * x + output_coef * out`` [S] (folded in float64), the sigmas
    [S+1] (last one final) and the model-input divisor sqrt(sigma^2+1) [S].

    Folding avoids the float32 cancellation of ``x + (x - x0) / sigma * dt`` when sigma_next
    << sigma (e.g. squaredcos_cap_v2, sigma_max ~ 2e4), where PyTorch's float32 loses ~1e-4.
    """
    timesteps = _euler_timesteps(cfg, num_steps)
    _check_timestep_range("euler", timesteps, cfg["num_train_timesteps"])
    sigmas = _interp_sigmas(cfg, timesteps, alphas_cumprod)
    max_sigma = sigmas.max()
    if cfg["timestep_spacing"] in ("linspace", "trailing"):
        init_noise_sigma = max_sigma
    else:
        init_noise_sigma = np.sqrt(max_sigma * max_sigma + np.float32(1.0))
    divisor = np.sqrt(sigmas[:-1] * sigmas[:-1] + np.float32(1.0)).astype(np.float32)
    sig, sig_next = sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)
    dt = sig_next - sig
    prediction = cfg["prediction_type"]
    if prediction == "epsilon":  # derivative = eps
        sample_coef, output_coef = np.ones_like(sig), dt
    elif prediction == "sample":  # derivative = (x - x0) / sigma
        sample_coef, output_coef = sig_next / sig, -dt / sig
    else:  # v: x0 = -sigma/sqrt(sigma^2+1) v + x/(sigma^2+1)
        sample_coef = 1.0 + dt * sig / (sig * sig + 1.0)
        output_coef = dt / np.sqrt(sig * sig + 1.0)
    tables = {
        "sigmas": sigmas,
        "input_divisor": divisor,
        "sample_coef": np.asarray(sample_coef, np.float32),
        "output_coef": np.asarray(output_coef, np.float32),
    }
    return timesteps, np.float32(init_noise_sigma), tables


def _dpm_step_coefs(sigmas: np.ndarray, i: int, order: int, solver_type: str) -> tuple[float, np.ndarray]:
    """DPM-Solver++ update of step i: x_next = a * x + sum_k c[k] * x0_history[k], newest last.

    Returns (a, c[order]) from float64 maths on the float32 sigma table.
    """

    def alpha_sigma(sig: float) -> tuple[float, float]:
        alpha = 1.0 / math.sqrt(sig * sig + 1.0)
        return alpha, sig * alpha

    def lam(sig: float) -> float:  # log(alpha) - log(sigma_t) = -log(sig)
        return math.inf if sig == 0.0 else -math.log(sig)

    s = [float(v) for v in sigmas]
    alpha_t, sigma_t = alpha_sigma(s[i + 1])
    _, sigma_s0 = alpha_sigma(s[i])
    h = lam(s[i + 1]) - lam(s[i])
    phi = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1
    a = sigma_t / sigma_s0
    c = np.zeros(order)
    # Vectors over (m0, m1, m2) = (newest, previous, older).
    d0 = np.array([1.0, 0.0, 0.0])
    if order == 1:
        coef = -alpha_t * phi * d0
    elif order == 2:
        h0 = lam(s[i]) - lam(s[i - 1])
        d1 = (d0 - np.array([0.0, 1.0, 0.0])) * (h / h0)
        if solver_type == "midpoint":
            coef = -alpha_t * phi * d0 - 0.5 * alpha_t * phi * d1
        else:
            coef = -alpha_t * phi * d0 + alpha_t * (phi / h + 1.0) * d1
    else:
        h0, h1 = lam(s[i]) - lam(s[i - 1]), lam(s[i - 1]) - lam(s[i - 2])
        r0, r1 = h0 / h, h1 / h
        d1_0 = np.array([1.0, -1.0, 0.0]) / r0
        d1_1 = np.array([0.0, 1.0, -1.0]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        coef = (
            -alpha_t * phi * d0
            + alpha_t * (phi / h + 1.0) * d1
            - alpha_t * ((phi + h) / h**2 - 0.5) * d2
        )
    for k in range(order):  # history slot order-1 is m0 (newest)
        c[order - 1 - k] = coef[k]
    return a, c


def _dpm_tables(cfg: Mapping, num_steps: int, alphas_cumprod: np.ndarray):
    """DPM-Solver++ multistep tables: x0 = x0_sample_coef*x + x0_output_coef*out; update coefs."""
    timesteps = _dpm_timesteps(cfg, num_steps)
    _check_timestep_range("dpm++2m", timesteps, cfg["num_train_timesteps"])
    sigmas = _interp_sigmas(cfg, timesteps, alphas_cumprod)
    order = cfg["solver_order"]
    num_evals = len(timesteps)
    short = cfg["lower_order_final"] and num_evals < 15
    sample_coef = np.zeros(num_evals)
    history_coefs = np.zeros((num_evals, order))
    for i in range(num_evals):
        lower_order_final = i == num_evals - 1 and (
            cfg["euler_at_final"] or short or cfg["final_sigmas_type"] == "zero"
        )
        lower_order_second = i == num_evals - 2 and short
        done = min(i, order)  # lower_order_nums before this step
        if order == 1 or done < 1 or lower_order_final:
            step_order = 1
        elif order == 2 or done < 2 or lower_order_second:
            step_order = 2
        else:
            step_order = 3
        a, c = _dpm_step_coefs(sigmas, i, step_order, cfg["solver_type"])
        sample_coef[i] = a
        history_coefs[i, order - step_order :] = c
    sig = sigmas[:-1].astype(np.float64)
    alpha = 1.0 / np.sqrt(sig * sig + 1.0)
    sigma_t = sig * alpha
    prediction = cfg["prediction_type"]
    if prediction == "epsilon":  # x0 = (x - sigma_t * eps) / alpha
        x0_sample, x0_output = 1.0 / alpha, -sigma_t / alpha
    elif prediction == "v_prediction":  # x0 = alpha * x - sigma_t * v
        x0_sample, x0_output = alpha, -sigma_t
    else:
        x0_sample, x0_output = np.zeros_like(sig), np.ones_like(sig)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    tables = {
        "sigmas": sigmas,
        "x0_sample_coef": f32(x0_sample),
        "x0_output_coef": f32(x0_output),
        "sample_coef": f32(sample_coef),
        "history_coefs": f32(history_coefs),
    }
    return timesteps, np.float32(1.0), tables


_TABLE_BUILDERS = {"ddim": _ddim_tables, "pndm": _pndm_tables, "euler": _euler_tables, "dpm++2m": _dpm_tables}


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
        if not isinstance(config, Mapping) or config.get("_class_name") not in _CLASS_TO_NAME:
            found = config.get("_class_name") if isinstance(config, Mapping) else None
            raise ValueError(f"scheduler: name=None takes the scheduler from the config's _class_name, which is "
                             f"{found!r}; pass a name ({', '.join(SCHEDULER_NAMES)}) or a config with one of "
                             f"{', '.join(sorted(_CLASS_TO_NAME))}")
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
    timesteps, init_noise_sigma, tables = _TABLE_BUILDERS[name](cfg, int(num_inference_steps), alphas_cumprod)
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
