"""The runners: ways to sample the same model, each a function ``() -> Output``.

  ours          cfgbasin_jax Pipeline.generate: one compiled lax.scan for the whole batch (a)
  torch_loop    the official scripts' structure in PyTorch: batch 1, Python loop over steps, the
                transition decided on the host every step (host sync each step) (b)
  torch_pipe    diffusers' StableDiffusionPipeline, constant CFG only (c)
  flax_pipe     diffusers' FlaxStableDiffusionPipeline (its own Flax models), constant CFG only (d);
                classic stack only (diffusers < 0.40), else skipped
  flax_loop     the official structure on our Flax model: batch 1, jitted UNet call per step, host
                decision each step (issue 4's Python-loop baseline)

Methods (the same schedule in every runner that can express it):
  constant  CFG 7.5 at every step
  stp       static transition point: scale 0 while t > 500, 7.5 from t <= 500
  dtp       dynamic transition point: 1.0 until the first local minimum of ||eps_c - eps_u||, 7.5 after
  og_dtp    opposite guidance + DTP: -2.0 until the first local minimum of the latents' cosine
            distance (exact rule: a recording pass, then the replay), 7.5 after
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

PROMPTS = [
    "a photo of a cat",
    "an astronaut riding a horse on mars",
    "a red car in the city at night",
    "oil painting of a tree by a river",
    "a dog sitting on the beach at sunset",
    "portrait of a woman in van gogh style",
    "a white house with a blue sky",
    "a green mountain forest landscape",
    "a bird on a flower",
    "a man standing by a black car",
    "starry night sky over the city",
    "a horse in the forest",
    "high quality detailed picture of the moon",
    "a drawing of a red flower",
    "an image of a house by the river",
    "a blue car at the beach",
]

METHODS = ("constant", "stp", "dtp", "og_dtp")
METHOD_LABELS = {
    "constant": "constant CFG 7.5",
    "stp": "STP (0 above t=500, then 7.5)",
    "dtp": "DTP (1.0 until the noise-difference minimum, then 7.5)",
    "og_dtp": "OG+DTP (-2.0 until the latent-cosine minimum, exact 2-pass, then 7.5)",
}
SCALE = 7.5
STP_T, STP_BEFORE = 500, 0.0
DTP_BEFORE = 1.0
OG_BEFORE = -2.0

# runner -> methods it can express
RUNNER_METHODS = {
    "ours": METHODS,
    "torch_loop": METHODS,
    "torch_pipe": ("constant",),
    "flax_pipe": ("constant",),
    "flax_loop": METHODS,
}
RUNNER_LABELS = {
    "ours": "(a) ours: compiled lax.scan sampler",
    "torch_loop": "(b) PyTorch loop, official structure (batch 1)",
    "torch_pipe": "(c) diffusers StableDiffusionPipeline (PyTorch)",
    "flax_pipe": "(d) diffusers FlaxStableDiffusionPipeline",
    "flax_loop": "Flax loop, official structure (batch 1, our model)",
}


@dataclasses.dataclass
class Output:
    """images: uint8 [N,H,W,3]; unet_evals: UNet sample-evaluations spent on the N images."""

    images: np.ndarray
    unet_evals: int


def guidance(method: str):
    """The cfgbasin_jax Guidance of a method."""
    from cfgbasin_jax import guidance as G

    if method == "constant":
        return G.constant(SCALE)
    if method == "stp":
        return G.static_transition(STP_T, STP_BEFORE, SCALE)
    if method == "dtp":
        return G.dynamic_transition(DTP_BEFORE, SCALE)
    if method == "og_dtp":
        return G.dynamic_transition(OG_BEFORE, SCALE, signal="latent_cosine", mode="exact")
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


def noise(models, n: int, seed: int = 0) -> np.ndarray:
    """float32 [n,4,h,w] initial latents; sample i gets row i in every runner."""
    side = models.size.latent
    return np.random.default_rng(seed).standard_normal((n, 4, side, side)).astype(np.float32)


def to_uint8(images01) -> np.ndarray:
    """float images in [0, 1] -> uint8, rounded as the pipelines do."""
    return np.round(np.clip(np.asarray(images01, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- (a)


def ours(models, method: str, batch: int, steps: int, seed: int = 0) -> Callable[[], Output]:
    """Our Pipeline.generate on prompts[:batch] (images decoded)."""
    pipe, side = models.pipe, models.size.latent * models.pipe.vae_scale_factor
    prompts, latents, g = PROMPTS[:batch], noise(models, batch, seed), guidance(method)

    def run() -> Output:
        res = pipe.generate(prompts, g, num_inference_steps=steps, latents=latents, height=side, width=side,
                            scheduler="ddim", progress=False)
        return Output(res.images, res.unet_evals)

    return run


# -------------------------------------------------------------------------- official-structure loops


def official_dtp_switch(d_history: list) -> bool:
    """The official DTP rule on the host: True at the first step j with d[j] > d[j-1] and
    d[j-2] > d[j-1] (d[-1] = d[-2] = -1)."""
    padded = [-1.0, -1.0] + list(d_history)
    return padded[-1] > padded[-2] and padded[-3] > padded[-2]


def official_og_index(c: list) -> int:
    """The official opposite-guidance rule: first strict local minimum of c (the second if the
    first is at index 1), 5 when there is none."""
    from cfgbasin_jax import guidance as G

    return int(G.latent_cosine_transition_index(np.asarray(c)))


def _one_pass(backend, ctx, x, steps: int, scale_at: Callable) -> tuple:
    """One official-structure denoising pass. scale_at(j, t, d_history) -> scale.
    Returns (final latents, cosine distances per step, UNet evaluations)."""
    timesteps = backend.timesteps(steps)
    state = backend.init_state(x)
    ds, cs = [], []
    for j, t in enumerate(timesteps):
        eu, ec = backend.eps_pair(state, x, j, t, ctx)
        ds.append(backend.diff_norm(eu, ec))  # host sync, every step
        s = scale_at(j, t, ds)
        x_next, state = backend.step(state, eu, ec, s, j, t, x)
        cs.append(backend.cosine(x_next, x))
        x = x_next
    return x, cs, 2 * len(timesteps)


def official_trajectory(backend, prompt: str, x0, method: str, steps: int) -> tuple:
    """(final latents, UNet evals) of one sample, decided on the host as the official scripts do."""
    ctx = backend.encode(prompt)
    if method == "constant":
        x, _, evals = _one_pass(backend, ctx, x0, steps, lambda j, t, d: SCALE)
    elif method == "stp":
        x, _, evals = _one_pass(backend, ctx, x0, steps, lambda j, t, d: STP_BEFORE if t > STP_T else SCALE)
    elif method == "dtp":
        switched = []

        def dtp_scale(j, t, d):
            if not switched and official_dtp_switch(d):
                switched.append(j)
            return SCALE if switched else DTP_BEFORE

        x, _, evals = _one_pass(backend, ctx, x0, steps, dtp_scale)
    elif method == "og_dtp":
        _, c, first = _one_pass(backend, ctx, x0, steps, lambda j, t, d: OG_BEFORE)
        index = official_og_index(c)
        x, _, second = _one_pass(backend, ctx, x0, steps, lambda j, t, d: SCALE if j >= index else OG_BEFORE)
        evals = first + second
    else:
        raise ValueError(f"unknown method {method!r}")
    return x, evals


class TorchBackend:
    """PyTorch UNet / DDIM / VAE on the PyTorch copy of the weights (``models.torch_*``)."""

    def __init__(self, models):
        import torch
        from diffusers import DDIMScheduler

        self.torch = torch
        self.m = models
        self.sched = DDIMScheduler.from_config(models.configs["scheduler"])
        self.device = models.torch_device
        self.scaling = float(models.configs["vae"].get("scaling_factor", 0.18215))

    def encode(self, prompt):
        tok = self.m.tokenizer([prompt, ""], padding="max_length", max_length=self.m.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
        cond, uncond = self.m.torch_text(tok.input_ids.to(self.device))[0].chunk(2)
        return self.torch.cat([uncond, cond])

    def timesteps(self, steps):
        self.sched.set_timesteps(steps)
        return [int(t) for t in self.sched.timesteps]

    def init_state(self, x):
        return None

    def eps_pair(self, state, x, j, t, ctx):
        inp = self.sched.scale_model_input(self.torch.cat([x, x]), t)
        return self.m.torch_unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)

    def diff_norm(self, eu, ec):
        return float(self.torch.linalg.vector_norm(ec - eu))

    def step(self, state, eu, ec, s, j, t, x):
        return self.sched.step(eu + s * (ec - eu), t, x).prev_sample, None

    def cosine(self, a, b):
        a, b = a.flatten().double(), b.flatten().double()
        return float(1 - a @ b / (a.norm() * b.norm()))

    def start(self, x0: np.ndarray):
        return self.torch.from_numpy(x0[None]).to(self.device) * self.sched.init_noise_sigma

    def decode(self, x) -> np.ndarray:
        img = self.m.torch_vae.decode(x / self.scaling).sample
        return to_uint8((img / 2 + 0.5).permute(0, 2, 3, 1).cpu().numpy())


class FlaxBackend:
    """Our Flax model and JAX DDIM, one jitted call per step, results pulled to the host each step."""

    def __init__(self, models):
        import jax
        import jax.numpy as jnp

        self.jnp = jnp
        self.pipe = models.pipe
        self._sched = None
        self.unet = jax.jit(lambda p, x, t, c: self.pipe._unet_fn(p, jnp.concatenate([x, x]), jnp.full((2,), t), c))
        self.scale_in = jax.jit(lambda sched, st, x, j: sched.scale_model_input(st, x, j))
        self._step = jax.jit(lambda sched, st, eps, j, x: sched.step(st, eps, j, x))

    def encode(self, prompt):
        return self.pipe.encode_prompts(["", prompt])

    def timesteps(self, steps):
        self._sched = self.pipe.make_scheduler("ddim", steps)
        return [int(t) for t in np.asarray(self._sched.timesteps)]

    def init_state(self, x):
        return self._sched.init_state(x)

    def eps_pair(self, state, x, j, t, ctx):
        eps = self.unet(self.pipe.params["unet"], self.scale_in(self._sched, state, x, j), t, ctx)
        return eps[:1].astype(self.jnp.float32), eps[1:].astype(self.jnp.float32)

    def diff_norm(self, eu, ec):
        return float(np.linalg.norm(np.asarray(ec - eu)))

    def step(self, state, eu, ec, s, j, t, x):
        return self._step(self._sched, state, eu + s * (ec - eu), j, x)

    def cosine(self, a, b):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    def start(self, x0: np.ndarray):
        sched = self.pipe.make_scheduler("ddim", 1)
        return self.jnp.asarray(x0[None]) * sched.init_noise_sigma

    def decode(self, x) -> np.ndarray:
        return self.pipe.decode(x)


def official_loop(backend_cls, models, method: str, n_images: int, steps: int, seed: int = 0) -> Callable[[], Output]:
    """n_images samples one after another (batch 1), official structure."""
    latents = noise(models, n_images, seed)
    backend = backend_cls(models)

    def run() -> Output:
        images, evals = [], 0
        context = _no_grad(backend)
        with context:
            for i in range(n_images):
                x, e = official_trajectory(backend, PROMPTS[i], backend.start(latents[i]), method, steps)
                images.append(backend.decode(x))
                evals += e
        return Output(np.concatenate(images), evals)

    return run


def _no_grad(backend):
    import contextlib

    return backend.torch.no_grad() if hasattr(backend, "torch") else contextlib.nullcontext()


def torch_loop(models, method, n_images, steps, seed=0):
    """(b): the official structure in PyTorch."""
    return official_loop(TorchBackend, models, method, n_images, steps, seed)


def flax_loop(models, method, n_images, steps, seed=0):
    """The official structure on our Flax model (jitted UNet call, host sync each step)."""
    return official_loop(FlaxBackend, models, method, n_images, steps, seed)


# ---------------------------------------------------------------------------------------------- (c)


def torch_pipe(models, method: str, batch: int, steps: int, seed: int = 0) -> Callable[[], Output]:
    """diffusers' StableDiffusionPipeline (constant CFG)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if method != "constant":
        raise ValueError(f"torch_pipe cannot express method {method!r}")
    m = models
    pipe = StableDiffusionPipeline(
        vae=m.torch_vae, text_encoder=m.torch_text, tokenizer=m.tokenizer, unet=m.torch_unet,
        scheduler=DDIMScheduler.from_config(m.configs["scheduler"]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    side = m.size.latent * pipe.vae_scale_factor
    latents = torch.from_numpy(noise(m, batch, seed)).to(m.torch_device)

    def run() -> Output:
        with torch.no_grad():
            out = pipe(PROMPTS[:batch], height=side, width=side, num_inference_steps=steps, guidance_scale=SCALE,
                       latents=latents, output_type="np")
        return Output(to_uint8(out.images), 2 * batch * steps)

    return run


# ---------------------------------------------------------------------------------------------- (d)


def flax_pipe(models, method: str, batch: int, steps: int, seed: int = 0) -> Callable[[], Output]:
    """diffusers' FlaxStableDiffusionPipeline with its own Flax UNet, VAE and text encoder on our
    converted params (constant CFG, jit=True). Needs the classic stack (:mod:`bench.diffusers_flax`)."""
    import jax
    import jax.numpy as jnp
    from diffusers import FlaxDDIMScheduler, FlaxStableDiffusionPipeline
    from flax.jax_utils import replicate
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    from bench import diffusers_flax

    if method != "constant":
        raise ValueError(f"flax_pipe cannot express method {method!r}")
    m, comp = models, models.pipe.components
    dtype = comp.dtype
    text = FlaxCLIPTextModel(CLIPTextConfig.from_dict(m.configs["text_encoder"]), _do_init=False, dtype=dtype)
    scheduler = FlaxDDIMScheduler.from_config(m.configs["scheduler"])
    pipe = FlaxStableDiffusionPipeline(
        vae=diffusers_flax.vae(m.configs["vae"], dtype), text_encoder=text, tokenizer=m.tokenizer,
        unet=diffusers_flax.unet(m.configs["unet"], dtype),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, dtype=dtype,
    )
    params = replicate({**{k: comp.params[k] for k in ("unet", "vae", "text_encoder")},
                        "scheduler": scheduler.create_state()})
    ids = pipe.prepare_inputs(PROMPTS[:batch])[None]
    latents = jnp.asarray(noise(m, batch, seed))[None]
    rng = jax.random.split(jax.random.PRNGKey(seed), 1)
    side = m.size.latent * pipe.vae_scale_factor

    def run() -> Output:
        out = pipe(ids, params, rng, num_inference_steps=steps, height=side, width=side, guidance_scale=SCALE,
                   latents=latents, jit=True)
        return Output(to_uint8(np.asarray(out.images)[0]), 2 * batch * steps)

    return run


BATCHED = {"ours": ours, "torch_pipe": torch_pipe, "flax_pipe": flax_pipe}
LOOPS = {"torch_loop": torch_loop, "flax_loop": flax_loop}


def make(runner: str, models, method: str, batch: int, steps: int, loop_images: int, seed: int = 0):
    """(call, number of images per call) for a runner; loops always run batch 1."""
    if runner in LOOPS:
        return LOOPS[runner](models, method, loop_images, steps, seed), loop_images
    if runner in BATCHED:
        return BATCHED[runner](models, method, batch, steps, seed), batch
    raise ValueError(f"unknown runner {runner!r}: use one of {', '.join(RUNNER_METHODS)}")
