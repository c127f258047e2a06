"""The runners: ways to sample the same model, each a function ``() -> Output``.

  ours          cfgbasin_jax Pipeline.generate: one compiled lax.scan for the whole batch (a)
  torch_loop    the official scripts' structure in PyTorch: batch 1, Python loop over steps, the
                transition decided on the host every step (host sync each step) (b)
  torch_pipe    diffusers' StableDiffusionPipeline, constant CFG only (c)
  flax_pipe     diffusers' FlaxStableDiffusionPipeline (its own Flax models), constant CFG only (d);
                classic stack only (diffusers < 0.40), else skipped
  flax_loop     the official structure on our Flax model: batch 1, jitted UNet call per step, host
                decision each step (issue 4's Python-loop baseline)

Methods: the registry's ``BENCH`` preset (:mod:`cfgbasin_jax.method.registry`; the same schedule in every
runner that can express it): CFG 7.5 at every step; STP (scale 0 while t > 500, 7.5 from t <= 500); DTP
(1.0 until the first local minimum of ||eps_c - eps_u||, 7.5 after); OG+DTP at -2.0 (the paper's
default is the official -7.5) until the first local minimum of the latents' cosine distance (exact
rule: a recording pass, then the replay), 7.5 after.

The official-structure loops and rules are the tests' reference (``bench/reference.py``), never the
library's detector code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from cfgbasin_jax.method import registry as Registry
from bench import reference as ref

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

PRESET = Registry.BENCH
METHODS = PRESET.methods
SCALE = PRESET.scale


def guidance(method: str):
    """The cfgbasin_jax Guidance of a method under the benchmark's preset (from the registry)."""
    method = Registry.get(method).name
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return PRESET.guidance(method)


def _rule(g) -> tuple:
    """(rule of the reference loop, before, after, t) of a schedule."""
    return (g.signal if g.rule == "dynamic" else g.rule, g.before, g.after, g.t)


_SIGNAL_WORDS = {"noise_diff": "noise-difference", "latent_cosine": "latent-cosine"}


def label(method: str, short: bool = False) -> str:
    """A table label stating the method's schedule ("DTP (1.0 until the noise-difference minimum, then 7.5)";
    ``short``: "DTP (1.0, then 7.5)")."""
    g, name = guidance(method), Registry.get(method).label
    if g.rule == "constant":
        return f"{name} {g.after:g}" if short else f"constant {name} {g.after:g}"
    if g.rule == "static":
        return f"{name} ({g.before:g} above t={g.t}, then {g.after:g})"
    until = "" if short else f" until the {_SIGNAL_WORDS[g.signal]} minimum"
    return f"{name} ({g.before:.1f}{until}{', exact 2-pass' if g.mode == 'exact' else ''}, then {g.after:g})"


REFERENCE_RULES = {m: _rule(guidance(m)) for m in METHODS}  # method -> (rule, before, after, t)
METHOD_LABELS = {m: label(m) for m in METHODS}
CONSTANT = tuple(m for m in METHODS if guidance(m).rule == "constant")  # what diffusers' pipelines express
ANCHOR = CONSTANT[0]  # constant CFG: the table's reference method
STATIC = next(m for m in METHODS if guidance(m).rule == "static")  # the STP sweep and the work ratio
DYNAMIC = next(m for m in METHODS if guidance(m).signal == "noise_diff")  # the DTP section
STP_BEFORE = guidance(STATIC).before

# runner -> methods it can express
RUNNER_METHODS = {
    "ours": METHODS,
    "torch_loop": METHODS,
    "torch_pipe": CONSTANT,
    "flax_pipe": CONSTANT,
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


official_dtp_switch = ref.official_dtp_switch
official_og_index = ref.official_og_index


def official_trajectory(backend, prompt: str, x0, method: str, steps: int) -> tuple:
    """(final latents, UNet evals) of one sample, decided on the host as the official scripts do
    (:func:`bench.reference.official_trajectory`)."""
    rule, before, after, t = REFERENCE_RULES[method]
    x, evals, *_ = ref.official_trajectory(backend, backend.encode(prompt), x0, steps, rule, before, after, t)
    return x, evals


class TorchBackend(ref.TorchBackend):
    """The reference PyTorch backend on the PyTorch copy of the weights (``models.torch_*``), DDIM."""

    def __init__(self, models):
        from diffusers import DDIMScheduler

        super().__init__(models.torch_unet, DDIMScheduler.from_config(models.configs["scheduler"]))
        self.m = models
        self.device = models.torch_device
        self.scaling = float(models.configs["vae"].get("scaling_factor", 0.18215))

    def encode(self, prompt):
        tok = self.m.tokenizer([prompt, ""], padding="max_length", max_length=self.m.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
        cond, uncond = self.m.torch_text(tok.input_ids.to(self.device))[0].chunk(2)
        return self.torch.cat([uncond, cond])

    def start(self, x0: np.ndarray):
        return self.torch.from_numpy(x0[None]).to(self.device) * self.sched.init_noise_sigma

    def decode(self, x) -> np.ndarray:
        img = self.m.torch_vae.decode(x / self.scaling).sample
        return to_uint8((img / 2 + 0.5).permute(0, 2, 3, 1).cpu().numpy())


class FlaxBackend(ref.FlaxBackend):
    """The reference Flax backend on our model and JAX DDIM (one jitted call per step, host sync)."""

    def __init__(self, models):
        super().__init__(models.pipe, "ddim")

    def encode(self, prompt):
        return self.pipe.encode_prompts(["", prompt])

    def start(self, x0: np.ndarray):
        return self.jnp.asarray(x0[None]) * self.pipe.make_scheduler("ddim", 1).init_noise_sigma

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

    if method not in CONSTANT:
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

    if method not in CONSTANT:
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
