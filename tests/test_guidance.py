"""Guidance schedules and plans against the official rules restated in plain Python (the transition
detectors themselves: test_detectors.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgbasin_jax.method import detectors as D
from cfgbasin_jax.method import guidance as G

# ---------------------------------------------------------------- schedules

SD_TIMESTEPS = np.arange(981, 0, -20)  # 50 DPM/PNDM-style leading timesteps 981, 961, ..., 1


def official_shape(shape, g, t):
    if shape == "static":
        return g
    if shape == "linear":
        return g * (1 - t / 1000)
    if shape == "invlinear":
        return g * t / 1000
    if shape == "cosine":
        return g * (math.cos(math.pi * t / 1000) + 1)
    if shape == "sine":
        return g * (math.sin(math.pi * t / 1000 - math.pi / 2) + 1)
    if shape == "v_shape":
        return official_shape("linear" if t > 500 else "invlinear", g, t)
    if shape == "a_shape":
        return official_shape("invlinear" if t > 500 else "linear", g, t)
    raise AssertionError(shape)


@pytest.mark.parametrize("shape", G.SHAPES)
def test_cfg_shapes_match_formula(shape):
    ts = np.array([999, 981, 700, 501, 500, 499, 250, 1, 0])
    got = G.shaped_scale(shape, 7.5, ts)
    want = [official_shape(shape, 7.5, int(t)) for t in ts]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _applied(p: G.Plan) -> np.ndarray:
    """[B,S] scale of a fixed-switch plan: after from the switch step on."""
    steps = np.arange(p.before.shape[1])
    return np.where(steps[None] >= np.asarray(p.detector.index)[:, None], p.after, p.before)


def _first_below(t):  # plain restatement: the first step whose timestep is <= t
    return next((j for j, ts in enumerate(SD_TIMESTEPS) if ts <= t), len(SD_TIMESTEPS))


@pytest.mark.parametrize("t", [981, 501, 1, 500, 0, 999])
def test_static_transition_rule(t):
    """before while the step's timestep > t, after from the step whose timestep is <= t. t = 981,
    501 and 1 are on the grid (there `<` and `<=` differ), 500 between two steps, 0 and 999 outside."""
    assert (t in SD_TIMESTEPS) == (t in (981, 501, 1))
    p = G.plan(G.static_transition(t, 0.0, 7.5), 1, SD_TIMESTEPS)
    np.testing.assert_array_equal(_applied(p)[0], [0.0 if ts > t else 7.5 for ts in SD_TIMESTEPS])


def test_og_static_transition_with_shaped_after():
    t = 641  # on the grid
    assert t in SD_TIMESTEPS
    p = G.plan(G.static_transition(t, -2.0, 7.5, shape_after="linear"), 1, SD_TIMESTEPS)
    want = [-2.0 if ts > t else official_shape("linear", 7.5, ts) for ts in SD_TIMESTEPS]
    np.testing.assert_allclose(_applied(p)[0], want, rtol=1e-6)


def test_plan_stacks_per_sample_and_rejects_mixed():
    gs = [G.static_transition(t, 0.0, 7.5) for t in (300, 500, 700)]
    p = G.plan(gs, 3, SD_TIMESTEPS)
    assert p.before.shape == (3, 50) and isinstance(p.detector, D.FixedSwitch)
    assert p.detector.index.tolist() == [_first_below(t) for t in (300, 500, 700)]
    with pytest.raises(ValueError, match="mix"):
        G.plan([G.constant(7.5), G.dynamic_transition()], 2, SD_TIMESTEPS)
    with pytest.raises(ValueError, match="2 schedules for 3"):
        G.plan(gs[:2], 3, SD_TIMESTEPS)


def test_builders_take_arrays_and_tracers():
    """One value per sample from an array; jnp scalars; the whole plan traced inside jit."""
    p = G.plan(G.constant(np.array([1.0, 3.0, 7.5])), 3, SD_TIMESTEPS)
    np.testing.assert_array_equal(p.before[:, 0], [1.0, 3.0, 7.5])
    p = G.plan(G.static_transition(jnp.int32(500), jnp.float32(0.0), 7.5), 2, SD_TIMESTEPS)
    assert np.asarray(p.detector.index).tolist() == [_first_below(500)] * 2
    p = G.plan(G.static_transition(np.array([300, 700]), 0.0, 7.5), 2, SD_TIMESTEPS)
    assert np.asarray(p.detector.index).tolist() == [_first_below(300), _first_below(700)]

    @jax.jit
    def traced(t, s):
        p = G.plan(G.static_transition(t, s, 7.5), 2, SD_TIMESTEPS)
        return p.before, p.detector.index

    before, index = traced(jnp.int32(650), jnp.float32(-2.0))
    assert np.all(np.asarray(before) == -2.0) and np.asarray(index).tolist() == [_first_below(650)] * 2
    assert int(G.timestep_to_index(jnp.asarray(SD_TIMESTEPS), jnp.int32(0))) == len(SD_TIMESTEPS)  # never
    assert np.asarray(G.timestep_to_index(SD_TIMESTEPS, np.array([981, 980]))).tolist() == [0, 1]
    with pytest.raises(ValueError, match="2 per-sample values"):
        G.plan(G.constant(np.array([1.0, 2.0])), 3, SD_TIMESTEPS)
    with pytest.raises(ValueError, match="integer"):
        G.static_transition(jnp.float32(500.0), 0.0, 7.5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: G.constant(float("nan")), "finite"),
        (lambda: G.static_transition(500, float("inf"), 7.5), "finite"),
        (lambda: G.static_transition(500, 0.0, 7.5, shape_before="zigzag"), "shape_before"),
        (lambda: G.dynamic_transition(signal="loss"), "signal"),
        (lambda: G.dynamic_transition(mode="fast"), "mode"),
        (lambda: G.dynamic_transition(signal="latent_cosine", mode="causal", fallback=-1), "fallback"),
        (lambda: G.dynamic_transition(signal="latent_cosine", mode="exact", fallback=5), "fallback"),
        (lambda: G.per_step([1.0, float("nan")]), "finite"),
        (lambda: G.plan(G.static_transition(1000, 0.0, 7.5), 1, SD_TIMESTEPS), r"outside \[0, 1000\)"),
        (lambda: G.plan(G.static_transition(-1, 0.0, 7.5), 1, SD_TIMESTEPS), "outside"),
        (lambda: G.plan(G.per_step(np.ones(10)), 1, SD_TIMESTEPS), "length 10"),
        (lambda: G.plan(G.dynamic_transition(), 1, SD_TIMESTEPS[:2]), "at least 3 steps"),
    ],
)
def test_bad_guidance_is_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_causal_fallback_defaults_to_the_official_index():
    g = G.dynamic_transition(-7.5, 7.5, signal="latent_cosine", mode="causal")
    det = G.plan(g, 2, SD_TIMESTEPS).detector
    assert g.fallback == G.LATENT_COSINE_FALLBACK_INDEX and isinstance(det, D.LatentCosineMinimum)
    assert det.fallback.tolist() == [5, 5]
    never = G.dynamic_transition(-7.5, 7.5, signal="latent_cosine", mode="causal", fallback=None)
    assert G.plan(never, 1, SD_TIMESTEPS).detector.fallback.tolist() == [50]
    exact = G.dynamic_transition(-7.5, 7.5, signal="latent_cosine")
    det = G.plan(exact, 1, SD_TIMESTEPS).detector
    assert exact.fallback is None and isinstance(det, D.TwoPass) and det.passes == 2
    assert isinstance(G.plan(G.dynamic_transition(), 1, SD_TIMESTEPS).detector, D.NoiseDiffMinimum)
    with pytest.raises(ValueError, match="precision"):
        G.dynamic_transition(signal="latent_cosine", precision="float128")
