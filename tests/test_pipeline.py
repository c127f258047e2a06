"""The Pipeline (text, noise, chunking, the compiled sampler, decoding) against PyTorch diffusers on
tiny random SD models built in the test, and its public surface: unet_fn, seeds as keys, the
shipped toy, the conditioning hook, transition fallbacks."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bench.reference import pt_embed, pt_guided_loop, pt_scheduler, rel_err

import cfgbasin_jax
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import sampler as S
from cfgbasin_jax.models.errors import ConversionError
from cfgbasin_jax.pipeline import initial_noise

PROMPTS = ["a red circle on the left", "two blue squares"]
STEPS = 10


def _noise(pipe, b, seed=1):
    h = pipe.default_size // pipe.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((b, pipe.latent_channels, h, h)).astype(np.float32)


@torch.no_grad()
def _pt_pipeline_latents(tiny, scheduler_name, noise, guidance_scale, output_type="latent"):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=pt_scheduler(scheduler_name, tiny.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    size = noise.shape[-1] * pipe.vae_scale_factor
    out = pipe(PROMPTS, height=size, width=size, num_inference_steps=STEPS, guidance_scale=guidance_scale,
               latents=torch.as_tensor(noise), output_type=output_type)
    return out.images


@pytest.mark.parametrize("scheduler", ["dpm++2m", "ddim", "euler", "pndm"])
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_constant_cfg_matches_diffusers_pipeline(variant, scheduler, request):
    tiny = request.getfixturevalue(f"tiny_{variant}")
    pipe = request.getfixturevalue(f"pipe_{variant}")
    noise = _noise(pipe, len(PROMPTS))
    ours = pipe.generate(PROMPTS, G.constant(7.5), num_inference_steps=STEPS, latents=noise,
                         scheduler=scheduler, progress=False, decode=False)
    ref = _pt_pipeline_latents(tiny, scheduler, noise, 7.5).numpy()
    assert ours.latents.shape == ref.shape
    assert rel_err(ours.latents, ref) < 1e-3
    assert np.all(ours.guidance_scale == 7.5) and np.all(ours.transition_index == -1)
    assert ours.unet_evals == 2 * len(PROMPTS) * len(ours.timesteps)
    assert np.all(np.isfinite(ours.noise_diff))


def test_decoded_images_match_diffusers(tiny_sd1, pipe_sd1):
    noise = _noise(pipe_sd1, len(PROMPTS))
    ours = pipe_sd1.generate(PROMPTS, G.constant(7.5), num_inference_steps=STEPS, latents=noise,
                             scheduler="ddim", progress=False)
    ref = _pt_pipeline_latents(tiny_sd1, "ddim", noise, 7.5, output_type="np")
    ref_u8 = np.round(np.asarray(ref) * 255).astype(np.int16)
    assert ours.images.dtype == np.uint8 and ours.images.shape == ref_u8.shape
    assert np.max(np.abs(ours.images.astype(np.int16) - ref_u8)) <= 1


@pytest.mark.parametrize(
    "g, rule",
    [
        (G.static_transition(500, 0.0, 7.5), lambda t: 0.0 if t > 500 else 7.5),
        (G.static_transition(650, -2.0, 7.5), lambda t: -2.0 if t > 650 else 7.5),
        (G.static_transition(500, 1.0, 5.0, shape_after="cosine"),
         lambda t: 1.0 if t > 500 else 5.0 * (np.cos(np.pi * t / 1000) + 1)),
    ],
    ids=["stp", "og_stp", "shaped"],
)
def test_static_transition_matches_torch_loop(tiny_sd1, pipe_sd1, g, rule):
    noise = _noise(pipe_sd1, len(PROMPTS), seed=2)
    ours = pipe_sd1.generate(PROMPTS, g, num_inference_steps=STEPS, latents=noise, scheduler="dpm++2m",
                             progress=False, decode=False)
    cond = pt_embed(tiny_sd1.text_encoder, tiny_sd1.tokenizer, PROMPTS)
    uncond = pt_embed(tiny_sd1.text_encoder, tiny_sd1.tokenizer, [""] * len(PROMPTS))
    sched = pt_scheduler("dpm++2m", tiny_sd1.scheduler_config)
    ref, ref_d, ref_s = pt_guided_loop(tiny_sd1.unet, sched, noise, cond, uncond, STEPS, lambda j, t, d: rule(t))
    assert rel_err(ours.latents, ref) < 1e-3
    np.testing.assert_allclose(ours.guidance_scale, ref_s.T, rtol=1e-5)
    both = ~np.isnan(ours.noise_diff)
    np.testing.assert_allclose(ours.noise_diff[both], ref_d.T[both], rtol=1e-3)


def test_skipped_halves_equal_full_path_and_are_counted(pipe_sd1):
    noise = _noise(pipe_sd1, 3, seed=3)
    prompts = PROMPTS + ["a green triangle"]
    g = G.static_transition(500, 0.0, 7.5)
    skip = pipe_sd1.generate(prompts, g, num_inference_steps=STEPS, latents=noise, scheduler="ddim",
                             progress=False, decode=False)
    full = pipe_sd1.generate(prompts, g, num_inference_steps=STEPS, latents=noise, scheduler="ddim",
                             progress=False, decode=False, skip_halves=False)
    assert rel_err(skip.latents, full.latents) < 1e-5
    n_before = int(np.sum(skip.timesteps > 500))
    assert skip.unet_evals == 3 * (n_before + 2 * (STEPS - n_before))
    assert full.unet_evals == 3 * 2 * STEPS
    assert np.all(np.isnan(skip.noise_diff[:, :n_before])) and np.all(np.isfinite(skip.noise_diff[:, n_before:]))
    # scale 1 everywhere: only the conditional half
    one = pipe_sd1.generate(prompts, G.constant(1.0), num_inference_steps=STEPS, latents=noise, scheduler="ddim",
                            progress=False, decode=False)
    one_full = pipe_sd1.generate(prompts, G.constant(1.0), num_inference_steps=STEPS, latents=noise,
                                 scheduler="ddim", progress=False, decode=False, skip_halves=False)
    assert one.unet_evals == 3 * STEPS and rel_err(one.latents, one_full.latents) < 1e-5
    # a batch where one sample needs both halves runs both for everyone
    mixed = pipe_sd1.generate(prompts, [g, g, G.static_transition(500, 0.5, 7.5)], num_inference_steps=STEPS,
                              latents=noise, scheduler="ddim", progress=False, decode=False)
    assert mixed.unet_evals == 3 * 2 * STEPS
    assert rel_err(mixed.latents[:2], skip.latents[:2]) < 1e-5


def test_sweep_compiles_once(pipe_sd1):
    noise = _noise(pipe_sd1, 2, seed=4)
    pipe_sd1.generate(PROMPTS, G.static_transition(100, 0.0, 7.5), num_inference_steps=STEPS, latents=noise,
                      scheduler="euler", progress=False, decode=False)
    before = pipe_sd1.compile_count()
    seen = []
    for t, lo, hi in [(900, 0.0, 7.5), (700, -2.0, 7.5), (500, 0.0, 3.0), (300, 1.0, 9.0), (0, -7.5, 7.5)]:
        r = pipe_sd1.generate(["another prompt", "and one more"], G.static_transition(t, lo, hi),
                              num_inference_steps=STEPS, seed=t, scheduler="euler", progress=False, decode=False)
        seen.append(r.latents)
    assert pipe_sd1.compile_count() == before
    assert not np.allclose(seen[0], seen[1])


def test_progress_bar_advances_per_step(pipe_sd1, monkeypatch):
    import tqdm.auto

    updates = []

    class Recorder:
        def __init__(self, total=None, **kw):
            self.total = total

        def update(self, n=1):
            updates.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    pipe_sd1.generate(PROMPTS[:1], G.constant(7.5), num_inference_steps=STEPS, scheduler="ddim",
                      progress=True, decode=False)
    assert sum(updates) == STEPS


def test_noise_depends_only_on_seed_and_index():
    a = np.asarray(initial_noise(0, [0, 1, 2], (4, 8, 8)))
    b = np.asarray(initial_noise(0, [2], (4, 8, 8)))
    np.testing.assert_array_equal(a[2], b[0])
    assert not np.allclose(a[0], a[1])
    assert not np.allclose(a[0], np.asarray(initial_noise(1, [0], (4, 8, 8)))[0])


def test_generate_draws_noise_from_seed_and_sample_index(pipe_sd1):
    """Through the caller: generate(seed, sample_indices) samples from initial_noise(seed, index)
    of each sample, not from its position in the batch (nor the seed alone)."""
    prompts = PROMPTS + ["a green triangle"]
    h = pipe_sd1.default_size // pipe_sd1.vae_scale_factor
    shape = (pipe_sd1.latent_channels, h, h)
    kw = dict(num_inference_steps=STEPS, scheduler="ddim", progress=False, decode=False)
    for seed, indices in ((5, [7, 3, 9]), (6, [7, 3, 9]), (5, [0, 1, 2])):
        drawn = pipe_sd1.generate(prompts, G.constant(7.5), seed=seed, sample_indices=indices, **kw)
        given = pipe_sd1.generate(prompts, G.constant(7.5), latents=initial_noise(seed, indices, shape), **kw)
        np.testing.assert_array_equal(drawn.latents, given.latents)
        np.testing.assert_array_equal(drawn.sample_indices, indices)


def test_bfloat16_sampling_end_to_end(tiny_sd1, pipe_sd1):
    """Params and compute in bfloat16 (scheduler state and detector signals in float32): DTP runs
    end to end, finite, close to float32 sampling from the same noise."""
    import cfgbasin_jax

    bf16 = cfgbasin_jax.load_pipeline(tiny_sd1.path, dtype="bfloat16")
    noise = _noise(pipe_sd1, len(PROMPTS), seed=8)
    kw = dict(num_inference_steps=STEPS, latents=noise, scheduler="dpm++2m", progress=False)
    g = G.dynamic_transition(1.0, 7.5)
    low, ref = bf16.generate(PROMPTS, g, **kw), pipe_sd1.generate(PROMPTS, g, **kw)
    assert low.latents.dtype == np.float32 and low.noise_diff.dtype == np.float32
    assert np.all(np.isfinite(low.latents)) and not low.nonfinite.any()
    assert low.images.dtype == np.uint8 and low.images.shape == ref.images.shape
    assert rel_err(low.latents, ref.latents) < 5e-2
    assert rel_err(low.noise_diff[:, :2], ref.noise_diff[:, :2]) < 5e-2
    diff = np.abs(low.images.astype(np.int16) - ref.images)
    assert diff.mean() < 4 and diff.max() < 64, (diff.mean(), diff.max())
    assert low.unet_evals == ref.unet_evals == 2 * len(PROMPTS) * STEPS


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scheduler="lms"), "lms"),
        (dict(guidance=G.static_transition(1000, 0.0, 7.5)), "outside"),
        (dict(guidance=G.Guidance(before=float("nan"), after=7.5, rule="static", t=500)), "finite"),
        (dict(guidance=G.per_step(np.ones(3))), "length 3"),
        (dict(prompts=[]), "empty"),
        (dict(height=17), "height"),
        (dict(width=0), "width"),
        (dict(latents=np.zeros((1, 4, 3, 3), np.float32)), "latents"),
        (dict(guidance=7.5), "guidance: expected a Guidance .* got float 7.5"),
        (dict(pixels="floor"), "generate: pixels must be one of round, truncate, got 'floor'"),
    ],
)
def test_bad_input_fails_before_compiling(pipe_sd1, kwargs, match):
    args = dict(prompts=["x"], guidance=G.constant(7.5), num_inference_steps=STEPS, progress=False)
    args.update(kwargs)
    before = pipe_sd1.compile_count()
    with pytest.raises(ValueError, match=match):
        pipe_sd1.generate(**args)
    assert pipe_sd1.compile_count() == before


def test_halves_needed_rule():
    import jax.numpy as jnp

    f = lambda s, p=False: int(S.halves_needed(jnp.asarray(s, jnp.float32), jnp.asarray(p)))  # noqa: E731
    assert f([0.0, 0.0]) == S.UNCOND_ONLY
    assert f([1.0, 1.0]) == S.COND_ONLY
    assert f([0.0, 1.0]) == S.BOTH
    assert f([7.5]) == S.BOTH
    assert f([0.0], True) == S.BOTH


def test_nonfinite_trajectory_is_flagged_per_sample(pipe_sd1):
    noise = _noise(pipe_sd1, 2, seed=6)
    res = pipe_sd1.generate(PROMPTS, [G.constant(7.5), G.constant(3e38)], num_inference_steps=STEPS, latents=noise,
                            scheduler="ddim", progress=False, decode=False)
    assert res.nonfinite.tolist() == [False, True]
    assert np.all(np.isfinite(res.latents[0])) and not np.all(np.isfinite(res.latents[1]))


def test_seed_is_an_int_or_a_prng_key(pipe_sd1):
    import jax

    args = dict(num_inference_steps=3, scheduler="ddim", progress=False, decode=False)
    by_int = pipe_sd1.generate(PROMPTS, G.constant(7.5), seed=5, **args)
    by_key = pipe_sd1.generate(PROMPTS, G.constant(7.5), seed=jax.random.PRNGKey(5), **args)
    np.testing.assert_array_equal(by_int.latents, by_key.latents)
    typed = pipe_sd1.generate(PROMPTS, G.constant(7.5), seed=jax.random.key(5), **args)
    np.testing.assert_array_equal(typed.latents, by_int.latents)  # same key bits, same noise
    with pytest.raises(ValueError, match="seed must be an int or a PRNG key"):
        pipe_sd1.generate(PROMPTS, G.constant(7.5), seed="five", **args)


def test_public_unet_fn_is_the_sampler_model(pipe_sd1):
    """pipe.unet_fn and pipe.params drive the functional sampler to the pipeline's result."""
    import jax.numpy as jnp

    noise = _noise(pipe_sd1, len(PROMPTS), seed=7)
    res = pipe_sd1.generate(PROMPTS, G.static_transition(500, 0.0, 7.5), num_inference_steps=STEPS, latents=noise,
                            scheduler="ddim", progress=False, decode=False)
    sched = pipe_sd1.make_scheduler("ddim", STEPS)
    plan = G.plan(G.static_transition(500, 0.0, 7.5), len(PROMPTS), sched.timesteps)
    trace = S.sample(pipe_sd1.params["unet"], sched, jnp.asarray(noise) * sched.init_noise_sigma,
                     pipe_sd1.encode_prompts(PROMPTS), pipe_sd1.encode_prompts([""] * len(PROMPTS)),
                     plan.before, plan.after, plan.detector, unet_fn=pipe_sd1.unet_fn)
    assert rel_err(trace.latents, res.latents) < 1e-5
    assert int(np.sum(trace.unet_evals)) == res.unet_evals
    np.testing.assert_array_equal(np.asarray(trace.scale), res.guidance_scale)


def test_load_pipeline_opens_the_shipped_toy():
    pipe = cfgbasin_jax.load_pipeline(cfgbasin_jax.TOY_MODEL)
    assert pipe.vae is None and pipe.default_size == 16 and pipe.latent_shape() == (3, 16, 16)
    with pytest.raises(ConversionError, match="unet_path"):
        cfgbasin_jax.load_pipeline(cfgbasin_jax.TOY_MODEL, unet_path=cfgbasin_jax.TOY_MODEL)


def test_conditioning_hook_is_generic(pipe_sd1):
    class Shift(S.Conditioning):
        """Adds a per-sample constant to the conditional embedding from step 0 on."""

        cond_fn = staticmethod(lambda cond, t, j, aux: cond + aux[:, None, None])

        def cond_aux(self, seed, sample_indices):
            return np.asarray(sample_indices, np.float32) * 0.0 + 0.5

    args = dict(num_inference_steps=3, scheduler="ddim", progress=False, decode=False, seed=1)
    plain = pipe_sd1.generate(PROMPTS, G.constant(7.5), **args)
    shifted = pipe_sd1.generate(PROMPTS, G.constant(7.5), conditioning=Shift(), **args)
    embeds = np.asarray(pipe_sd1.encode_prompts(PROMPTS)) + 0.5
    same = pipe_sd1.generate(PROMPTS, G.constant(7.5), prompt_embeds=embeds, **args)
    assert rel_err(shifted.latents, same.latents) < 1e-5 and rel_err(shifted.latents, plain.latents) > 1e-3
    with pytest.raises(ValueError, match="conditioning must be"):
        pipe_sd1.generate(PROMPTS, G.constant(7.5), conditioning=lambda c: c, **args)


def test_pixels_round_by_default_or_truncate_as_the_official_scripts(pipe_sd1):
    """uint8 conversion: diffusers rounds x * 255 (the library default); the official scripts'
    ``(x * 255).to(torch.uint8)`` truncates (pixels="truncate"), restated here in numpy."""
    img = np.asarray([-1.0, -0.999, 0.0, 0.0019, 0.002, 0.5, 0.99, 1.0, 1.5], np.float32)
    img = np.broadcast_to(img[None, None, None, :], (1, 3, 1, img.size))
    x = np.clip(img / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1) * np.float32(255)
    official = torch.from_numpy(np.ascontiguousarray(x)).to(torch.uint8).numpy()  # the official conversion
    np.testing.assert_array_equal(np.asarray(pipe_sd1._to_uint8(jnp.asarray(img), "truncate")), official)
    np.testing.assert_array_equal(np.asarray(pipe_sd1._to_uint8(jnp.asarray(img))), np.round(x).astype(np.uint8))
    assert np.any(np.round(x).astype(np.uint8) != official)  # the inputs tell the two apart
    kw = dict(num_inference_steps=STEPS, latents=_noise(pipe_sd1, 2, seed=6), scheduler="ddim", progress=False)
    rounded = pipe_sd1.generate(PROMPTS, **kw)
    truncated = pipe_sd1.generate(PROMPTS, pixels="truncate", **kw)
    np.testing.assert_array_equal(truncated.latents, rounded.latents)
    np.testing.assert_array_equal(truncated.images, pipe_sd1.decode(rounded.latents, "truncate"))
    diff = rounded.images.astype(int) - truncated.images
    assert diff.min() == 0 and diff.max() == 1 and 0.2 < np.mean(diff) < 0.8
