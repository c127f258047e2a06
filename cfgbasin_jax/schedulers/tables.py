"""Per-step coefficient tables of each scheduler kind, built once on the host (numpy): timesteps,
sigmas, DDIM / PNDM / Euler / DPM-Solver++ coefficients, as diffusers' ``set_timesteps`` computes them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from cfgbasin_jax.schedulers.config import PNDM_HISTORY, sigmas_from_alphas_cumprod

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
    train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
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


TABLE_BUILDERS = {"ddim": _ddim_tables, "pndm": _pndm_tables, "euler": _euler_tables, "dpm++2m": _dpm_tables}
