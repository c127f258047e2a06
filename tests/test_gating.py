"""Detect, then mitigate (issue 18): ``guidance.gated`` on the stub UNet and on a tiny pipeline.

Unflagged samples are the same seed's constant-CFG samples and flagged ones the ungated mitigation's
(same batch); the score is the plain mean of the recorded noise difference; the threshold is traced;
calibration is the plain-numpy percentile; bad input fails before compiling."""

import jax
import numpy as np
import pytest
import stub
from bench.reference import causal_og_index, rel_err

from cfgbasin_jax.method import detectors as D
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import registry as M
from cfgbasin_jax.method import sampler as S
from cfgbasin_jax.metrics import detection
from cfgbasin_jax.pipeline import calibrate_threshold

STEPS = 12
B = 6
SCALE = 4.0
MITIGATIONS = {
    "stp": G.static_transition(500, 0.0, SCALE),
    "og-stp": G.static_transition(650, -2.0, SCALE),
    "dtp": G.dynamic_transition(1.0, SCALE),
    "og-dtp": G.dynamic_transition(-2.0, SCALE, signal="latent_cosine"),  # exact: two passes, gated alike
    "og-dtp causal": G.dynamic_transition(-2.0, SCALE, signal="latent_cosine", mode="causal"),
}


@pytest.fixture(scope="module")
def stub_batch():
    return stub.params(), *stub.inputs(B, STEPS)


@jax.jit
def _sample(params, sched, x0, cond, uncond, before, after, detector):
    return S.sample(params, sched, x0, cond, uncond, before, after, detector, unet_fn=stub.unet)


def _run(stub_batch, guidance):
    params, sched, x0, cond, uncond = stub_batch
    plan = G.plan(guidance, B, sched.timesteps, sched.num_train_timesteps)
    return _sample(params, sched, x0, cond, uncond, plan.before, plan.after, plan.detector)


@pytest.fixture(scope="module")
def cfg(stub_batch):
    return _run(stub_batch, G.constant(SCALE))


@pytest.mark.parametrize("name", sorted(MITIGATIONS))
def test_unflagged_are_cfg_and_flagged_are_the_mitigation(stub_batch, cfg, name):
    score = np.asarray(cfg.noise_diff)[:, 0]  # the step-0 noise difference does not depend on the scale
    threshold = float(np.median(score))
    res = _run(stub_batch, G.gated(MITIGATIONS[name], threshold))
    plain = _run(stub_batch, MITIGATIONS[name])
    flagged = np.asarray(res.detector_state.flagged)
    assert flagged.tolist() == (score > threshold).tolist() and 0 < flagged.sum() < B
    np.testing.assert_allclose(res.detector_state.score, score, rtol=1e-6)
    for b in range(B):
        if flagged[b]:  # the mitigation from the first step: scales, transition and image
            assert res.transition_index[b] == plain.transition_index[b] and res.scale[b, 0] == plain.scale[b, 0]
            np.testing.assert_array_equal(res.scale[b], plain.scale[b])
            assert rel_err(res.latents[b], plain.latents[b]) < 1e-6
        else:  # plain CFG from the first step
            assert np.all(res.scale[b] == SCALE) and res.transition_index[b] == -1
            assert rel_err(res.latents[b], cfg.latents[b]) < 1e-6
    if name == "og-dtp causal":  # the flagged samples' switch is the causal rule on their own signal
        for b in np.nonzero(flagged)[0]:
            want = causal_og_index(np.asarray(res.latent_cosine[b]), G.LATENT_COSINE_FALLBACK_INDEX)
            assert res.transition_index[b] == (-1 if want is None else want)


def test_sweeping_the_threshold_never_recompiles(stub_batch, cfg):
    mitigation = MITIGATIONS["og-stp"]
    _run(stub_batch, G.gated(mitigation, 0.0))
    size = _sample._cache_size()
    flagged = []
    for threshold in np.quantile(np.asarray(cfg.noise_diff)[:, 0], [0.0, 0.5, 1.0]):
        flagged.append(int(np.sum(_run(stub_batch, G.gated(mitigation, float(threshold))).detector_state.flagged)))
    per_sample = _run(stub_batch, G.gated(mitigation, np.linspace(0.0, 5.0, B)))  # one threshold per sample
    assert _sample._cache_size() == size
    assert flagged == [B - 1, B // 2, 0] and per_sample.detector_state.flagged.shape == (B,)


def test_a_later_flag_uses_pre_scale_until_it_is_known(stub_batch, cfg):
    steps, mitigation = 3, MITIGATIONS["og-stp"]
    score = np.nanmean(np.asarray(cfg.noise_diff)[:, :steps], axis=1)  # plain restatement of the score
    threshold = float(np.median(score))
    res = _run(stub_batch, G.gated(mitigation, threshold, steps=steps))
    np.testing.assert_allclose(res.detector_state.score, score, rtol=1e-5)
    flagged = np.asarray(res.detector_state.flagged)
    assert flagged.tolist() == (score > threshold).tolist() and 0 < flagged.sum() < B
    assert np.all(res.scale[:, : steps - 1] == SCALE)  # default pre_scale: CFG's, so ...
    for b in np.nonzero(~flagged)[0]:  # ... unflagged samples are still the CFG samples
        assert rel_err(res.latents[b], cfg.latents[b]) < 1e-6
    assert np.all(res.scale[flagged, steps - 1] == -2.0)  # flagged: the mitigation from step steps-1 on
    pre = _run(stub_batch, G.gated(mitigation, threshold, steps=steps, pre_scale=0.0))
    assert np.all(pre.scale[:, : steps - 1] == 0.0)


def test_calibration_is_the_plain_percentile():
    scores = np.random.default_rng(0).gamma(2.0, 0.3, size=37)
    for fpr in (0.01, 0.05, 0.5):
        s, q = np.sort(scores), 1.0 - fpr  # linear interpolation between order statistics
        pos = q * (len(s) - 1)
        lo = int(np.floor(pos))
        want = s[lo] + (pos - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])
        assert detection.threshold_at_fpr(scores, fpr) == pytest.approx(want, rel=1e-12)
        # plain scores above it: at most ceil(fpr (N - 1)) (the interpolated quantile's bound)
        assert np.sum(scores > detection.threshold_at_fpr(scores, fpr)) <= np.ceil(fpr * (len(s) - 1))
    with pytest.raises(ValueError, match="fpr"):
        detection.threshold_at_fpr(scores, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        detection.threshold_at_fpr([0.5, np.nan])


@pytest.mark.parametrize("make, match", [
    (lambda: G.gated(MITIGATIONS["stp"], float("nan")), "threshold must be finite"),
    (lambda: G.gated(MITIGATIONS["stp"], np.inf), "threshold must be finite"),
    (lambda: G.gated(MITIGATIONS["stp"], -0.5), "threshold must be >= 0"),
    (lambda: G.gated(MITIGATIONS["stp"], [0.5, -1.0]), "threshold must be >= 0"),
    (lambda: G.gated(G.constant(7.5), 1.0), "constant schedule cannot be gated"),
    (lambda: G.gated(G.per_step(np.ones(STEPS)), 1.0), "per_step schedule cannot be gated"),
    (lambda: G.gated(G.gated(MITIGATIONS["stp"], 1.0), 1.0), "already gated"),
    (lambda: G.gated(MITIGATIONS["stp"], 1.0, steps=0), "gate steps must be an integer >= 1"),
    (lambda: G.gated(MITIGATIONS["stp"], 1.0, score="loss"), "unknown gate score"),
    (lambda: G.gated(MITIGATIONS["stp"], 1.0, pre_scale=np.nan), "pre_scale must be finite"),
])
def test_bad_gates_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_gates_fail_before_compiling(stub_batch):
    params, sched, x0, cond, uncond = stub_batch
    size = _sample._cache_size()
    for g, match in ((G.gated(MITIGATIONS["dtp"], 1.0, steps=STEPS), f"steps < the {STEPS} sampling steps"),
                     (G.gated(MITIGATIONS["dtp"], None), "threshold is not set"),
                     (G.gated(MITIGATIONS["dtp"], [1.0, 2.0]), f"2 per-sample values of the gate's threshold for {B}")):
        with pytest.raises(ValueError, match=match):
            _run(stub_batch, g)
    assert _sample._cache_size() == size


def test_registry_gated_methods():
    assert M.guidance("gated-og-stp", threshold=0.9) == G.gated(G.static_transition(650, -2.0, 7.5), 0.9)
    assert M.guidance("gated OG+DTP", threshold=1.0, gate_steps=2) == G.gated(
        M.guidance("og-dtp"), 1.0, steps=2)
    assert M.guidance("gated-stp").gate.threshold is None  # no paper default: give it or calibrate it
    assert isinstance(G.plan(M.guidance("gated_dtp", threshold=1.0), 2, np.arange(981, 0, -100)).detector, D.Gated)


def test_pipeline_reports_and_calibrates_the_gate(pipe_sd1):
    prompts = ["a photo of a cat", "a red circle", "an astronaut", "a blue square"]
    kwargs = dict(num_inference_steps=4, seed=0, scheduler="ddim", progress=False)
    gated = G.gated(M.guidance("og-stp"), 0.0)
    threshold = calibrate_threshold(pipe_sd1, prompts, gated, fpr=0.25, **kwargs)
    cfg = pipe_sd1.generate(prompts, G.constant(7.5), **kwargs)
    score = detection.detection_score(cfg.noise_diff, 1)
    assert threshold == pytest.approx(np.quantile(score, 0.75), rel=1e-5)
    res = pipe_sd1.generate(prompts, G.with_threshold(gated, threshold), **kwargs)
    np.testing.assert_allclose(res.gate_score, score, rtol=1e-5)
    assert res.gate_flagged.tolist() == (score > threshold).tolist() and res.gate_flagged.sum() == 1
    for b in np.nonzero(~res.gate_flagged)[0]:
        np.testing.assert_array_equal(res.images[b], cfg.images[b])
    assert cfg.gate_score is None and cfg.gate_flagged is None
