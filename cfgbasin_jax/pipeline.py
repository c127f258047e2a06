"""The user-facing pipeline: text encoding, initial noise, chunking, the compiled sampler, VAE decoding.

    pipe = cfgbasin_jax.load_pipeline("converted/sd14")
    result = pipe.generate(["a photo of a cat"], guidance=guidance.static_transition(500, 0.0, 7.5))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfgbasin_jax import schedulers
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import sampler as S
from cfgbasin_jax.method import sharding as parallel
from cfgbasin_jax.metrics.detection import DEFAULT_FPR, threshold_at_fpr
from cfgbasin_jax.models.vae import decoder_stages
from cfgbasin_jax.runtime import compile_cache, executables, memory


PIXEL_RULES = ("round", "truncate")
"""How decoded images in [0, 1] become uint8: "round" (diffusers' ``numpy_to_pil`` rounding, the
library default) or "truncate" (the official scripts' ``(x * 255).to(torch.uint8)``, one level lower
for about half of the pixels)."""


def check_pixels(owner: str, pixels) -> str:
    if pixels not in PIXEL_RULES:
        raise ValueError(f"{owner}: pixels must be one of {', '.join(PIXEL_RULES)}, got {pixels!r}")
    return pixels


@dataclasses.dataclass
class GenerationResult:
    """Outputs of :meth:`Pipeline.generate` for B prompts and S scheduler steps (numpy).

    images: uint8 [B,H,W,3] (None with decode=False). latents: float32 [B,C,h,w] final latents.
    noise_diff: float32 [B,S] ||eps_c - eps_u|| per step (NaN where a half was skipped).
    latent_cosine: float32 [B,S] 1 - cos(x_{j+1}, x_j) per step (for the exact latent-cosine rule,
    the recorded first pass). guidance_scale: float32 [B,S] the scale applied.
    transition_index, transition_t: int [B], step index and its timestep (-1 where none).
    transition_fallback: bool [B], the transition came from a fallback rule (e.g. the official
    OG+DTP index 5 when the signal has no minimum), not from a detection.
    timesteps: int [S]. unet_evals: UNet sample-evaluations spent on the B real samples.
    nonfinite: bool [B], the trajectory produced a NaN/Inf. sample_indices: int [B] noise indices.
    detector_state: the detector's final state, numpy leaves [B,...] (of the last pass).
    gate_score, gate_flagged: float32 / bool [B], a gated schedule's memorization score and flag
    (:func:`cfgbasin_jax.method.guidance.gated`); None for other schedules.
    """

    images: np.ndarray | None
    latents: np.ndarray
    noise_diff: np.ndarray
    latent_cosine: np.ndarray
    guidance_scale: np.ndarray
    transition_index: np.ndarray
    transition_t: np.ndarray
    timesteps: np.ndarray
    unet_evals: int
    nonfinite: np.ndarray
    sample_indices: np.ndarray
    prompts: list
    transition_fallback: np.ndarray | None = None
    detector_state: object = None
    gate_score: np.ndarray | None = None
    gate_flagged: np.ndarray | None = None


def prng_key(seed, owner: str = "generate") -> jax.Array:
    """The base PRNG key of ``seed``: an int -> ``PRNGKey(seed)``; a PRNG key (typed, or raw
    uint32 [2]) is used as it is. Anything else: one ValueError naming ``owner``."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.PRNGKey(int(seed))
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) and seed.shape == ():
        return seed
    if isinstance(seed, (jax.Array, np.ndarray)) and seed.dtype == np.uint32 and seed.shape == (2,):
        return jnp.asarray(seed)
    raise ValueError(f"{owner}: seed must be an int or a PRNG key (jax.random.key / PRNGKey), got {seed!r}")


def initial_noise(seed, sample_indices: Sequence[int], shape: tuple[int, ...]) -> jax.Array:
    """float32 [B,*shape]: sample i's noise from ``fold_in(prng_key(seed), sample_indices[i])``, so
    it depends only on (seed, global index), never on batch size, device count or resume.
    ``seed``: an int or a PRNG key."""
    base = prng_key(seed, "initial_noise")
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(sample_indices, jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


class SamplingInputs(NamedTuple):
    """Validated sampling arguments: prompts [B]; the Scheduler; sample_indices int [B]; latent
    shape (C,h,w); latents [B,C,h,w] or None; negative prompts [B]; devices; chunk (padded batch)."""

    prompts: list
    scheduler: object
    sample_indices: np.ndarray
    shape: tuple
    latents: np.ndarray | None
    negative: list
    devices: tuple
    chunk: int


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How :meth:`Pipeline.generate` samples (validated): seed (int or PRNG key), progress bars,
    half skipping, devices, the conditioning hook, replacement conditional embeddings [B,L,D] and
    whether to decode images."""

    seed: object = 0
    progress: bool = True
    skip_halves: bool = True
    devices: tuple = ()
    conditioning: S.Conditioning | None = None
    prompt_embeds: np.ndarray | None = None
    decode: bool = True
    pixels: str = "round"


class Pipeline:
    """Flax Stable Diffusion with transition-point guidance. Wraps loaded ``Components``
    (see :mod:`cfgbasin_jax.loading`): unet, vae, text_encoder modules, params, tokenizer, configs.
    ``components.vae`` may be None for a pixel-space model (the UNet denoises RGB in [-1, 1]).
    ``compilation_cache``: False (the default) leaves JAX's global configuration alone; True turns
    JAX's persistent compilation cache on in the default directory, a path in that one (see
    :mod:`cfgbasin_jax.runtime.compile_cache`; :func:`cfgbasin_jax.load_pipeline` asks for True).
    ``self.compilation_cache``: the cache directory in use (None: none)."""

    def __init__(self, components, compilation_cache=False):
        self.compilation_cache = compile_cache.enable(compilation_cache)
        self.components = components
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.params = components.params
        self.scheduler_config = dict(components.scheduler_config)
        self._samplers: dict = {}
        self._placed: tuple = (None, None, None)  # (key, replicated params, source kept alive)
        self._encode = jax.jit(self._encode_ids)
        self._decoders: dict = {}  # jitted decode stages per pixel rule, built on first use
        self._functions: dict = {}  # compiled functions of the layers above (owned_function)

    # ------------------------------------------------------------------ geometry
    @property
    def vae_scale_factor(self) -> int:
        """Latent-to-pixel factor (1 for a pixel-space model without VAE)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.components.configs["vae"]["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.components.configs["unet"]["in_channels"])

    @property
    def default_size(self) -> int:
        return int(self.components.configs["unet"]["sample_size"]) * self.vae_scale_factor

    @property
    def vae_scaling_factor(self) -> float:
        if self.vae is None:
            return 1.0
        return float(self.components.configs["vae"].get("scaling_factor", 0.18215))

    def latent_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(h, w) of the latents for an image of ``height`` x ``width`` pixels (default: the model's
        size); ValueError when the size does not fit the VAE and UNet downsampling."""
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        f = self.vae_scale_factor
        unet_f = 2 ** (len(self.components.configs["unet"]["block_out_channels"]) - 1)
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % (f * unet_f):
                raise ValueError(
                    f"generate: {name}={v!r} must be a positive multiple of {f * unet_f} "
                    f"(VAE factor {f} x UNet downsampling {unet_f})"
                )
        return height // f, width // f

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of one sample's latents."""
        return (self.latent_channels, *self.latent_hw(height, width))

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """int32 [B, model_max_length], padded and truncated like SD's pipelines."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        )
        return tok.input_ids.astype(np.int32)

    def _encode_ids(self, params, ids):
        ones = jnp.ones_like(ids)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
        out = self.text_encoder.apply({"params": params}, ids, ones, pos, deterministic=True)
        return out[0]

    def encode_prompts(self, prompts: Sequence[str], one_at_a_time: bool = False) -> jnp.ndarray:
        """[B, L, D] last hidden states of the text encoder. ``one_at_a_time=True`` encodes each
        prompt as a batch of 1, so its embedding has the same bits in any batch (XLA:CPU picks
        shape-dependent kernels; the official-precision signal needs batch-independent inputs)."""
        tokens = jnp.asarray(self.tokenize(prompts))
        if one_at_a_time:
            return jnp.concatenate([self._encode(self.params["text_encoder"], tokens[i:i + 1]) for i in range(len(tokens))])
        return self._encode(self.params["text_encoder"], tokens)

    # ------------------------------------------------------------------ images
    def _latents_in(self, latents):
        """[B,C,h,w] final latents -> the VAE's NHWC input in the model dtype."""
        return jnp.transpose(latents / self.vae_scaling_factor, (0, 2, 3, 1)).astype(self.components.dtype)

    @staticmethod
    def _to_uint8(img, pixels: str = "round"):
        """[B,3,H,W] in [-1, 1] -> uint8 [B,H,W,3]: ``x = clip(img / 2 + 0.5, 0, 1) * 255`` (float32),
        rounded as diffusers' SD pipelines do (``pixels="round"``), or truncated as the official
        scripts' ``(x * 255).to(torch.uint8)`` (``pixels="truncate"``)."""
        img = jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        x = jnp.transpose(img, (0, 2, 3, 1)) * 255.0
        return (jnp.round(x) if pixels == "round" else jnp.floor(x)).astype(jnp.uint8)

    def _decode_stages(self, pixels: str = "round") -> list:
        """The decode as jitted stages ``f(vae_params, x)`` (:func:`cfgbasin_jax.models.vae.decoder_stages`:
        one executable per resnet, so the host peak is the largest stage's); a pixel-space model
        (the UNet denoises RGB in [-1, 1]) has one stage."""
        if pixels not in self._decoders:
            if self.vae is None:
                stages = [lambda params, img: self._to_uint8(img, pixels)]
            else:
                first, *middle, last = decoder_stages(self.vae)
                stages = [lambda params, latents: first(params, self._latents_in(latents)), *middle,
                          lambda params, x: self._to_uint8(last(params, x), pixels)]
            self._decoders[pixels] = [jax.jit(stage) for stage in stages]
        return self._decoders[pixels]

    def decode(self, latents, pixels: str = "round") -> np.ndarray:
        """uint8 [B,H,W,3] from final latents [B,C,h,w]. ``pixels``: "round" (default, as diffusers'
        SD pipelines) or "truncate" (as the official scripts' ``(x * 255).to(torch.uint8)``)."""
        check_pixels("decode", pixels)
        x, params = jnp.asarray(latents), self.params.get("vae")
        param_bytes = sum(self.param_bytes().values())
        for stage in self._decode_stages(pixels):
            x = stage(params, x)
            if param_bytes >= memory.MIN_PARAM_BYTES:  # this stage's temporaries back to the OS first
                x.block_until_ready()
                memory.release_freed(param_bytes)
        return np.asarray(x)

    # ------------------------------------------------------------------ sampling
    def unet_fn(self, params, x, t, context):
        """The model output [N,C,h,w] for ``params`` (``pipe.params["unet"]``), sample x [N,C,h,w],
        timesteps t [N] and context [N,L,D] (the :data:`cfgbasin_jax.method.sampler.UnetFn` of this model)."""
        x = x.astype(self.components.dtype)
        return self.unet.apply({"params": params}, x, t, context.astype(self.components.dtype)).sample

    def sampler(self, progress: bool = False, skip_halves: bool = True, devices=None, cond_fn=None):
        """The jitted, device-sharded :func:`cfgbasin_jax.method.sampler.sample_loop`
        ``fn(params, scheduler, x0, cond, uncond, before, after, detector[, cond_aux])`` (cached per
        static configuration; jit itself caches per shape and detector structure). With ``cond_fn``
        (static, hashable) the function takes a ninth argument, the per-sample ``cond_aux`` pytree."""
        devices = parallel.resolve_devices(devices)
        key = (bool(progress), bool(skip_halves), devices) + (() if cond_fn is None else (cond_fn,))
        if key not in self._samplers:
            on_step = parallel.first_device_only(_progress_hook) if progress else None
            loop = functools.partial(
                S.sample_loop, unet_fn=self.unet_fn, on_step=on_step, skip_halves=bool(skip_halves),
                **({} if cond_fn is None else {"cond_fn": cond_fn}),
            )
            sharded = parallel.sharded_sample_loop(loop, parallel.data_mesh(devices), cond_aux=cond_fn is not None)
            self._samplers[key] = jax.jit(sharded) if cond_fn is not None else self._serialized(
                jax.jit(sharded), "sampler", progress=bool(progress), skip_halves=bool(skip_halves),
                devices=[str(d) for d in devices])
        return self._samplers[key]

    def _serialized(self, jitted, name: str, **static):
        """``jitted`` with its executables serialized across processes (:mod:`cfgbasin_jax.runtime.executables`),
        keyed by ``static``, the model's configs and dtype, and the inputs."""
        return executables.Executables.wrap(jitted, name, {**static, "dtype": jnp.dtype(self.components.dtype).name,
                                                            "configs": self.components.configs})

    def owned_function(self, key: tuple, build):
        """``build()`` on the first call with ``key``, then the same object for as long as this
        pipeline lives: how the baselines keep their compiled functions (which close over this
        model) with the model instead of in module state. ``key[0]`` names the owner ("wen")."""
        if key not in self._functions:
            self._functions[key] = build()
        return self._functions[key]

    def owned_functions(self, owner: str) -> list:
        """The functions :meth:`owned_function` holds for ``owner`` (``key[0]``)."""
        return [fn for key, fn in self._functions.items() if key[0] == owner]

    def compile_count(self) -> int:
        """Number of sampler compilations so far (all configurations)."""
        return sum(fn._cache_size() for fn in self._samplers.values())

    def param_bytes(self) -> dict:
        """Bytes of parameters per component (e.g. to compare float32 and bfloat16 loads)."""
        return {k: int(sum(x.nbytes for x in jax.tree_util.tree_leaves(v))) for k, v in self.params.items()}

    def make_scheduler(self, name: str | None, num_inference_steps: int):
        """The :class:`cfgbasin_jax.schedulers.Scheduler` ``name`` (None: the model's own) configured
        from this model's scheduler config."""
        return schedulers.make_scheduler(name, self.scheduler_config, num_inference_steps)

    def replicated_unet_params(self, devices: tuple):
        """UNet params placed on every device of ``devices`` (cached: placed once per device set)."""
        source = self.params["unet"]
        if self._placed[0] != (devices, id(source)):
            self._placed = ((devices, id(source)), parallel.replicate(source, parallel.data_mesh(devices)), source)
        return self._placed[1]

    def _run_pass(self, sched, x0, cond, uncond, before, after, detector, opts: SamplingOptions, cond_aux) -> S.Trace:
        """One sharded sampling pass; returns the trace on the host."""
        hook = opts.conditioning
        fn = self.sampler(opts.progress, opts.skip_halves, opts.devices, None if hook is None else hook.cond_fn)
        mesh = parallel.data_mesh(opts.devices)
        aux = () if hook is None else (cond_aux,)
        data = parallel.shard_batch((x0, cond, uncond, before, after, detector) + aux, mesh)
        trace = jax.device_get(fn(self.replicated_unet_params(opts.devices), parallel.replicate(sched, mesh), *data))
        if opts.progress:
            jax.effects_barrier()
        return trace

    def sampling_inputs(self, owner: str, prompts, num_inference_steps, latents, height, width, scheduler,
                        negative_prompt, sample_indices, batch_size, devices) -> SamplingInputs:
        """Validate and normalise the sampling arguments shared by :meth:`generate` and the baselines
        (errors are prefixed with ``owner``); nothing is compiled here."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError(f"{owner}: the prompt list is empty")
        b = len(prompts)
        h, w = self.latent_hw(height, width)
        sched = self.make_scheduler(scheduler, num_inference_steps)
        sample_indices = np.arange(b) if sample_indices is None else np.asarray(sample_indices)
        if sample_indices.shape != (b,):
            raise ValueError(f"{owner}: sample_indices has shape {sample_indices.shape}, expected ({b},)")
        shape = (self.latent_channels, h, w)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (b, *shape):
                raise ValueError(f"{owner}: latents have shape {latents.shape}, expected {(b, *shape)}")
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * b if isinstance(negative, str) else list(negative)
        if len(negative) != b:
            raise ValueError(f"{owner}: {len(negative)} negative prompts for {b} prompts")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ValueError(f"{owner}: batch_size must be a positive integer, got {batch_size!r}")
        devices = parallel.resolve_devices(devices)
        chunk = parallel.padded_size(min(batch_size or b, b), len(devices))
        return SamplingInputs(prompts, sched, sample_indices, shape, latents, negative, devices, chunk)

    def _check_prompt_embeds(self, prompt_embeds, b: int):
        if prompt_embeds is None:
            return None
        prompt_embeds = np.asarray(prompt_embeds, np.float32)
        hidden = int(self.components.configs["text_encoder"].get("hidden_size", 512))
        expected = (b, self.tokenizer.model_max_length, hidden)
        if prompt_embeds.shape != expected:
            raise ValueError(f"generate: prompt_embeds have shape {prompt_embeds.shape}, expected {expected}")
        return prompt_embeds

    def generate(
        self,
        prompts: str | Sequence[str],
        guidance: G.Guidance | Sequence[G.Guidance] = G.constant(G.CFG_SCALE),
        num_inference_steps: int = 50,
        seed=0,
        latents=None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        progress: bool = True,
        negative_prompt: str | Sequence[str] | None = None,
        sample_indices: Sequence[int] | None = None,
        decode: bool = True,
        skip_halves: bool = True,
        devices=None,
        batch_size: int | None = None,
        prompt_embeds=None,
        conditioning: S.Conditioning | None = None,
        pixels: str = "round",
    ) -> GenerationResult:
        """Sample B images with the compiled loop, data-parallel over ``devices``.

        guidance: one :class:`~cfgbasin_jax.method.guidance.Guidance` or one per prompt.
        seed: an int or a PRNG key (``jax.random.key(0)``).
        latents: optional initial noise [B,C,h,w] BEFORE init_noise_sigma scaling (as diffusers'
          ``prepare_latents``); otherwise drawn per sample from (seed, sample_indices[i]).
        sample_indices: global indices of the prompts (default 0..B-1) for the per-sample noise, so
          an image never depends on batch size, device count or resume.
        scheduler: "dpm++2m" | "ddim" | "euler" | "pndm" (default: the model's scheduler config).
        skip_halves: run only the UNet half a step needs when every scale is 0 or every scale is 1.
        devices: None (all local devices), a count, or a list; batch_size: samples per compiled call
          (default: all B), rounded up to a multiple of the device count; padding is dropped.
        prompt_embeds: optional conditional text embeddings [B,L,D] used instead of encoding
          ``prompts`` (which still name the samples), e.g. optimised ones.
        conditioning: optional :class:`cfgbasin_jax.method.sampler.Conditioning` hook rewriting the
          conditional embedding inside the compiled loop (e.g. :class:`cfgbasin_jax.baselines.CADS`).
        pixels: "round" (default, diffusers' rounding) or "truncate" (the official scripts'
          ``(x * 255).to(torch.uint8)``); see :data:`PIXEL_RULES`.
        """
        check_pixels("generate", pixels)
        inputs = self.sampling_inputs("generate", prompts, num_inference_steps, latents, height, width, scheduler,
                                      negative_prompt, sample_indices, batch_size, devices)
        prompts, sched, sample_indices, shape, latents, negative, devices, chunk = inputs
        b = len(prompts)
        timesteps = np.asarray(sched.timesteps)
        plan = G.plan(guidance, b, timesteps, sched.num_train_timesteps)
        if conditioning is not None and not isinstance(conditioning, S.Conditioning):
            raise ValueError(f"generate: conditioning must be a cfgbasin_jax.method.sampler.Conditioning, got {conditioning!r}")
        opts = SamplingOptions(seed=prng_key(seed), progress=bool(progress), skip_halves=bool(skip_halves),
                               devices=devices, conditioning=conditioning,
                               prompt_embeds=self._check_prompt_embeds(prompt_embeds, b), decode=bool(decode),
                               pixels=pixels)

        starts = range(0, b, chunk)
        with _progress_bar(progress, len(starts) * plan.detector.passes * len(timesteps)):
            parts = [self._generate_chunk(sched, plan, prompts, negative, sample_indices, latents, shape,
                                          slice(i, min(i + chunk, b)), chunk, opts) for i in starts]
        cat = lambda k: np.concatenate([p[k] for p in parts], axis=0)  # noqa: E731
        index = cat("transition_index")
        state = jax.tree.map(lambda *xs: np.concatenate(xs), *[p["detector_state"] for p in parts])
        report = plan.detector.report(state)
        return GenerationResult(
            images=cat("images") if decode else None,
            latents=cat("latents"),
            noise_diff=cat("noise_diff"),
            latent_cosine=cat("latent_cosine"),
            guidance_scale=cat("guidance_scale"),
            transition_index=index,
            transition_t=np.where(index >= 0, timesteps[np.clip(index, 0, len(timesteps) - 1)], -1),
            timesteps=timesteps,
            unet_evals=int(sum(p["unet_evals"] for p in parts)),
            nonfinite=cat("nonfinite"),
            sample_indices=sample_indices,
            prompts=prompts,
            transition_fallback=cat("transition_fallback"),
            detector_state=state,
            gate_score=report.get("gate_score"),
            gate_flagged=report.get("gate_flagged"),
        )

    def _generate_chunk(self, sched, plan: G.Plan, prompts, negative, sample_indices, latents, shape, rows, size,
                        opts: SamplingOptions) -> dict:
        """Sample prompts[rows] padded to ``size`` (every pass the detector asks for); returns
        per-sample numpy outputs for the real rows."""
        n = rows.stop - rows.start
        pad = lambda x: parallel.pad_rows(np.asarray(x)[rows], size)  # noqa: E731
        noise = initial_noise(opts.seed, pad(sample_indices), shape) if latents is None else jnp.asarray(pad(latents))
        per_sample = plan.detector.pass_detector().per_sample_unet  # batch-independent bits (official precision)
        if opts.prompt_embeds is None:
            cond = self.encode_prompts(list(pad(np.asarray(prompts, dtype=object))), per_sample)
        else:
            cond = jnp.asarray(pad(opts.prompt_embeds))
        uncond = self.encode_prompts(list(pad(np.asarray(negative, dtype=object))), per_sample)
        aux = None if opts.conditioning is None else opts.conditioning.cond_aux(opts.seed, pad(sample_indices))
        x0 = noise * sched.init_noise_sigma
        before, after, detector = pad(plan.before), pad(plan.after), jax.tree.map(pad, plan.detector)
        run = lambda det: self._run_pass(sched, x0, cond, uncond, before, after, det, opts, aux)  # noqa: E731
        trace = S.combine_passes(S.run_passes(run, detector))
        real = lambda x: np.asarray(x)[:n]  # noqa: E731
        if opts.decode:  # the sampler's freed temporaries back to the OS before the decoder's come
            memory.release_freed(sum(self.param_bytes().values()))
        return dict(
            images=self.decode(trace.latents, opts.pixels)[:n] if opts.decode else None,
            latents=real(trace.latents),
            noise_diff=real(trace.noise_diff),
            latent_cosine=real(trace.latent_cosine),
            guidance_scale=real(trace.scale),
            transition_index=real(trace.transition_index),
            transition_fallback=real(trace.transition_fallback),
            nonfinite=real(trace.nonfinite),
            unet_evals=int(np.sum(real(trace.unet_evals))),
            detector_state=jax.tree.map(real, trace.detector_state),
        )


# ---------------------------------------------------------------------- progress (host side)
class _StepBar:
    """The tqdm bar that the compiled loop's per-step callback advances. One per process, owned by
    :func:`_progress_bar`: it holds the bar of the generate call in progress (None between calls; the
    calls of one process run one at a time), so the compiled function never captures a bar."""

    def __init__(self):
        self.bar = None

    def tick(self, _):
        if self.bar is not None:
            self.bar.update(1)


_STEP_BAR = _StepBar()


def _progress_hook(j):
    jax.debug.callback(_STEP_BAR.tick, j)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int):
    """A tqdm bar advanced once per denoising step from inside the compiled loop."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="denoising", unit="step", leave=False) as bar:
        _STEP_BAR.bar = bar
        try:
            yield bar
        finally:
            jax.effects_barrier()
            _STEP_BAR.bar = None


def calibrate_threshold(pipe, plain_prompts, guidance, fpr: float = DEFAULT_FPR, **generate_kwargs) -> float:
    """The threshold of the gated schedule ``guidance`` (:func:`cfgbasin_jax.method.guidance.gated`)
    at false-positive rate ``fpr`` on ``plain_prompts``: samples them with the gate open for none
    (constant CFG, no decoding; ``generate_kwargs`` as for ``pipe.generate``, e.g. seed, steps,
    scheduler, sample_indices), then :func:`threshold_at_fpr` of their in-loop scores."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    probe = G.with_threshold(guidance, float(np.finfo(np.float32).max))
    res = pipe.generate(list(plain_prompts), probe, decode=False, **generate_kwargs)
    return threshold_at_fpr(res.gate_score, fpr)
