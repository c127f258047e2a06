"""The user-facing pipeline: text encoding, initial noise, the compiled sampler, VAE decoding.

    pipe = cfgbasin_jax.load_pipeline("converted/sd14")
    result = pipe.generate(["a photo of a cat"], guidance=guidance.static_transition(500, 0.0, 7.5))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfgbasin_jax import guidance as G
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


def _count_unet_evals(branch: np.ndarray, n_samples: int) -> int:
    halves = np.where(np.asarray(branch) == S.BOTH, 2, 1)
    return int(halves.sum()) * n_samples


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

    def sampler(self, detector: str, progress: bool, skip_halves: bool = True):
        """The jitted :func:`cfgbasin_jax.sampler.sample_loop` for one detector kind (cached)."""
        key = (detector, bool(progress), bool(skip_halves))
        if key not in self._samplers:
            fn = functools.partial(
                S.sample_loop, unet_fn=self._unet_fn, detector=detector, progress=bool(progress), skip_halves=bool(skip_halves)
            )
            self._samplers[key] = jax.jit(fn)
        return self._samplers[key]

    def compile_count(self) -> int:
        """Number of sampler compilations so far (all detector kinds)."""
        return sum(fn._cache_size() for fn in self._samplers.values())

    def make_scheduler(self, name: str | None, num_inference_steps: int):
        return schedulers.make_scheduler(name, self.scheduler_config, num_inference_steps)

    def _run(self, sched, x0, cond, uncond, plan: G.Plan, detector: str, progress: bool, skip_halves: bool):
        fn = self.sampler(detector, progress, skip_halves)
        args = (self.params["unet"], sched, x0, cond, uncond,
                jnp.asarray(plan.before), jnp.asarray(plan.after), jnp.asarray(plan.switch_index))
        if not progress:
            return jax.device_get(fn(*args))
        from tqdm.auto import tqdm

        with tqdm(total=int(sched.timesteps.shape[0]), desc="denoising", unit="step", leave=False) as bar:
            S._PROGRESS["bar"] = bar
            try:
                return jax.device_get(jax.block_until_ready(fn(*args)))
            finally:
                jax.effects_barrier()
                S._PROGRESS["bar"] = None

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
    ) -> GenerationResult:
        """Sample B images in one compiled loop.

        guidance: one :class:`~cfgbasin_jax.guidance.Guidance` or one per prompt.
        latents: optional initial noise [B,C,h,w] BEFORE init_noise_sigma scaling (as diffusers'
          ``prepare_latents``); otherwise drawn per sample from (seed, sample_indices[i]).
        sample_indices: global indices of the prompts (default 0..B-1) for the per-sample noise.
        skip_halves: run only the UNet half a step needs when every scale is 0 or every scale is 1.
        scheduler: "dpm++2m" | "ddim" | "euler" | "pndm" (default: the model's scheduler config).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("generate: the prompt list is empty")
        b = len(prompts)
        h, w = self._latent_hw(height, width)
        sched = self.make_scheduler(scheduler, num_inference_steps)
        timesteps = np.asarray(sched.timesteps)
        plan = G.plan(guidance, b, timesteps, sched.num_train_timesteps)
        sample_indices = np.arange(b) if sample_indices is None else np.asarray(sample_indices)
        if sample_indices.shape != (b,):
            raise ValueError(f"generate: sample_indices has shape {sample_indices.shape}, expected ({b},)")
        shape = (self.latent_channels, h, w)
        if latents is None:
            noise = initial_noise(seed, sample_indices, shape)
        else:
            noise = jnp.asarray(latents, jnp.float32)
            if noise.shape != (b, *shape):
                raise ValueError(f"generate: latents have shape {noise.shape}, expected {(b, *shape)}")
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * b if isinstance(negative, str) else list(negative)
        if len(negative) != b:
            raise ValueError(f"generate: {len(negative)} negative prompts for {b} prompts")

        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts(negative)
        x0 = noise * sched.init_noise_sigma
        evals = 0
        recorded_cosine = None
        if plan.two_pass:
            # Exact opposite-guidance DTP: pass 1 under `before` records c; pass 2 replays with the
            # official transition index per sample.
            record = plan._replace(switch_index=np.full(b, len(timesteps), np.int32))
            first_pass = self._run(sched, x0, cond, uncond, record, "fixed", progress, skip_halves)
            evals += _count_unet_evals(first_pass.branch, b)
            recorded_cosine = np.asarray(first_pass.latent_cosine).T
            index = np.asarray([G.latent_cosine_transition_index(c) for c in recorded_cosine], np.int32)
            plan = plan._replace(switch_index=index)
        trace = self._run(sched, x0, cond, uncond, plan, plan.detector, progress, skip_halves)
        evals += _count_unet_evals(trace.branch, b)
        index = np.asarray(trace.transition_index)
        images = self.decode(trace.latents) if decode else None
        return GenerationResult(
            images=images,
            latents=np.asarray(trace.latents),
            noise_diff=np.asarray(trace.noise_diff).T,
            latent_cosine=recorded_cosine if recorded_cosine is not None else np.asarray(trace.latent_cosine).T,
            guidance_scale=np.asarray(trace.scale).T,
            transition_index=index,
            transition_t=np.where(index >= 0, timesteps[np.clip(index, 0, len(timesteps) - 1)], -1),
            timesteps=timesteps,
            unet_evals=evals,
            nonfinite=np.asarray(trace.nonfinite),
            sample_indices=sample_indices,
            prompts=prompts,
        )
