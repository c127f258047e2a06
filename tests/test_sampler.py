"""The sampler on a stub UNet (tests/stub.py): half skipping and its accounting, the [B,S] trace
layout, validation of the functional API, the sweep helper, and gradients against finite
differences (scales at 0, 1 and 7.5, text embeddings, initial noise) with default arguments."""

import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stub
from flax import struct
from bench.reference import rel_err

from cfgbasin_jax.method import detectors as D
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import sampler as S

STEPS = 8
B = 2
HERE = Path(__file__).parent


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
        assert swept.unet_evals[k].tolist() == alone.unet_evals.tolist()  # each point skips what its loop skips
    folded = S.sweep(params, sched, x0, cond, uncond, plans, group="all", unet_fn=stub.unet)
    # one batch of 2B: steps 2-4 run both halves for both points (point 0 needs them)
    assert folded.unet_evals.tolist() == [[2 + 2 * (STEPS - 2)] * B] * 2
    assert rel_err(folded.latents, swept.latents) < 1e-6


def test_sweep_groups_points_whose_halves_agree(batch):
    params, sched, x0, cond, uncond = batch
    ts = np.asarray(sched.timesteps)
    t2, t5 = int(ts[2]), int(ts[5])
    gs = [G.static_transition(t2, 0.0, 7.5), G.static_transition(t5, 0.0, 7.5), G.static_transition(t2, 0.0, 3.0),
          G.static_transition(t5, 0.0, 3.0)]
    plans = [G.plan(g, B, ts) for g in gs]
    assert S.sweep_chunks(plans) == [[0, 2], [1, 3]]  # same switch step: same halves at every step
    assert S.sweep_chunks(plans[:3]) == [[0], [2], [1]]  # groups of 2 and 1: one point per batch
    assert S.sweep_chunks(plans, "points") == [[0], [1], [2], [3]] and S.sweep_chunks(plans, "all") == [[0, 1, 2, 3]]
    assert S.sweep_chunks(plans, skip_halves=False) == [[0, 1, 2, 3]]  # every step runs both halves anyway
    dtp = [G.plan(G.dynamic_transition(1.0, a), B, ts) for a in (3.0, 7.5)]
    assert S.sweep_chunks(dtp) == [[0], [1]]  # decided during sampling: one point at a time
    with pytest.raises(ValueError, match="sweep: group must be one of halves, points, all, got 'some'"):
        S.sweep_chunks(plans, "some")
    swept = S.sweep(params, sched, x0, cond, uncond, plans, unet_fn=stub.unet)
    for k, p in enumerate(plans):
        alone = _loop(batch, p.before, p.after, p.detector)
        assert rel_err(swept.latents[k], alone.latents) < 1e-6, k
        assert swept.unet_evals[k].tolist() == alone.unet_evals.tolist(), k


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


# ------------------------------------------------------------------------------- shard_map, float64


def start_early(request, items):
    """The shard_map worker below, started at the session's first test (conftest's `early`)."""
    from early_start import Started, selected

    if not selected(items, "test_a_users_shard_map_with_default_arguments"):
        return {}

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    logs = request.getfixturevalue("tmp_path_factory").mktemp("shard_map_worker")
    return {"shard_map_worker": Started([[sys.executable, HERE / "shard_map_worker.py"]], env, logs)}


def test_a_users_shard_map_with_default_arguments(early):
    """jax.shard_map with check_vma on (the default) around sample_loop and sample, forward and under
    grad, on 4 host devices: the loop state is typed as varying over the mesh axis like its inputs.
    Latents, transition indices and gradients equal one device's (float rounding only)."""
    (proc,) = early["shard_map_worker"].wait(timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {"stp/sample_loop", "dtp/sample", "og-dtp/sample", "gated-og-dtp/sample"}
    for name, r in results.items():
        assert r["latents_rel_err"] < 1e-5, name
        assert r["index"] == r["ref_index"], name
        assert abs(r["grad"] - r["ref_grad"]) <= 1e-5 * abs(r["ref_grad"]), name


@pytest.mark.parametrize("switch", [STEPS, 3], ids=["constant", "static"])
def test_float64_in_float64_out_and_a_tight_gradient_check(switch):
    """With x64 on and float64 inputs, the scan keeps float64 (latents, signals, scheduler state), so
    central differences at h = 1e-6 agree with AD to 1e-7 relative, at scales 0, 1 and 7.5."""
    with jax.enable_x64(True):
        sched, x0, cond, uncond = stub.inputs(B, STEPS)
        f64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        params, x0, cond, uncond = f64(stub.params()), f64(x0), f64(cond), f64(uncond)
        stp = D.FixedSwitch(index=jnp.full((B,), switch, jnp.int32))

        def run(s):
            before = jnp.ones((B, STEPS), jnp.float64) * s
            return S.sample_loop(params, sched, x0, cond, uncond, before, jnp.full((B, STEPS), 7.5, jnp.float64), stp,
                                 unet_fn=stub.unet)

        trace = run(jnp.float64(0.5))
        for name in ("latents", "noise_diff", "latent_cosine", "scale"):
            assert getattr(trace, name).dtype == jnp.float64, name
        loss = jax.jit(lambda s: jnp.sum(run(s).latents ** 2))
        grad = jax.jit(jax.grad(loss))
        h = 1e-6
        for s in (0.0, 1.0, 7.5):
            ad = float(grad(jnp.float64(s)))
            fd = float((loss(jnp.float64(s + h)) - loss(jnp.float64(s - h))) / (2 * h))
            assert abs(ad - fd) <= 1e-7 * abs(ad) and abs(ad) > 1.0, (s, ad, fd)


def test_float32_stays_float32():
    params, (sched, x0, cond, uncond) = stub.params(), stub.inputs(B, STEPS)
    trace = S.sample_loop(params, sched, x0.astype(jnp.bfloat16), cond, uncond, _full(1.5), _full(1.5),
                          unet_fn=stub.unet)
    assert trace.latents.dtype == jnp.float32 and trace.noise_diff.dtype == jnp.float32


# ------------------------------------------------------------------------------- one-line errors


def _one_line(fn, match):
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_bad_arguments_fail_in_one_line_naming_the_argument(batch):
    params, sched, x0, cond, uncond = batch
    ts = sched.timesteps

    def run(unet_fn=stub.unet, **kw):
        args = dict(params=params, scheduler=sched, latents=x0, cond=cond, uncond=uncond, before=_full(7.5),
                    after=_full(7.5))
        return S.sample_loop(**{**args, **kw}, unet_fn=unet_fn)

    _one_line(lambda: G.plan(7.5, B, ts), "guidance: expected a Guidance .* got float 7.5")
    _one_line(lambda: G.plan("cfg", B, ts), "guidance: expected a Guidance")
    _one_line(lambda: run(detector=G.plan(G.static_transition(500, 0.0, 7.5), 3, ts).detector),
              r"sampler: detector.* has shape \(3,\); per-sample leaves must be \[B=2")
    _one_line(lambda: run(detector=BadInit()), r"sampler: BadInit.init\(2\).* has shape \(3,\)")
    wrong_channels = lambda p, x, t, c: stub.unet(p, x, t, c)[:, :1]  # noqa: E731
    _one_line(lambda: run(unet_fn=wrong_channels), r"sampler: unet_fn returned shape \(2, 1, 4, 4\) for latents of "
                                                    r"shape \(2, 2, 4, 4\)")
    _one_line(lambda: jax.jit(lambda x: run(latents=x))(x0 * 1j), "sampler: latents must be a real float array")
    _one_line(lambda: run(before=jnp.zeros((B, STEPS), jnp.int32)), "sampler: before must be a real float array .* int32")
    _one_line(lambda: run(after=_full(7.5) + 1j), "sampler: after must be a real float array .* complex64")
    _one_line(lambda: G.constant(7.5 + 1j), r"guidance: scale must be a real number, got the complex \(7.5\+1j\)")
    _one_line(lambda: G.static_transition(500, np.asarray([1.0, 2j]), 7.5), "guidance: before must be real, got a complex128")
    _one_line(lambda: G.per_step(np.ones(STEPS) * 1j), "guidance: per-step scales must be real")


@struct.dataclass
class BadInit(D.Detector):
    """A detector whose state has another batch size than the latents."""

    def init(self, batch):
        return jnp.zeros((3,))

    def switched(self, state, j):
        return jnp.zeros((3,), bool)


# ------------------------------------------------------------------------------- passes a batch does not need


def _counting_unet(counter):
    """stub.unet that adds the rows it evaluates to counter[0] on the host (run-time count, so a
    branch of lax.cond that does not run counts nothing)."""

    def add(n):
        counter[0] += int(n)

    def unet(params, x, t, context):
        jax.debug.callback(add, x.shape[0])
        return stub.unet(params, x, t, context)

    return unet


@pytest.mark.parametrize("jit", [False, True], ids=["host", "jit"])
def test_gated_exact_og_dtp_skips_the_replay_when_no_sample_is_flagged(batch, jit):
    """Gated exact OG+DTP: the recording pass is already CFG for unflagged samples, so a batch with no
    flagged sample pays CFG's UNet evaluations (2 per step), counted as the model runs them; with a
    flagged sample the replay runs for the batch (4 per step and sample)."""
    params, sched, x0, cond, uncond = batch
    og = G.dynamic_transition(-7.5, 7.5, signal="latent_cosine")
    cfg = S.sample_loop(params, sched, x0, cond, uncond, _full(7.5), _full(7.5), unet_fn=stub.unet)
    for threshold, flagged, per_sample in ((1e6, [False, False], 2 * STEPS), (0.0, [True, True], 4 * STEPS)):
        counter = [0]
        p = G.plan(G.gated(og, threshold), B, sched.timesteps)
        run = functools.partial(S.sample, unet_fn=_counting_unet(counter))
        run = jax.jit(run) if jit else run
        trace = run(params, sched, x0, cond, uncond, p.before, p.after, p.detector)
        jax.effects_barrier()
        assert trace.detector_state.flagged.tolist() == flagged
        assert trace.unet_evals.tolist() == [per_sample] * B and counter[0] == per_sample * B, (threshold, counter)
        if not any(flagged):  # the unflagged samples are CFG's, image for image
            np.testing.assert_array_equal(trace.latents, cfg.latents)
            assert trace.transition_index.tolist() == [-1, -1]


# ------------------------------------------------------------------------------- official precision


def test_official_precision_signal_is_independent_of_the_batch(batch):
    """precision="official" records a signal whose minima are rounding ties, so the pass that records
    it runs the UNet one row at a time: batch 4 gives batch 1's signal and index bit for bit (the
    batched stub differs from batch 1 by float rounding)."""
    params = stub.params()
    sched, x0, cond, uncond = stub.inputs(4, 12)
    p = G.plan(G.dynamic_transition(-7.5, 7.5, signal="latent_cosine", precision="official"), 4, sched.timesteps)
    run = jax.jit(functools.partial(S.sample, params, sched, unet_fn=stub.unet))
    full = run(x0, cond, uncond, p.before, p.after, p.detector)
    rows = [run(x0[i:i + 1], cond[i:i + 1], uncond[i:i + 1], p.before[i:i + 1], p.after[i:i + 1],
                jax.tree.map(lambda a, i=i: a[i:i + 1], p.detector)) for i in range(4)]
    np.testing.assert_array_equal(full.latent_cosine, np.concatenate([r.latent_cosine for r in rows]))
    assert full.transition_index.tolist() == [int(r.transition_index[0]) for r in rows]
