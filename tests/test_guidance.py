"""Guidance schedules and transition detectors against the official rules restated in plain Python."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgbasin_jax import guidance as G

from reference import causal_og_index, official_dtp_index, official_og_index

# ---------------------------------------------------------------- the state machines, run in a scan


@jax.jit
def _run_noise_diff(d):  # d [S, B] -> index [B]
    state = G.detector_init(-jnp.ones(d.shape[1], jnp.int32), jnp.full(d.shape[1], 2**30, jnp.int32))

    def body(st, xs):
        j, dj = xs
        return G.noise_diff_update(st, dj, j), None

    state, _ = jax.lax.scan(body, state, (jnp.arange(d.shape[0]), d))
    return state.index


@jax.jit
def _run_latent_cosine(c, fallback):  # c [S, B], fallback [B] -> index [B]
    state = G.detector_init(-jnp.ones(c.shape[1], jnp.int32), fallback)

    def body(st, xs):
        j, cj = xs
        return G.latent_cosine_update(st, cj, j), None

    state, _ = jax.lax.scan(body, state, (jnp.arange(c.shape[0]), c))
    steps = c.shape[0]
    return jnp.where(state.index < steps, state.index, -1)


HAND_MADE = {
    "monotone_down": [9, 8, 7, 6, 5, 4, 3, 2, 1, 0.5],
    "monotone_up": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    "min_at_1": [5, 1, 4, 3, 2, 3, 4, 5, 6, 7],
    "min_at_0": [1, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    "plateau_then_rise": [5, 4, 3, 3, 4, 5, 6, 7, 8, 9],
    "flat_bottom_plateau": [5, 4, 4, 4, 3, 4, 5, 6, 7, 8],
    "several_minima": [9, 7, 5, 6, 4, 5, 3, 8, 9, 9],
    "min_at_end": [9, 8, 7, 6, 5, 4, 3, 2, 1, 2],
    "all_equal": [3] * 10,
}


@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_noise_diff_rule_hand_made(name):
    d = np.asarray(HAND_MADE[name], np.float32)
    got = int(_run_noise_diff(jnp.asarray(d)[:, None])[0])
    want = official_dtp_index(d)
    assert got == (-1 if want is None else want)


def test_noise_diff_branches_hit():
    """The hand-made set covers: none, a transition at 2 (minimum at 1), plateau (no strict min
    at the plateau), several minima (first wins), a minimum at the last-but-one step. The library's
    detector gives the stated index in each case (the oracle too)."""
    want = {"monotone_down": None, "monotone_up": None, "all_equal": None, "min_at_1": 2,
            "plateau_then_rise": None,  # 3 == 3 is no strict minimum, and 4 > 3 == 3 is neither
            "flat_bottom_plateau": 5, "several_minima": 3, "min_at_end": 9}
    d = np.asarray([HAND_MADE[k] for k in want], np.float32).T  # [S, B]
    got = np.asarray(_run_noise_diff(jnp.asarray(d))).tolist()
    assert got == [-1 if w is None else w for w in want.values()]
    assert {k: official_dtp_index(np.asarray(HAND_MADE[k], float)) for k in want} == want


@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_latent_cosine_rules_hand_made(name):
    c = np.asarray(HAND_MADE[name], np.float32)
    assert G.latent_cosine_transition_index(c) == official_og_index(c)
    for fallback in (None, 0, 3, 5, 9, 10):
        f = jnp.asarray([2**30 if fallback is None else fallback], jnp.int32)
        got = int(_run_latent_cosine(jnp.asarray(c)[:, None], f)[0])
        want = causal_og_index(c, fallback)
        assert got == (-1 if want is None else want), fallback


@pytest.mark.parametrize("c, want", [
    ([5, 1, 4, 3, 2, 3], 4),  # min at 1 and a second: the second
    ([5, 1, 4, 5, 6, 7], 1),  # min at 1 only
    ([1, 2, 3, 4, 5, 6, 7], 5),  # none: fallback 5
    ([9, 8, 7, 5, 6, 4, 8], 3),  # first of several
])
def test_latent_cosine_official_branches(c, want):
    assert G.latent_cosine_transition_index(c) == want
    assert official_og_index(c) == want


def test_detectors_random_batches_match_official():
    rng = np.random.default_rng(0)
    # coarse values make plateaus and ties common
    d = rng.integers(0, 6, size=(25, 64)).astype(np.float32)
    got = np.asarray(_run_noise_diff(jnp.asarray(d)))
    want = [official_dtp_index(d[:, b]) for b in range(d.shape[1])]
    assert got.tolist() == [-1 if w is None else w for w in want]
    fallback = rng.integers(0, 30, size=d.shape[1]).astype(np.int32)
    got_c = np.asarray(_run_latent_cosine(jnp.asarray(d), jnp.asarray(fallback)))
    want_c = [causal_og_index(d[:, b], int(fallback[b])) for b in range(d.shape[1])]
    assert got_c.tolist() == [-1 if w is None else w for w in want_c]
    assert [G.latent_cosine_transition_index(d[:, b]) for b in range(d.shape[1])] == [
        official_og_index(d[:, b]) for b in range(d.shape[1])
    ]


def test_nan_signal_never_transitions():
    d = np.array([5, 4, np.nan, 5, 6, 7], np.float32)
    assert official_dtp_index(d) is None
    assert int(_run_noise_diff(jnp.asarray(d)[:, None])[0]) == -1


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


def applied_scales(g, timesteps):
    before, after, switch = G.plan_one(g, timesteps, 1000)
    return np.where(np.arange(len(timesteps)) >= switch, after, before)


@pytest.mark.parametrize("t", [981, 501, 1, 500, 0, 999])
def test_static_transition_rule(t):
    """before while the step's timestep > t, after from the step whose timestep is <= t. t = 981,
    501 and 1 are on the grid (there `<` and `<=` differ), 500 between two steps, 0 and 999 outside."""
    assert (t in SD_TIMESTEPS) == (t in (981, 501, 1))
    want = [0.0 if ts > t else 7.5 for ts in SD_TIMESTEPS]
    np.testing.assert_array_equal(applied_scales(G.static_transition(t, 0.0, 7.5), SD_TIMESTEPS), want)


def test_og_static_transition_with_shaped_after():
    t = 641  # on the grid
    assert t in SD_TIMESTEPS
    want = [-2.0 if ts > t else official_shape("linear", 7.5, ts) for ts in SD_TIMESTEPS]
    got = applied_scales(G.static_transition(t, -2.0, 7.5, shape_after="linear"), SD_TIMESTEPS)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_plan_stacks_per_sample_and_rejects_mixed():
    ts = (301, 500, 701)  # 301 and 701 on the grid
    gs = [G.static_transition(t, 0.0, 7.5) for t in ts]
    p = G.plan(gs, 3, SD_TIMESTEPS)
    assert p.before.shape == (3, 50) and p.detector == "fixed"
    first_at_or_below = [next(j for j, step_t in enumerate(SD_TIMESTEPS) if step_t <= t) for t in ts]
    assert first_at_or_below == [34, 25, 14]
    assert list(p.switch_index) == first_at_or_below
    with pytest.raises(ValueError, match="mix"):
        G.plan([G.constant(7.5), G.dynamic_transition()], 2, SD_TIMESTEPS)
    with pytest.raises(ValueError, match="2 schedules for 3"):
        G.plan(gs[:2], 3, SD_TIMESTEPS)


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
    assert g.fallback == G.LATENT_COSINE_FALLBACK_INDEX and g.detector == "latent_cosine"
    assert G.plan(g, 2, SD_TIMESTEPS).switch_index.tolist() == [5, 5]
    never = G.dynamic_transition(-7.5, 7.5, signal="latent_cosine", mode="causal", fallback=None)
    assert G.plan(never, 1, SD_TIMESTEPS).switch_index.tolist() == [50]
    exact = G.dynamic_transition(-7.5, 7.5, signal="latent_cosine")
    assert exact.fallback is None and exact.two_pass and exact.detector == "fixed"
    assert G.dynamic_transition().detector == "noise_diff"
