"""Transition detectors: the built-ins against the official rules restated in plain Python (driven
directly and inside the sampler with a stub UNet) and a user-defined detector. The built-in gate
(detect, then mitigate) is tested in test_gating.py."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stub
from flax import struct
from bench.reference import causal_og_index, official_dtp_index, official_og_index, rel_err

from cfgbasin_jax.method import detectors as D
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import sampler as S

# ---------------------------------------------------------------- the state machines, run in a scan


def _signals(j, noise_diff=None, latent_cosine=None):
    return D.Signals(j=j, t=0, x=None, eps_u=None, eps_c=None, noise_diff=noise_diff, latent_cosine=latent_cosine)


@jax.jit
def _run_noise_diff(d):  # d [S, B] -> index [B]
    det = D.NoiseDiffMinimum()

    def body(st, xs):
        j, dj = xs
        return det.update(st, _signals(j, noise_diff=dj), j), None

    state, _ = jax.lax.scan(body, det.init(d.shape[1]), (jnp.arange(d.shape[0]), d))
    return state.index


@jax.jit
def _run_latent_cosine(c, fallback):  # c [S, B], fallback [B] -> index [B]
    det = D.LatentCosineMinimum(fallback=fallback)

    def body(st, xs):
        j, cj = xs
        return det.update(st, _signals(j, latent_cosine=cj), j), None

    state, _ = jax.lax.scan(body, det.init(c.shape[1]), (jnp.arange(c.shape[0]), c))
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
    at the plateau), several minima (first wins), a minimum at the last-but-one step."""
    idx = {k: official_dtp_index(np.asarray(v, float)) for k, v in HAND_MADE.items()}
    assert idx["monotone_down"] is None and idx["monotone_up"] is None and idx["all_equal"] is None
    assert idx["min_at_1"] == 2
    assert idx["plateau_then_rise"] is None  # 3 == 3 is no strict minimum, and 4 > 3 == 3 is neither
    assert idx["flat_bottom_plateau"] == 5
    assert idx["several_minima"] == 3
    assert idx["min_at_end"] == 9


@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_latent_cosine_rules_hand_made(name):
    c = np.asarray(HAND_MADE[name], np.float32)
    assert int(D.first_minimum_index(c)[0]) == official_og_index(c)
    for fallback in (None, 0, 3, 5, 9, 10):
        f = jnp.asarray([2**30 if fallback is None else fallback], jnp.int32)
        got = int(_run_latent_cosine(jnp.asarray(c)[:, None], f)[0])
        want = causal_og_index(c, fallback)
        assert got == (-1 if want is None else want), fallback


def test_latent_cosine_official_branches():
    assert official_og_index([5, 1, 4, 3, 2, 3]) == 4  # min at 1 and a second: the second
    assert official_og_index([5, 1, 4, 5, 6, 7]) == 1  # min at 1 only
    assert official_og_index([1, 2, 3, 4, 5, 6, 7]) == 5  # none: fallback 5
    assert official_og_index([9, 8, 7, 5, 6, 4, 8]) == 3  # first of several


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
    index, fallback = D.first_minimum_index(d.T)
    assert index.tolist() == [official_og_index(d[:, b]) for b in range(d.shape[1])]
    assert fallback.tolist() == [not any(d[k, b] < d[k - 1, b] and d[k, b] < d[k + 1, b] for k in range(1, 24))
                                 for b in range(d.shape[1])]


def test_nan_signal_never_transitions():
    d = np.array([5, 4, np.nan, 5, 6, 7], np.float32)
    assert official_dtp_index(d) is None
    assert int(_run_noise_diff(jnp.asarray(d)[:, None])[0]) == -1




# ---------------------------------------------------------------- in the sampler (stub UNet)

STEPS = 12
B = 6


@struct.dataclass
class BelowTau(D.Detector):
    """The README's user-defined detector: switch at the first step whose noise difference is below tau."""

    tau: Any
    reads = ("noise_diff",)

    def init(self, batch):
        return jnp.full((batch,), -1, jnp.int32)

    def update(self, index, signals, j):
        return jnp.where((index < 0) & (signals.noise_diff < self.tau), j, index)

    def switched(self, index, j):
        return (index >= 0) & (j >= index)


@pytest.fixture(scope="module")
def stub_batch():
    return stub.params(), *stub.inputs(B, STEPS)


def _run(stub_batch, guidance, **kwargs):
    params, sched, x0, cond, uncond = stub_batch
    plan = G.plan(guidance, B, sched.timesteps, sched.num_train_timesteps)
    return _sample(params, sched, x0, cond, uncond, plan.before, plan.after, plan.detector, **kwargs)


@jax.jit
def _sample(params, sched, x0, cond, uncond, before, after, detector):
    return S.sample(params, sched, x0, cond, uncond, before, after, detector, unet_fn=stub.unet)


def test_user_detector_in_the_loop_and_sweeping_tau_never_recompiles(stub_batch):
    free = _run(stub_batch, G.constant(0.0))
    tau = 0.9  # the stub's d dips to 0.46-1.7 at steps 1-2, so some samples switch and some never do
    res = _run(stub_batch, G.dynamic_transition(0.0, 4.0, signal=BelowTau(tau=tau)))
    for b in range(B):
        k = int(res.transition_index[b])
        # plain restatement: the first step with d < tau on the sample's own trajectory (scale 0 until then,
        # so the recorded d is that of the scale-0 trajectory up to the switch)
        want = next((j for j, v in enumerate(res.noise_diff[b]) if v < tau), -1)
        assert k == want
        if k >= 0:
            assert np.all(res.scale[b, :k] == 0.0) and np.all(res.scale[b, k:] == 4.0)
    assert 0 < np.sum(res.transition_index >= 0) < B, res.transition_index
    size = _sample._cache_size()
    other = _run(stub_batch, G.dynamic_transition(0.0, 4.0, signal=BelowTau(tau=2 * tau)))
    assert _sample._cache_size() == size
    assert not np.array_equal(other.transition_index, res.transition_index)
    assert np.all(np.isnan(free.noise_diff))  # scale 0 everywhere: one half, no signal


def test_dtp_and_causal_latent_cosine_in_the_loop_match_the_official_rules(stub_batch):
    res = _run(stub_batch, G.dynamic_transition(1.0, 4.0))
    want = [official_dtp_index(d) for d in np.asarray(res.noise_diff)]
    assert res.transition_index.tolist() == [-1 if w is None else w for w in want]
    assert (res.transition_index >= 0).any()
    causal = _run(stub_batch, G.dynamic_transition(-2.0, 4.0, signal="latent_cosine", mode="causal"))
    want = [causal_og_index(c, G.LATENT_COSINE_FALLBACK_INDEX) for c in np.asarray(causal.latent_cosine)]
    assert causal.transition_index.tolist() == [-1 if w is None else w for w in want]
    fell = [w is not None and not any(c[k] < c[k - 1] and c[k] < c[k + 1] for k in range(2, w - 1))
            for w, c in zip(want, np.asarray(causal.latent_cosine))]
    assert causal.transition_fallback.tolist() == fell


def test_exact_two_pass_is_a_composition_and_reports_the_fallback(stub_batch):
    res = _run(stub_batch, G.dynamic_transition(-2.0, 4.0, signal="latent_cosine", mode="exact"))
    want = [official_og_index(c) for c in np.asarray(res.latent_cosine)]  # on the recorded first pass
    assert res.transition_index.tolist() == want
    no_minimum = [not any(c[k] < c[k - 1] and c[k] < c[k + 1] for k in range(1, STEPS - 1))
                  for c in np.asarray(res.latent_cosine)]
    assert res.transition_fallback.tolist() == no_minimum
    assert res.unet_evals.tolist() == [4 * STEPS] * B  # two passes, both halves
    params, sched, x0, cond, uncond = stub_batch
    for b in range(2):  # the replay equals a fixed switch at the official index
        plan = G.plan(G.per_step(np.where(np.arange(STEPS) >= want[b], 4.0, -2.0)), B, sched.timesteps)
        fixed = _sample(params, sched, x0, cond, uncond, plan.before, plan.after, plan.detector)
        assert rel_err(res.latents[b], fixed.latents[b]) < 1e-6
    with pytest.raises(ValueError, match="sampler.sample"):
        det = D.broadcast(D.exact_latent_cosine(), B)
        S.sample_loop(params, sched, x0, cond, uncond, jnp.zeros((B, STEPS)), jnp.zeros((B, STEPS)), det,
                      unet_fn=stub.unet)


def test_stage_follows_the_signals_read():
    assert D.NoiseDiffMinimum().stage == "eps" and D.LatentCosineMinimum().stage == "step"
    assert BelowTau(tau=1.0).stage == "eps"

    @struct.dataclass
    class Bad(D.Detector):
        reads = ("loss",)

        def switched(self, state, j):
            return jnp.zeros((), bool)

    with pytest.raises(ValueError, match="unknown signal"):
        Bad().stage  # noqa: B018


def test_mixed_detector_kinds_in_one_batch_are_rejected():
    ts = np.arange(981, 0, -20)
    with pytest.raises(ValueError, match="mix"):
        G.plan([G.constant(7.5), G.dynamic_transition()], 2, ts)
    one = D.FixedSwitch(index=np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="static settings"):
        D.concatenate([one, one.replace(precision="other")])
