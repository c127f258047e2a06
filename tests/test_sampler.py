"""The sampler on a stub UNet (tests/stub.py): half skipping and its accounting, the [B,S] trace
layout, validation of the functional API, the sweep helper, and gradients against finite
differences (scales at 0, 1 and 7.5, text embeddings, initial noise) with default arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stub
from bench.reference import rel_err

from cfgbasin_jax.method import detectors as D
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import sampler as S

STEPS = 8
B = 2


@pytest.fixture(scope="module")
def batch():
    return stub.params(), *stub.inputs(B, STEPS)


def _loop(batch, before, after, detector=None, **kw):
    params, sched, x0, cond, uncond = batch
    return S.sample_loop(params, sched, x0, cond, uncond, before, after, detector, unet_fn=stub.unet, **kw)


def _full(value):
    return jnp.full((B, STEPS), value, jnp.float32)


# ------------------------------------------------------------------------------- the loop


def test_skipped_halves_equal_the_full_path_and_are_counted_per_sample(batch):
    stp = D.FixedSwitch(index=jnp.full((B,), 3, jnp.int32))
    skip = _loop(batch, _full(0.0), _full(7.5), stp)
    full = _loop(batch, _full(0.0), _full(7.5), stp, skip_halves=False)
    assert rel_err(skip.latents, full.latents) < 1e-6
    assert skip.branch.shape == (B, STEPS) and skip.branch[:, :3].tolist() == [[S.UNCOND_ONLY] * 3] * B
    assert skip.unet_evals.tolist() == [3 + 2 * (STEPS - 3)] * B and full.unet_evals.tolist() == [2 * STEPS] * B
    assert np.all(np.isnan(skip.noise_diff[:, :3])) and np.all(np.isfinite(skip.noise_diff[:, 3:]))
    one = _loop(batch, _full(1.0), _full(1.0))
    assert one.branch.tolist() == [[S.COND_ONLY] * STEPS] * B
    assert rel_err(one.latents, _loop(batch, _full(1.0), _full(1.0), skip_halves=False).latents) < 1e-6
    for name in ("noise_diff", "latent_cosine", "scale", "branch"):  # one layout: [B,S]
        assert getattr(skip, name).shape == (B, STEPS), name
    assert skip.transition_index.tolist() == [3, 3] and skip.transition_fallback.tolist() == [False, False]


def test_halves_needed_rule():
    f = lambda s, p=False: int(S.halves_needed(jnp.asarray(s, jnp.float32), jnp.asarray(p)))  # noqa: E731
    assert f([0.0, 0.0]) == S.UNCOND_ONLY
    assert f([1.0, 1.0]) == S.COND_ONLY
    assert f([0.0, 1.0]) == S.BOTH
    assert f([7.5]) == S.BOTH
    assert f([0.0], True) == S.BOTH


@pytest.mark.parametrize("bad, match", [
    (dict(before=_full(7.5).T), r"before must be \[B=2, S=8\]"),
    (dict(scheduler="ddim"), "scheduler must be a cfgbasin_jax.schedulers.Scheduler"),
    (dict(cond=jnp.zeros((3, 3, 5))), r"cond must be \[B=2,L,D\]"),
    (dict(detector="noise_diff"), "detector must be a cfgbasin_jax.method.detectors.Detector"),
])
def test_functional_api_validates_in_one_line(batch, bad, match):
    params, sched, x0, cond, uncond = batch
    args = dict(params=params, scheduler=sched, latents=x0, cond=cond, uncond=uncond, before=_full(7.5),
                after=_full(7.5), detector=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match) as err:
        S.sample_loop(**args, unet_fn=stub.unet)
    assert "\n" not in str(err.value)


def test_sweep_folds_points_into_the_batch(batch):
    params, sched, x0, cond, uncond = batch
    ts = np.asarray(sched.timesteps)
    points = [G.static_transition(int(t), 0.0, 7.5) for t in (ts[2], ts[5])]
    plans = [G.plan(g, B, ts) for g in points]
    swept = S.sweep(params, sched, x0, cond, uncond, plans, unet_fn=stub.unet)
    assert swept.latents.shape == (2, B) + x0.shape[1:] and swept.scale.shape == (2, B, STEPS)
    for k, p in enumerate(plans):
        alone = _loop(batch, p.before, p.after, p.detector)
        assert rel_err(swept.latents[k], alone.latents) < 1e-6
        assert swept.transition_index[k].tolist() == alone.transition_index.tolist()
    # the first two steps have scale 0 at every point: one half for the whole folded batch
    assert swept.branch[:, :, :2].tolist() == [[[S.UNCOND_ONLY] * 2] * B] * 2


# ------------------------------------------------------------------------------- gradients


def _richardson(f, x, direction, h):
    """Central difference of f at x along direction, Richardson-extrapolated (error O(h^4))."""
    d = lambda step: (f(x + step * direction) - f(x - step * direction)) / (2 * step)  # noqa: E731
    return (4 * d(h / 2) - d(h)) / 3


@pytest.fixture(scope="module")
def objective(batch):
    """f(s, cond, x0, switch) = <w, final latents> with scale s before step ``switch`` and 7.5 from it on
    (switch = STEPS: s everywhere), default arguments (halves skipped where s is 0 or 1)."""
    params, sched, _, _, uncond = batch
    w = jnp.asarray(np.random.default_rng(1).standard_normal((B, stub.C, stub.HW, stub.HW)), jnp.float32)

    def f(s, cond, x0, switch):
        trace = S.sample_loop(params, sched, x0, cond, uncond, jnp.full((B, STEPS), s), _full(7.5),
                              D.FixedSwitch(index=jnp.full((B,), switch, jnp.int32)), unet_fn=stub.unet)
        return jnp.sum(w * trace.latents)

    return jax.jit(f), jax.jit(jax.grad(f, argnums=(0, 1, 2)))


@pytest.mark.parametrize("switch", [STEPS, STEPS // 2], ids=["constant", "static"])
@pytest.mark.parametrize("s", [0.0, 1.0, 7.5])
def test_gradients_match_finite_differences(batch, objective, s, switch):
    f, grad = objective
    _, _, x0, cond, _ = batch
    rng = np.random.default_rng(2)
    v = jnp.asarray(rng.standard_normal(cond.shape), jnp.float32)
    q = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    g_s, g_cond, g_x0 = grad(jnp.float32(s), cond, x0, switch)
    checks = {
        "scale": (float(g_s), _richardson(lambda a: f(a, cond, x0, switch), jnp.float32(s), 1.0, 2e-2)),
        "cond": (float(jnp.vdot(g_cond, v)), _richardson(lambda c: f(s, c, x0, switch), cond, v, 2e-2)),
        "x0": (float(jnp.vdot(g_x0, q)), _richardson(lambda x: f(s, cond, x, switch), x0, q, 2e-2)),
    }
    for name, (ad, fd) in checks.items():
        if s == 0.0 and switch == STEPS and name == "cond":  # no guidance anywhere: cond has no effect
            assert ad == 0.0 and abs(float(fd)) < 1e-3
            continue
        assert abs(ad - float(fd)) <= 0.02 * abs(float(fd)), (name, ad, float(fd))
        assert abs(ad) > 1e-2, (name, ad)  # not the old silent zero


def test_every_trace_has_finite_gradients_and_remat_agrees(batch):
    params, sched, x0, cond, uncond = batch
    stp = D.FixedSwitch(index=jnp.full((B,), 3, jnp.int32))

    def signals(s, cond, remat=False):  # STP with scale 0 before: NaN noise_diff on skipped steps
        t = S.sample_loop(params, sched, x0, cond, uncond, jnp.full((B, STEPS), s), _full(7.5), stp,
                          unet_fn=stub.unet, remat=remat)
        return jnp.nansum(t.noise_diff) + jnp.sum(t.latent_cosine) + jnp.sum(t.scale) + jnp.sum(t.latents)

    grads = jax.grad(signals, argnums=(0, 1))(0.0, cond)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    remat = jax.grad(lambda s, c: signals(s, c, remat=True), argnums=(0, 1))(0.0, cond)
    for a, b in zip(grads, remat):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_default_gradients_equal_those_of_the_path_that_runs_both_halves(batch):
    params, sched, x0, cond, uncond = batch

    def f(s, skip):
        t = S.sample_loop(params, sched, x0, cond, uncond, jnp.full((B, STEPS), s), jnp.full((B, STEPS), s),
                          unet_fn=stub.unet, skip_halves=skip)
        return jnp.sum(t.latents ** 2)

    for s in (0.0, 1.0):  # only one half runs in the forward pass of the default path
        np.testing.assert_allclose(jax.grad(f)(s, True), jax.grad(f)(s, False), rtol=1e-5)
