"""JAX schedulers vs the PyTorch diffusers 0.39 schedulers (the oracle).

Every trajectory runs under jax.jit + lax.scan with a traced step index, the way the
sampler runs it, and is compared step by step with the PyTorch scheduler driven by the
same model function: model_output = noise[i] + 0.1 * scaled_model_input.
"""

from __future__ import annotations

import inspect

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cfgbasin_jax import schedulers as S
from cfgbasin_jax.models import tiny

# the scheduler configs SD 1.4 and SD 2.1 ship (one copy, shared with the tiny test models)
SD14 = tiny.SD1_SCHEDULER
SD21 = tiny.SD2_SCHEDULER
_NO_CLIP_KEY = {k: v for k, v in SD14.items() if k != "clip_sample"}
CONFIGS = {
    "sd14": SD14,
    "sd21": SD21,
    "sd14_trailing": {**SD14, "timestep_spacing": "trailing"},
    "sd21_linspace": {**SD21, "timestep_spacing": "linspace"},
    "sd14_leading_v": {**SD14, "timestep_spacing": "leading", "prediction_type": "v_prediction"},
    "sd14_sigma_min": {**SD14, "final_sigmas_type": "sigma_min"},
    "sd21_sigma_min": {**SD21, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"},
    "sd14_default_clip": _NO_CLIP_KEY,  # DDIM then clips x0 (its class default)
    "sd14_sample_pred": {**SD14, "prediction_type": "sample"},
    "linear_betas": {**SD14, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine_betas": {**SD21, "beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": True},
    "cosine_eps": {**SD14, "beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {**SD14, "trained_betas": (np.linspace(1e-4, 0.02, 1000) ** 1.1).tolist()},
    "dpm_heun": {**SD14, "solver_type": "heun"},
    "dpm_order1": {**SD21, "solver_order": 1},
    "dpm_order3": {**SD14, "solver_order": 3},
    "dpm_euler_final": {**SD14, "euler_at_final": True, "final_sigmas_type": "sigma_min"},
    "dpm_no_lof": {**SD21, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    "dpm_own_class": {**SD14, "_class_name": "DPMSolverMultistepScheduler", "timestep_spacing": "leading"},
}
TORCH_CLASSES = {
    "dpm++2m": diffusers.DPMSolverMultistepScheduler,
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "pndm": diffusers.PNDMScheduler,
}
SHAPE = (2, 4, 8, 8)
OUTPUT_MIX = 0.1
REL_TOL = 1e-5
# squaredcos_cap_v2 has sigma_max ~ 2e4: PyTorch Euler's v-prediction step
# x + (x - x0) / sigma * dt cancels ~3500x in the first step, so its float32 result is
# ~2e-4 off; we fold the step in float64 and match the float64 oracle instead.
FLOAT32_ILL_CONDITIONED = {("euler", "cosine_betas")}

MAIN_CASES = [(kind, cfg, n) for kind in S.SCHEDULER_NAMES for cfg in ("sd14", "sd21") for n in (10, 50)]
VARIANT_CASES = [
    (kind, cfg, n)
    for kind in S.SCHEDULER_NAMES
    for cfg, n in [
        ("sd14_trailing", 10),
        ("sd21_linspace", 50),
        ("sd14_leading_v", 25),
        ("linear_betas", 10),
        ("cosine_betas", 10),
        ("cosine_eps", 10),
        ("trained_betas", 10),
    ]
] + [
    ("ddim", "sd14_default_clip", 10),
    ("ddim", "sd14_sample_pred", 10),
    ("dpm++2m", "sd14_sample_pred", 10),
    ("euler", "sd14_sample_pred", 10),
    ("euler", "sd14_sigma_min", 10),
    ("dpm++2m", "sd14_sigma_min", 10),
    ("dpm++2m", "sd14_sigma_min", 20),
    ("dpm++2m", "sd21_sigma_min", 20),
    ("dpm++2m", "dpm_heun", 10),
    ("dpm++2m", "dpm_heun", 20),
    ("dpm++2m", "dpm_order1", 10),
    ("dpm++2m", "dpm_order3", 10),
    ("dpm++2m", "dpm_order3", 20),
    ("dpm++2m", "dpm_euler_final", 20),
    ("dpm++2m", "dpm_no_lof", 10),
    ("dpm++2m", "dpm_own_class", 50),
    ("dpm++2m", "sd14", 1),
    ("pndm", "sd14", 1),
    ("pndm", "sd14", 2),
    ("pndm", "sd14", 3),
    ("ddim", "sd14", 1),
    ("euler", "sd14", 1),
]

def torch_scheduler(kind: str, raw: dict):
    """What a diffusers user gets: Target.from_config(Source.from_config(raw).config)."""
    source_cls = getattr(diffusers, raw["_class_name"])
    return TORCH_CLASSES[kind].from_config(source_cls.from_config(raw).config)


def torch_trajectory(sched, num_steps: int, x_unit: np.ndarray, noise: np.ndarray, dtype=torch.float32):
    """PyTorch denoising loop -> (scaled model inputs [S,...], samples after each step [S,...]).

    dtype=float64 also widens the scheduler's tables (alphas_cumprod, sigmas) after
    set_timesteps, so the same float32 noise schedule is stepped without float32 rounding
    (some PyTorch steps still cast the incoming sample to float32): the rounding-free oracle.
    """
    sched.set_timesteps(num_steps)
    x = (torch.from_numpy(x_unit) * sched.init_noise_sigma).to(dtype)
    if dtype == torch.float64:
        for table in ("alphas_cumprod", "final_alpha_cumprod", "sigmas"):
            if isinstance(getattr(sched, table, None), torch.Tensor):
                setattr(sched, table, getattr(sched, table).to(dtype))
    inputs, samples = [], []
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        model_output = torch.from_numpy(noise[i]).to(dtype) + OUTPUT_MIX * x_in
        x = sched.step(model_output, t, x).prev_sample
        inputs.append(x_in.numpy())
        samples.append(x.numpy())
    return np.stack(inputs), np.stack(samples)


@jax.jit
def jax_trajectory(sched: S.Scheduler, x_unit: jnp.ndarray, noise: jnp.ndarray):
    """The sampler's scan: -> (scaled model inputs [S,...], samples after each step [S,...])."""
    x = x_unit * sched.init_noise_sigma
    steps = jnp.arange(sched.num_steps, dtype=jnp.int32)

    def body(carry, step_inputs):
        sample, state = carry
        i, eps = step_inputs
        x_in = sched.scale_model_input(state, sample, i)
        model_output = eps + OUTPUT_MIX * x_in
        sample, state = sched.step(state, model_output, i, sample)
        return (sample, state), (x_in, sample)

    _, (inputs, samples) = jax.lax.scan(body, (x, sched.init_state(x)), (steps, noise))
    return inputs, samples


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Max over steps of max|ours - ref| / max|ref| (per step)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    axes = tuple(range(1, ref.ndim))
    per_step = np.abs(ours - ref).max(axis=axes) / np.maximum(np.abs(ref).max(axis=axes), 1e-30)
    return float(per_step.max())


def inputs_for(num_evals: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x_unit = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((num_evals, *SHAPE)).astype(np.float32)
    return x_unit, noise


def check_case(kind: str, cfg_name: str, num_steps: int) -> None:
    raw = CONFIGS[cfg_name]
    ref = torch_scheduler(kind, raw)
    ours = S.make_scheduler(kind, raw, num_steps)
    ref.set_timesteps(num_steps)
    # (1) timesteps and init_noise_sigma
    ref_ts = ref.timesteps.numpy()
    assert ours.timesteps.dtype == (jnp.float32 if kind == "euler" else jnp.int32)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref_ts)
    assert ours.num_steps == len(ref_ts)
    np.testing.assert_allclose(float(ours.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)
    # (2) the full trajectory, step by step
    x_unit, noise = inputs_for(len(ref_ts))
    our = jax.device_get(jax_trajectory(ours, jnp.asarray(x_unit), jnp.asarray(noise)))
    assert np.all(np.isfinite(our[1]))
    ref32 = torch_trajectory(torch_scheduler(kind, raw), num_steps, x_unit, noise, torch.float32)
    ref64 = torch_trajectory(torch_scheduler(kind, raw), num_steps, x_unit, noise, torch.float64)
    err32 = max(rel_err(our[0], ref32[0]), rel_err(our[1], ref32[1]))  # scaled inputs, samples
    err64 = max(rel_err(our[0], ref64[0]), rel_err(our[1], ref64[1]))
    torch_err32 = rel_err(ref32[1], ref64[1])
    print(f"{kind}/{cfg_name}/{num_steps}: vs torch32 {err32:.2e} vs torch64 {err64:.2e} "
          f"(torch32 vs torch64 {torch_err32:.2e})")
    assert err64 < REL_TOL, f"rel err vs float64 PyTorch {err64:.3g}"
    if (kind, cfg_name) in FLOAT32_ILL_CONDITIONED:
        assert torch_err32 > REL_TOL  # PyTorch's own float32 rounding exceeds the tolerance here
    else:
        assert err32 < REL_TOL, f"rel err vs float32 PyTorch {err32:.3g}"


@pytest.mark.parametrize("kind,cfg_name,num_steps", MAIN_CASES)
def test_matches_torch_on_sd_configs(kind, cfg_name, num_steps):
    check_case(kind, cfg_name, num_steps)


@pytest.mark.parametrize("kind,cfg_name,num_steps", VARIANT_CASES)
def test_matches_torch_on_variants(kind, cfg_name, num_steps):
    check_case(kind, cfg_name, num_steps)


# DDIM's last steps read alphas_cumprod[0] (prev_timestep == 0) and then final_alpha_cumprod
# (prev_timestep < 0: 1.0 with set_alpha_to_one) only with leading spacing and steps_offset 0.
DDIM_TO_ZERO = {"ddim_alpha_one_offset0": {**SD14, "set_alpha_to_one": True, "steps_offset": 0,
                                           "timestep_spacing": "leading"},
                "ddim_alpha_one_offset0_v": {**SD21, "set_alpha_to_one": True, "steps_offset": 0,
                                             "timestep_spacing": "leading"}}


@pytest.mark.parametrize("cfg_name", sorted(DDIM_TO_ZERO))
@pytest.mark.parametrize("num_steps", [10, 25])
def test_ddim_reaching_timestep_zero_matches_torch(cfg_name, num_steps, monkeypatch):
    """Issue 26: no tested config reached prev_timestep == 0. Here the timesteps end with
    (1000 // n, 0), so the last two steps go to alphas_cumprod[0] and to final_alpha_cumprod = 1."""
    monkeypatch.setitem(CONFIGS, cfg_name, DDIM_TO_ZERO[cfg_name])
    ref = torch_scheduler("ddim", DDIM_TO_ZERO[cfg_name])
    ref.set_timesteps(num_steps)
    assert ref.timesteps.tolist()[-2:] == [1000 // num_steps, 0] and float(ref.final_alpha_cumprod) == 1.0
    check_case("ddim", cfg_name, num_steps)


# ---------------------------------------------------------------------------- structure


def test_defaults_tables_match_diffusers_signatures():
    for class_name, defaults in S.SCHEDULER_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        torch_defaults = {k: p.default for k, p in params.items() if k != "self"}
        assert defaults == torch_defaults, class_name


@pytest.mark.parametrize("beta_cfg", ["sd14", "linear_betas", "cosine_betas", "trained_betas"])
def test_alphas_cumprod_match_torch(beta_cfg):
    raw = CONFIGS[beta_cfg]
    ref = torch_scheduler("ddim", raw).alphas_cumprod.numpy()
    ours = S.alphas_cumprod_from_betas(S.betas_from_config(S.resolve_config("ddim", raw)))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


def test_dpm_from_pndm_config_follows_diffusers_defaults_rule():
    """diffusers 0.39 drops source-class defaults (_use_default_values): DPM keeps linspace."""
    ours = S.make_scheduler("dpm++2m", SD14, 50)
    assert np.asarray(ours.timesteps)[:3].tolist() == [999, 979, 959]
    # The same through a config that already went through PyTorch (carries _use_default_values).
    torch_cfg = dict(diffusers.PNDMScheduler.from_config(SD14).config)
    assert "timestep_spacing" in torch_cfg["_use_default_values"]
    again = S.make_scheduler("dpm++2m", torch_cfg, 50)
    np.testing.assert_array_equal(np.asarray(again.timesteps), np.asarray(ours.timesteps))
    # An explicit key is honoured.
    leading = S.make_scheduler("dpm++2m", {**SD14, "timestep_spacing": "leading"}, 50)
    ref = torch_scheduler("dpm++2m", {**SD14, "timestep_spacing": "leading"})
    ref.set_timesteps(50)
    np.testing.assert_array_equal(np.asarray(leading.timesteps), ref.timesteps.numpy())


def test_ddim_default_clip_is_active():
    """The DDIM class default clip_sample=True changes the trajectory (so that case tests clipping)."""
    x_unit, noise = inputs_for(10)
    clipped = S.make_scheduler("ddim", CONFIGS["sd14_default_clip"], 10)
    plain = S.make_scheduler("ddim", SD14, 10)
    assert clipped.clip_sample_range == 1.0 and plain.clip_sample_range is None
    a = jax_trajectory(clipped, jnp.asarray(x_unit), jnp.asarray(noise))[1]
    b = jax_trajectory(plain, jnp.asarray(x_unit), jnp.asarray(noise))[1]
    assert float(jnp.abs(a - b).max()) > 1e-2


def test_pndm_has_repeated_timestep():
    ours = S.make_scheduler("pndm", SD14, 50)
    ts = np.asarray(ours.timesteps)
    assert ts.shape == (51,) and ts[:4].tolist() == [981, 961, 961, 941] and ts[-1] == 1


def test_scheduler_is_a_pytree_jit_argument_without_retrace():
    traces = []

    @jax.jit
    def first_step(sched, sample, eps):
        traces.append(1)
        state = sched.init_state(sample)
        return sched.step(state, eps, jnp.int32(0), sample)[0]

    x_unit, noise = inputs_for(1)
    for cfg in ("sd14", "linear_betas", "cosine_eps", "trained_betas"):  # only the tables differ
        first_step(S.make_scheduler("dpm++2m", CONFIGS[cfg], 10), x_unit, noise[0])
    assert len(traces) == 1
    leaves = jax.tree_util.tree_leaves(S.make_scheduler("pndm", SD14, 10))
    assert all(isinstance(leaf, jax.Array) for leaf in leaves) and len(leaves) == 6


def test_eager_python_loop_equals_scan():
    """step also works with a concrete Python int index, outside jit."""
    sched = S.make_scheduler("pndm", SD21, 10)
    x_unit, noise = inputs_for(sched.num_steps)
    _, scanned = jax_trajectory(sched, jnp.asarray(x_unit), jnp.asarray(noise))
    x = jnp.asarray(x_unit) * sched.init_noise_sigma
    state = sched.init_state(x)
    for i in range(sched.num_steps):
        x_in = sched.scale_model_input(state, x, i)
        x, state = sched.step(state, noise[i] + OUTPUT_MIX * x_in, i, x)
        np.testing.assert_allclose(np.asarray(x), np.asarray(scanned[i]), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- names and errors


def test_scheduler_name_from_config():
    assert S.scheduler_name_from_config(SD14) == "pndm"
    assert S.scheduler_name_from_config(SD21) == "ddim"
    assert S.scheduler_name_from_config({"_class_name": "EulerDiscreteScheduler"}) == "euler"
    assert S.scheduler_name_from_config({"_class_name": "DPMSolverMultistepScheduler"}) == "dpm++2m"
    assert S.scheduler_name_from_config({}) == "dpm++2m"
    assert S.scheduler_name_from_config({"_class_name": "LMSDiscreteScheduler"}) == "dpm++2m"
    assert S.make_scheduler(None, SD21, 10).kind == "ddim"
    assert S.make_scheduler(None, SD21, 10).prediction_type == "v_prediction"


@pytest.mark.parametrize("config, found", [({}, "None"), ({"_class_name": "LMSDiscreteScheduler"}, "'LMSDiscreteScheduler'")])
def test_no_scheduler_name_and_no_known_class_is_one_line(config, found):
    """name=None used to give DPM-Solver++ with defaults for a config without a known _class_name."""
    with pytest.raises(ValueError, match=rf"scheduler: name=None takes the scheduler from the config's _class_name, "
                                         rf"which is {found}; pass a name \(dpm\+\+2m, ddim, euler, pndm\)") as err:
        S.make_scheduler(None, config, 8)
    assert "\n" not in str(err.value)
    assert S.make_scheduler("ddim", config, 8).kind == "ddim"


def test_float64_samples_step_in_float64():
    with jax.enable_x64(True):
        sched = S.make_scheduler("dpm++2m", SD14, 10)
        x = jnp.ones((1, 4, 2, 2), jnp.float64) * (1 + 1e-12)
        state = sched.init_state(x)
        assert state["x0_history"].dtype == jnp.float64
        out, state = sched.step(state, x * 0.5, 0, x)
        assert out.dtype == jnp.float64 and state["x0_history"].dtype == jnp.float64
        assert sched.scale_model_input(state, x, 0).dtype == jnp.float64


@pytest.mark.parametrize(
    "name,overrides,match",
    [
        ("dpm++2m", {"use_karras_sigmas": True}, "use_karras_sigmas"),
        ("euler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
        ("dpm++2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ("dpm++2m", {"thresholding": True}, "thresholding"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("ddim", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("euler", {"timestep_type": "continuous"}, "timestep_type"),
        ("dpm++2m", {"lambda_min_clipped": -5.1}, "lambda_min_clipped"),
        ("dpm++2m", {"solver_order": 4}, "solver_order"),
        ("dpm++2m", {"solver_type": "rk4"}, "solver_type"),
        ("dpm++2m", {"final_sigmas_type": "none"}, "final_sigmas_type"),
        ("pndm", {"skip_prk_steps": False}, "skip_prk_steps"),
        ("pndm", {"prediction_type": "sample"}, "prediction_type"),
        ("ddim", {"prediction_type": "flow"}, "prediction_type"),
        ("ddim", {"timestep_spacing": "uniform"}, "timestep_spacing"),
        ("ddim", {"beta_schedule": "sigmoid"}, "beta_schedule"),
        ("ddim", {"trained_betas": [0.01] * 10}, "trained_betas"),
        ("euler", {"num_train_timesteps": 1.5}, "num_train_timesteps"),
        ("pndm", {"steps_offset": None}, "steps_offset"),
    ],
)
def test_unsupported_options_raise(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        S.make_scheduler(name, {**SD14, **overrides}, 10)


def test_bad_name_and_step_counts_raise():
    with pytest.raises(ValueError, match="dpm\\+\\+2m, ddim, euler, pndm"):
        S.make_scheduler("lms", SD14, 10)
    for bad in (0, -3, 1001, True, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            S.make_scheduler("ddim", SD14, bad)
    assert S.make_scheduler("ddim", {**SD14, "steps_offset": 0}, 1000).num_steps == 1000
    with pytest.raises(ValueError, match="steps_offset"):  # timestep 1000 would not exist
        S.make_scheduler("ddim", SD14, 1000)
