"""Scheduler configs: names, diffusers' config resolution and defaults, the noise schedule
(betas, alphas_cumprod, sigmas). Host-side numpy."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

SCHEDULER_NAMES = ("dpm++2m", "ddim", "euler", "pndm")

CLASS_TO_NAME = {
    "DPMSolverMultistepScheduler": "dpm++2m",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "PNDMScheduler": "pndm",
}
_NAME_TO_CLASS = {name: cls for cls, name in CLASS_TO_NAME.items()}

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
    return CLASS_TO_NAME.get(config.get("_class_name"), "dpm++2m")


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


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Karras sigma = sqrt((1 - a) / a), float32 [T]."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod).astype(np.float32)
