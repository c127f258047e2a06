"""The user-facing pipeline: text encoding, initial noise, the compiled sampler, VAE decoding.

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

from cfgbasin_jax import guidance as G
from cfgbasin_jax import parallel
from cfgbasin_jax import sampler as S
from cfgbasin_jax import schedulers


@dataclasses.dataclass
class GenerationResult:
    """Outputs of :meth:`Pipeline.generate` for B prompts and S scheduler steps (numpy).

    images: uint8 [B,H,W,3] (None with decode=False). latents: float32 [B,C,h,w] final latents.
    noise_diff: float32 [B,S] ||eps_c - eps_u|| per step (NaN where a half was skipped).
    latent_cosine: float32 [B,S] 1 - cos(x_{j+1}, x_j) per step (for the exact latent-cosine rule,
    the recorded first pass). guidance_scale: float32 [B,S] the scale applied.
    transition_index, transition_t: int [B], step index and its timestep (-1 where none).
    timesteps: int [S]. unet_evals: UNet sample-evaluations spent on the B real samples.
    nonfinite: bool [B], the trajectory produced a NaN/Inf. sample_indices: int [B] noise indices.
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


def initial_noise(seed: int, sample_indices: Sequence[int], shape: tuple[int, ...]) -> jnp.ndarray:
    """float32 [B,*shape]: sample i's noise from ``fold_in(PRNGKey(seed), sample_indices[i])``, so it
    depends only on (seed, global index), never on batch size, device count or resume."""
    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(sample_indices, jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _count_unet_evals(branch: np.ndarray, real_per_device: np.ndarray) -> int:
    """UNet sample-evaluations: branch [n_dev, S] (halves run per device and step) times the
    number of real (non-padding) samples on each device [n_dev]."""
    halves = np.where(np.asarray(branch) == S.BOTH, 2, 1)
    return int(np.sum(halves.sum(axis=1) * np.asarray(real_per_device)))


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


class Pipeline:
    """Flax Stable Diffusion with transition-point guidance. Wraps loaded ``Components``
    (see :mod:`cfgbasin_jax.loading`): unet, vae, text_encoder modules, params, tokenizer, configs.
    ``components.vae`` may be None for a pixel-space model (the UNet denoises RGB in [-1, 1])."""

    def __init__(self, components):
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
        self._decode = jax.jit(self._decode_latents)

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

    def _latent_hw(self, height: int | None, width: int | None) -> tuple[int, int]:
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

    def encode_prompts(self, prompts: Sequence[str]) -> jnp.ndarray:
        """[B, L, D] last hidden states of the text encoder."""
        return self._encode(self.params["text_encoder"], jnp.asarray(self.tokenize(prompts)))

    # ------------------------------------------------------------------ images
    def _decode_latents(self, params, latents):
        if self.vae is None:  # pixel-space model: the "latents" are the image in [-1, 1]
            img = latents
        else:
            z = jnp.transpose(latents / self.vae_scaling_factor, (0, 2, 3, 1)).astype(self.components.dtype)
            img = self.vae.apply({"params": params}, z, method=self.vae.decode).sample
        img = jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return jnp.round(jnp.transpose(img, (0, 2, 3, 1)) * 255.0).astype(jnp.uint8)

    def decode(self, latents) -> np.ndarray:
        """uint8 [B,H,W,3] from final latents [B,C,h,w], as diffusers' SD pipelines do."""
        return np.asarray(self._decode(self.params.get("vae"), jnp.asarray(latents)))

    # ------------------------------------------------------------------ sampling
    def _unet_fn(self, params, x, t, context):
        x = x.astype(self.components.dtype)
        return self.unet.apply({"params": params}, x, t, context.astype(self.components.dtype)).sample

    def sampler(self, detector: str, progress: bool = False, skip_halves: bool = True, devices=None, cond_fn=None,
                precision: str = "stable"):
        """The jitted, device-sharded :func:`cfgbasin_jax.sampler.sample_loop` (cached per static
        configuration; jit itself caches per shape). With ``cond_fn`` (static, hashable) the function
        takes a ninth argument, the per-sample ``cond_aux`` pytree. ``precision``: the latent-cosine
        formula (:data:`cfgbasin_jax.guidance.PRECISIONS`)."""
        devices = parallel.resolve_devices(devices)
        key = (detector, bool(progress), bool(skip_halves), devices) + (() if cond_fn is None else (cond_fn,))
        key += (() if precision == "stable" else (precision,))
        if key not in self._samplers:
            on_step = parallel.first_device_only(_progress_hook) if progress else None
            loop = functools.partial(
                S.sample_loop, unet_fn=self._unet_fn, detector=detector, on_step=on_step, skip_halves=bool(skip_halves),
                precision=precision, **({} if cond_fn is None else {"cond_fn": cond_fn}),
            )
            sharded = parallel.sharded_sample_loop(loop, parallel.data_mesh(devices), cond_aux=cond_fn is not None)
            self._samplers[key] = jax.jit(sharded)
        return self._samplers[key]

    def compile_count(self) -> int:
        """Number of sampler compilations so far (all configurations)."""
        return sum(fn._cache_size() for fn in self._samplers.values())

    def param_bytes(self) -> dict:
        """Bytes of parameters per component (e.g. to compare float32 and bfloat16 loads)."""
        return {k: int(sum(x.nbytes for x in jax.tree_util.tree_leaves(v))) for k, v in self.params.items()}

    def make_scheduler(self, name: str | None, num_inference_steps: int):
        return schedulers.make_scheduler(name, self.scheduler_config, num_inference_steps)

    def _replicated_unet_params(self, devices: tuple):
        """UNet params placed on every device of ``devices`` (cached: placed once per device set)."""
        source = self.params["unet"]
        if self._placed[0] != (devices, id(source)):
            self._placed = ((devices, id(source)), parallel.replicate(source, parallel.data_mesh(devices)), source)
        return self._placed[1]

    def _run(self, sched, x0, cond, uncond, plan: G.Plan, detector: str, opts: dict, cond_aux=None) -> S.Trace:
        devices = opts["devices"]
        fn = self.sampler(detector, opts["progress"], opts["skip_halves"], devices, opts.get("cond_fn"), plan.precision)
        mesh = parallel.data_mesh(devices)
        aux = () if opts.get("cond_fn") is None else (cond_aux,)
        data = parallel.shard_batch((x0, cond, uncond, plan.before, plan.after, plan.switch_index) + aux, mesh)
        trace = jax.device_get(fn(self._replicated_unet_params(devices), parallel.replicate(sched, mesh), *data))
        if opts["progress"]:
            jax.effects_barrier()
        return trace

    def _sample_chunk(self, sched, x0, cond, uncond, plan: G.Plan, n_real: int, opts: dict, cond_aux=None):
        """One padded chunk through the sampler (two passes for the exact latent-cosine rule).
        Returns (trace, recorded latent_cosine [S,b] or None, UNet evaluations of the real samples)."""
        evals, recorded = 0, None
        per_device = x0.shape[0] // len(opts["devices"])
        real = np.clip(n_real - per_device * np.arange(len(opts["devices"])), 0, per_device)
        if plan.two_pass:
            # Exact opposite-guidance DTP: pass 1 under `before` records c; pass 2 replays from the
            # same noise with each sample's official transition index.
            steps = plan.before.shape[1]
            first = self._run(sched, x0, cond, uncond, plan._replace(switch_index=np.full_like(plan.switch_index, steps)), "fixed",
                              opts, cond_aux)
            evals += _count_unet_evals(first.branch, real)
            recorded = np.asarray(first.latent_cosine)
            index = [G.latent_cosine_transition_index(c) for c in recorded.T]
            plan = plan._replace(switch_index=np.asarray(index, np.int32))
        trace = self._run(sched, x0, cond, uncond, plan, plan.detector, opts, cond_aux)
        return trace, recorded, evals + _count_unet_evals(trace.branch, real)

    def sampling_inputs(self, owner: str, prompts, num_inference_steps, latents, height, width, scheduler,
                        negative_prompt, sample_indices, batch_size, devices) -> SamplingInputs:
        """Validate and normalise the sampling arguments shared by :meth:`generate` and the baselines
        (errors are prefixed with ``owner``); nothing is compiled here."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError(f"{owner}: the prompt list is empty")
        b = len(prompts)
        h, w = self._latent_hw(height, width)
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

    def generate(
        self,
        prompts: str | Sequence[str],
        guidance: G.Guidance | Sequence[G.Guidance] = G.constant(7.5),
        num_inference_steps: int = 50,
        seed: int = 0,
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
        cads=None,
    ) -> GenerationResult:
        """Sample B images with the compiled loop, data-parallel over ``devices``.

        guidance: one :class:`~cfgbasin_jax.guidance.Guidance` or one per prompt.
        latents: optional initial noise [B,C,h,w] BEFORE init_noise_sigma scaling (as diffusers'
          ``prepare_latents``); otherwise drawn per sample from (seed, sample_indices[i]).
        sample_indices: global indices of the prompts (default 0..B-1) for the per-sample noise, so
          an image never depends on batch size, device count or resume.
        scheduler: "dpm++2m" | "ddim" | "euler" | "pndm" (default: the model's scheduler config).
        skip_halves: run only the UNet half a step needs when every scale is 0 or every scale is 1.
        devices: None (all local devices), a count, or a list; batch_size: samples per compiled call
          (default: all B), rounded up to a multiple of the device count; padding is dropped.
        prompt_embeds: optional conditional text embeddings [B,L,D] used instead of encoding
          ``prompts`` (which still name the samples), e.g. from :func:`cfgbasin_jax.baselines.wen_optimize`.
        cads: optional :class:`cfgbasin_jax.baselines.CADS` (condition-annealed noise on the
          conditional embedding inside the compiled loop; keyed per (seed, sample index)).
        """
        inputs = self.sampling_inputs("generate", prompts, num_inference_steps, latents, height, width, scheduler,
                                      negative_prompt, sample_indices, batch_size, devices)
        prompts, sched, sample_indices, shape, latents, negative, devices, chunk = inputs
        b = len(prompts)
        timesteps = np.asarray(sched.timesteps)
        plan = G.plan(guidance, b, timesteps, sched.num_train_timesteps)
        if prompt_embeds is not None:
            prompt_embeds = np.asarray(prompt_embeds, np.float32)
            hidden = int(self.components.configs["text_encoder"].get("hidden_size", 512))
            expected = (b, self.tokenizer.model_max_length, hidden)
            if prompt_embeds.shape != expected:
                raise ValueError(f"generate: prompt_embeds have shape {prompt_embeds.shape}, expected {expected}")
        if cads is not None and not (callable(getattr(cads, "cond_fn", None)) and hasattr(cads, "cond_aux")):
            raise ValueError(f"generate: cads must be a cfgbasin_jax.baselines.CADS, got {cads!r}")
        opts = dict(progress=bool(progress), skip_halves=bool(skip_halves), devices=devices,
                    cond_fn=None if cads is None else cads.cond_fn, cads=cads, prompt_embeds=prompt_embeds, seed=seed)

        starts = range(0, b, chunk)
        passes = 2 if plan.two_pass else 1
        with _progress_bar(progress, len(starts) * passes * len(timesteps)):
            parts = [self._generate_chunk(sched, plan, prompts, negative, sample_indices, latents, seed, shape,
                                          slice(i, min(i + chunk, b)), chunk, decode, opts) for i in starts]
        cat = lambda k: np.concatenate([p[k] for p in parts], axis=0)  # noqa: E731
        index = cat("transition_index")
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
        )

    def _generate_chunk(self, sched, plan, prompts, negative, sample_indices, latents, seed, shape, rows, size,
                        decode, opts) -> dict:
        """Sample prompts[rows] padded to ``size``; returns per-sample numpy outputs for the real rows."""
        n = rows.stop - rows.start
        pad = lambda x: parallel.pad_rows(np.asarray(x)[rows], size)  # noqa: E731
        if latents is None:
            noise = initial_noise(seed, pad(sample_indices), shape)
        else:
            noise = jnp.asarray(pad(latents))
        if opts.get("prompt_embeds") is None:
            cond = self.encode_prompts(list(pad(np.asarray(prompts, dtype=object))))
        else:
            cond = jnp.asarray(pad(opts["prompt_embeds"]))
        uncond = self.encode_prompts(list(pad(np.asarray(negative, dtype=object))))
        aux = None if opts.get("cads") is None else opts["cads"].cond_aux(seed, pad(sample_indices))
        chunk_plan = plan._replace(before=pad(plan.before), after=pad(plan.after), switch_index=pad(plan.switch_index))
        trace, recorded, evals = self._sample_chunk(sched, noise * sched.init_noise_sigma, cond, uncond, chunk_plan, n, opts,
                                                    aux)
        cosine = recorded if recorded is not None else np.asarray(trace.latent_cosine)
        return dict(
            images=self.decode(trace.latents)[:n] if decode else None,
            latents=np.asarray(trace.latents)[:n],
            noise_diff=np.asarray(trace.noise_diff).T[:n],
            latent_cosine=cosine.T[:n],
            guidance_scale=np.asarray(trace.scale).T[:n],
            transition_index=np.asarray(trace.transition_index)[:n],
            nonfinite=np.asarray(trace.nonfinite)[:n],
            unet_evals=evals,
        )


# ---------------------------------------------------------------------- progress (host side)
_BAR: dict = {"bar": None}


def _tick(_):
    bar = _BAR["bar"]
    if bar is not None:
        bar.update(1)


def _progress_hook(j):
    jax.debug.callback(_tick, j)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int):
    """A tqdm bar advanced once per denoising step from inside the compiled loop."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="denoising", unit="step", leave=False) as bar:
        _BAR["bar"] = bar
        try:
            yield bar
        finally:
            jax.effects_barrier()
            _BAR["bar"] = None
