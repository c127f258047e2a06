"""Memorization-mitigation baselines in the same harness as the transition-point methods.

1. **Wen et al. (ICLR 2024)**, inference-time mitigation: before sampling, AdamW-optimise each
   sample's conditional text embedding to shrink ``||eps_c - eps_u||`` at the first sampling step
   (from the same initial latents the sampler then uses), then sample with ordinary CFG.
   :func:`wen_optimize` -> :class:`WenResult` (``prompt_embeds`` for ``Pipeline.generate``);
   :func:`wen_generate` does both. Their detection score is :func:`detection_score` (from
   :mod:`cfgbasin_jax.metrics.detection`; it costs nothing, the sampler records ``noise_diff``).
2. **Prompt augmentation** (Somepalli et al., as in Wen et al.'s and Jain et al.'s scripts):
   :func:`augment_prompts` inserts random numbers, random vocabulary tokens, or copies of the
   prompt's own words at random word positions.
3. **CADS** (Sadat et al., ICLR 2024), condition-annealed sampling: :class:`CADS`, a conditioning
   hook passed as ``Pipeline.generate(..., conditioning=CADS())``, noises the conditional embedding
   inside the compiled loop with a per-sample key derived from (seed, global sample index).

UNet cost in sample-evaluations (B samples, S sampler steps; ordinary CFG runs 2 B S):
  prompt augmentation and CADS add nothing; Wen adds, per sample, 2 + n forward and n backward
  passes (one unconditional and one final-loss forward, n <= ``iterations`` optimisation steps of
  the batch), reported in :class:`WenResult` and added to ``unet_evals`` by :func:`wen_generate`.

Differences from the public reference code, on purpose:
  - Wen et al. optimise one embedding per prompt against the norm taken jointly over its
    ``num_images_per_prompt`` (default 4) latents, at the first step only (``--optim_target_steps 0``).
    Here every sample has its own embedding and its own norm, so their target 3 over 4 images is
    about 3 / sqrt(4) = 1.5 per sample; the default target stays 3 (their number, one image).
  - Jain et al.'s CADS code noises the concatenated [uncond, cond] embeddings with mean/std over
    that whole tensor and uniform noise. Here only the conditional embedding is noised (as in the
    CADS paper), with each sample's own mean/std (so a sample never depends on its batch), and
    Gaussian noise by default (``noise="uniform"`` gives theirs). s = 0 means CADS off.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import registry as M
from cfgbasin_jax.method import sharding as parallel
from cfgbasin_jax.method import sampler as S
from cfgbasin_jax.metrics.detection import detection_score
from cfgbasin_jax.pipeline import GenerationResult, initial_noise, prng_key

METHODS = tuple(name for name in M.names() if M.get(name).baseline)
AUGMENTATIONS = ("rand_numb_add", "rand_word_add", "rand_word_repeat")
NOISE_KINDS = ("gaussian", "uniform")

# The reference scripts draw numbers below 100000 and token ids below 49400 (CLIP's 49408-token
# vocabulary without its last entries, which include <|startoftext|> and <|endoftext|>).
RANDOM_NUMBER_BOUND = 100_000
RANDOM_TOKEN_BOUND = 49_400
# fold_in tag separating a sample's CADS noise stream from its initial-noise key.
CADS_STREAM = 0x43414453

__all__ = [
    "AUGMENTATIONS", "CADS", "METHODS", "NOISE_KINDS", "WenResult", "augment_prompt", "augment_prompts",
    "cads_condition", "cads_gamma", "cads_keys", "cads_noise", "cads_noisy_condition", "check_method", "detection_score",
    "wen_compile_count", "wen_generate", "wen_optimize",
]


def check_method(name: str) -> str:
    """The registry name of baseline ``name`` (:mod:`cfgbasin_jax.method.registry`), else ValueError."""
    try:
        method = M.get(name)
    except ValueError:
        method = None
    if method is None or not method.baseline:
        raise ValueError(f"baselines: unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return method.name


# ----------------------------------------------------------------------------- prompt augmentation


def _insert_word(words: list, word: str, rng: np.random.Generator) -> list:
    """Insert ``word`` at a uniform position 0..len(words) (both ends included)."""
    at = int(rng.integers(0, len(words) + 1))
    return words[:at] + [word] + words[at:]


def _vocabulary_ids(tokenizer) -> np.ndarray:
    """Token ids the reference draws from: below 49400 and the tokenizer's size, specials excluded."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    upper = min(RANDOM_TOKEN_BOUND, len(tokenizer))
    return np.asarray([i for i in range(upper) if i not in special], np.int64)


def augment_prompt(prompt: str, kind: str, repeat_num: int, rng: np.random.Generator, tokenizer=None) -> str:
    """One prompt, augmented ``repeat_num`` times in sequence (words are split on single spaces):

    rand_numb_add: insert a random integer in [0, 100000); rand_word_add: insert one random
    vocabulary token, decoded by ``tokenizer``; rand_word_repeat: insert a copy of a random word of
    the original prompt. Insertions only: the original words stay, in order.
    """
    words = prompt.split(" ")
    original = list(words)
    vocabulary = _vocabulary_ids(tokenizer) if kind == "rand_word_add" else None
    for _ in range(repeat_num):
        if kind == "rand_numb_add":
            word = str(int(rng.integers(0, RANDOM_NUMBER_BOUND)))
        elif kind == "rand_word_add":
            word = tokenizer.decode([int(rng.choice(vocabulary))])
        else:
            word = original[int(rng.integers(0, len(original)))]
        words = _insert_word(words, word, rng)
    return " ".join(words)


def augment_prompts(
    prompts: Sequence[str],
    kind: str,
    repeat_num: int = 4,
    seed: int = 0,
    tokenizer=None,
    sample_indices: Sequence[int] | None = None,
) -> list[str]:
    """Augmented copies of ``prompts`` (see :func:`augment_prompt`); prompt i draws from
    ``numpy.random.default_rng((seed, sample_indices[i]))`` (default indices 0..B-1), so its text
    never depends on batch size or order. ``tokenizer`` is needed for ``rand_word_add``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment_prompts: unknown augmentation {kind!r}; expected one of {', '.join(AUGMENTATIONS)}")
    if isinstance(repeat_num, bool) or not isinstance(repeat_num, (int, np.integer)) or repeat_num < 0:
        raise ValueError(f"augment_prompts: repeat_num must be a non-negative integer, got {repeat_num!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"augment_prompts: seed must be a non-negative integer, got {seed!r}")
    if kind == "rand_word_add" and tokenizer is None:
        raise ValueError("augment_prompts: rand_word_add needs the model's tokenizer (tokenizer=pipe.tokenizer)")
    indices = np.arange(len(prompts)) if sample_indices is None else np.asarray(sample_indices)
    if indices.shape != (len(prompts),) or (indices.size and indices.min() < 0):
        raise ValueError(f"augment_prompts: sample_indices must be {len(prompts)} non-negative integers")
    return [
        augment_prompt(p, kind, int(repeat_num), np.random.default_rng((int(seed), int(i))), tokenizer)
        for p, i in zip(prompts, indices)
    ]


# ----------------------------------------------------------------------------- CADS


def cads_gamma(t, tau1, tau2) -> jnp.ndarray:
    """Annealing weight of the clean condition at timestep t: 1 for t <= tau1,
    (tau2 - t) / (tau2 - tau1) for tau1 < t <= tau2, 0 for t > tau2 (broadcasts; float32)."""
    t, tau1, tau2 = (jnp.asarray(v, jnp.float32) for v in (t, tau1, tau2))
    ramp = (tau2 - t) / jnp.maximum(tau2 - tau1, 1e-6)
    return jnp.where(t <= tau1, 1.0, jnp.where(t > tau2, 0.0, ramp))


def cads_keys(seed, sample_indices: Sequence[int]) -> jnp.ndarray:
    """[B] keys (uint32 [B,2] for an int seed): sample i's CADS key,
    ``fold_in(fold_in(prng_key(seed), index_i), CADS_STREAM)``: a stream of the same (seed, global
    index) as its initial noise, independent of batch size. ``seed``: an int or a PRNG key."""
    base = prng_key(seed, "CADS")
    indices = jnp.asarray(np.asarray(sample_indices), jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), CADS_STREAM))(indices)


def _std(x: jnp.ndarray) -> jnp.ndarray:
    """[B,L,D] -> [B,1,1]: unbiased standard deviation of each sample (as torch.std)."""
    return jnp.std(x, axis=(1, 2), ddof=1, keepdims=True)


def cads_noisy_condition(y, gamma, noise, s, psi) -> jnp.ndarray:
    """CADS on y [B,L,D] with gamma, s, psi [B] and noise [B,L,D]:
    y_hat = sqrt(gamma) y + s sqrt(1 - gamma) n; y_rescaled = y_hat normalised to y's mean and std
    (per sample, over L and D); out = psi y_rescaled + (1 - psi) y_hat. s = 0 returns y unchanged
    (CADS off; the rescale alone would be 0/0 where gamma = 0)."""
    y = y.astype(jnp.float32)
    col = lambda v: jnp.asarray(v, jnp.float32).reshape(-1, 1, 1)  # noqa: E731
    g, s, psi = col(gamma), col(s), col(psi)
    y_hat = jnp.sqrt(g) * y + s * jnp.sqrt(1.0 - g) * noise
    std_hat = _std(y_hat)
    std_hat = jnp.where(std_hat > 0, std_hat, 1.0)
    mean = lambda x: jnp.mean(x, axis=(1, 2), keepdims=True)  # noqa: E731
    rescaled = (y_hat - mean(y_hat)) / std_hat * _std(y) + mean(y)
    return jnp.where(s > 0, psi * rescaled + (1.0 - psi) * y_hat, y)


def cads_noise(keys, j, shape, noise: str) -> jnp.ndarray:
    """float32 [B,*shape]: step j's CADS noise of each sample (key fold_in(key_i, j))."""
    draw = jax.random.normal if noise == "gaussian" else jax.random.uniform
    return jax.vmap(lambda k: draw(jax.random.fold_in(k, j), shape, jnp.float32))(keys)


def cads_condition(cond, t, j, aux, *, noise: str = "gaussian") -> jnp.ndarray:
    """The sampler's ``cond_fn`` for CADS: cond [B,L,D] at timestep t, step j; ``aux`` holds
    per-sample ``key`` [B,2] and ``tau1``, ``tau2``, ``s``, ``psi`` [B] (traced). -> [B,L,D]."""
    gamma = cads_gamma(t, aux["tau1"], aux["tau2"])
    n = cads_noise(aux["key"], j, cond.shape[1:], noise)
    return cads_noisy_condition(cond, gamma, n, aux["s"], aux["psi"]).astype(cond.dtype)


# One static cond_fn per noise kind: the pipeline caches its compiled sampler per cond_fn object.
_CADS_FNS = {kind: functools.partial(cads_condition, noise=kind) for kind in NOISE_KINDS}


_finite = G.finite_number


@dataclasses.dataclass(frozen=True)
class CADS(S.Conditioning):
    """Condition-annealed sampling, a conditioning hook: ``Pipeline.generate(..., conditioning=CADS())``.

    At timestep t the conditional embedding y becomes sqrt(gamma) y + s sqrt(1 - gamma) n with
    gamma = :func:`cads_gamma` (t, tau1, tau2), rescaled to y's mean/std and mixed by psi (see
    :func:`cads_noisy_condition`); the unconditional embedding is unchanged. Defaults are the
    reference script's (tau1 500, tau2 800, s 0.1, psi 1). ``noise``: "gaussian" (the CADS paper,
    default) or "uniform" (U[0, 1), what the reference script draws). tau1, tau2, s, psi are
    traced (sweeping them never recompiles); ``noise`` is static. No extra UNet evaluations.
    """

    tau1: float = 500.0
    tau2: float = 800.0
    s: float = 0.1
    psi: float = 1.0
    noise: str = "gaussian"

    def __post_init__(self):
        for name in ("tau1", "tau2", "s", "psi"):
            object.__setattr__(self, name, _finite("CADS", name, getattr(self, name)))
        if self.tau1 > self.tau2:
            raise ValueError(f"CADS: tau1={self.tau1} must not exceed tau2={self.tau2}")
        if self.s < 0:
            raise ValueError(f"CADS: noise scale s must be >= 0, got {self.s}")
        if not 0.0 <= self.psi <= 1.0:
            raise ValueError(f"CADS: psi must be in [0, 1], got {self.psi}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"CADS: unknown noise {self.noise!r}; expected one of {', '.join(NOISE_KINDS)}")

    @property
    def cond_fn(self):
        """The static ``cond_fn`` for :func:`cfgbasin_jax.method.sampler.sample_loop` (one per noise kind)."""
        return _CADS_FNS[self.noise]

    def cond_aux(self, seed, sample_indices: Sequence[int]) -> dict:
        """Per-sample traced inputs [B,...]: keys from (seed, index) and the broadcast parameters."""
        b = len(sample_indices)
        full = lambda v: np.full((b,), v, np.float32)  # noqa: E731
        return {"key": cads_keys(seed, sample_indices), "tau1": full(self.tau1), "tau2": full(self.tau2),
                "s": full(self.s), "psi": full(self.psi)}

    def describe(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- Wen et al.


@dataclasses.dataclass
class WenResult:
    """Outputs of :func:`wen_optimize` for B samples (numpy).

    prompt_embeds: float32 [B,L,D] optimised conditional embeddings (``Pipeline.generate(...,
    prompt_embeds=)``). loss_initial, loss_final: float32 [B] ``||eps_c - eps_u||`` at the first
    step with the original / returned embedding (loss_initial is the detection score with
    first_steps=1). updates: int [B] AdamW steps each sample took. unet_forward, unet_backward:
    UNet sample-evaluations spent on the B real samples (forward passes; backward passes).
    """

    prompt_embeds: np.ndarray
    loss_initial: np.ndarray
    loss_final: np.ndarray
    updates: np.ndarray
    unet_forward: int
    unet_backward: int

    @property
    def unet_evals(self) -> int:
        """forward + backward sample-evaluations (a backward pass costs about two forwards)."""
        return self.unet_forward + self.unet_backward


def _check_wen(lr, iterations, target_loss, weight_decay) -> tuple:
    lr = _finite("wen_optimize", "lr", lr)
    if lr <= 0:
        raise ValueError(f"wen_optimize: lr must be > 0, got {lr}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"wen_optimize: iterations must be a non-negative integer, got {iterations!r}")
    if target_loss is None:
        target = -np.inf
    else:
        target = _finite("wen_optimize", "target_loss", target_loss)
        if target < 0:
            raise ValueError(f"wen_optimize: target_loss must be >= 0 (or None), got {target}")
    weight_decay = _finite("wen_optimize", "weight_decay", weight_decay)
    if weight_decay < 0:
        raise ValueError(f"wen_optimize: weight_decay must be >= 0, got {weight_decay}")
    return lr, int(iterations), target, weight_decay


def _wen_local(unet_fn, params, sched, x0, cond, uncond, lr, target, iterations, weight_decay):
    """One device's batch: x0 [b,C,h,w] (scaled by init_noise_sigma), cond, uncond [b,L,D].
    Returns (embeds [b,L,D], loss_initial [b], loss_final [b], updates [b], loop count [1])."""
    b = x0.shape[0]
    x_in = sched.scale_model_input(sched.init_state(x0), x0, 0)
    t = jnp.full((b,), sched.timesteps[0])
    eps_u = unet_fn(params, x_in, t, uncond).astype(jnp.float32)

    def losses(emb):
        return S.l2_norm(unet_fn(params, x_in, t, emb).astype(jnp.float32) - eps_u)

    def total(emb):
        per_sample = losses(emb)
        return jnp.sum(per_sample), per_sample

    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    emb0 = cond.astype(jnp.float32)

    def body(carry):
        emb, state, done, updates, loss0, k = carry
        (_, loss), grad = jax.value_and_grad(total, has_aux=True)(emb)
        loss0 = jnp.where(k == 0, loss, loss0)
        done = done | (loss <= target)
        grad = grad.at[:, 0].set(0.0)  # the start-of-text position stays fixed
        step, new_state = opt.update(grad, state, emb)
        keep = done[:, None, None]
        emb = jnp.where(keep, emb, optax.apply_updates(emb, step))
        state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(keep, old, new) if jnp.shape(new) == emb.shape else new, new_state, state)
        return emb, state, done, updates + (~done).astype(jnp.int32), loss0, k + 1

    def more(carry):
        return (carry[5] < iterations) & ~jnp.all(carry[2])

    init = (emb0, opt.init(emb0), jnp.zeros(b, bool), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.float32),
            jnp.zeros((), jnp.int32))
    emb, _, _, updates, loss0, k = jax.lax.while_loop(more, body, init)
    loss_final = losses(emb)
    loss_initial = jnp.where(k > 0, loss0, loss_final)
    return emb.astype(cond.dtype), loss_initial, loss_final, updates, k[None]


def _wen_fn(pipe, devices: tuple):
    """The jitted, device-sharded optimisation of ``pipe``, owned by ``pipe`` (one per device set;
    :meth:`cfgbasin_jax.pipeline.Pipeline.owned_function`)."""

    def build():
        data, rep = P(parallel.AXIS), P()
        local = functools.partial(_wen_local, pipe.unet_fn)
        sharded = jax.shard_map(local, mesh=parallel.data_mesh(devices),
                                in_specs=(rep, rep, data, data, data, rep, rep, rep, rep),
                                out_specs=(data, data, data, data, data), check_vma=False)
        return jax.jit(sharded)

    return pipe.owned_function(("wen", devices), build)


def wen_compile_count(pipe) -> int:
    """Number of compilations of ``pipe``'s Wen optimisation so far."""
    return sum(fn._cache_size() for fn in pipe.owned_functions("wen"))


def wen_optimize(
    pipe,
    prompts: str | Sequence[str],
    *,
    lr: float = 0.05,
    iterations: int = 10,
    target_loss: float | None = 3.0,
    weight_decay: float = 0.01,
    num_inference_steps: int = 50,
    seed: int = 0,
    scheduler: str | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    sample_indices: Sequence[int] | None = None,
    latents=None,
    height: int | None = None,
    width: int | None = None,
    devices=None,
    batch_size: int | None = None,
) -> WenResult:
    """Wen et al.'s inference-time mitigation: optimise each sample's conditional embedding.

    Loss of sample i: ``||eps_c - eps_u||`` (L2 over its whole model output) at the scheduler's
    first step, from the initial latents ``Pipeline.generate`` draws for (seed, sample_indices[i])
    (or ``latents``, before init_noise_sigma), against the unconditional embedding of
    ``negative_prompt``. AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01 as torch's default),
    at most ``iterations`` steps; before each step a sample whose loss is <= ``target_loss`` stops
    for good (its updates are masked; None: never stop). The start-of-text position gets no
    gradient. Reference defaults: lr 0.05, 10 iterations, target 3 (see the report for notes).
    lr, iterations, target_loss and weight_decay are traced: sweeping them never recompiles.
    Pass the same sampling arguments to ``generate`` (see :func:`wen_generate`).
    """
    lr, iterations, target, weight_decay = _check_wen(lr, iterations, target_loss, weight_decay)
    inputs = pipe.sampling_inputs("wen_optimize", prompts, num_inference_steps, latents, height, width, scheduler,
                                  negative_prompt, sample_indices, batch_size, devices)
    prompts, sched, sample_indices, shape, latents, negative, devices, chunk = inputs
    b = len(prompts)
    n_dev = len(devices)
    fn, mesh = _wen_fn(pipe, devices), parallel.data_mesh(devices)
    params = pipe.replicated_unet_params(devices)
    sched_rep = parallel.replicate(sched, mesh)
    hyper = parallel.replicate(tuple(jnp.asarray(v, dt) for v, dt in (
        (lr, jnp.float32), (target, jnp.float32), (iterations, jnp.int32), (weight_decay, jnp.float32))), mesh)

    parts, forward, backward = [], 0, 0
    for start in range(0, b, chunk):
        rows = slice(start, min(start + chunk, b))
        n = rows.stop - rows.start
        pad = lambda x: parallel.pad_rows(np.asarray(x)[rows], chunk)  # noqa: E731
        noise = initial_noise(seed, pad(sample_indices), shape) if latents is None else jnp.asarray(pad(latents))
        cond = pipe.encode_prompts(list(pad(np.asarray(prompts, dtype=object))))
        uncond = pipe.encode_prompts(list(pad(np.asarray(negative, dtype=object))))
        data = parallel.shard_batch((noise * sched.init_noise_sigma, cond, uncond), mesh)
        out = jax.device_get(fn(params, sched_rep, *data, *hyper))
        per_device = chunk // n_dev
        real = np.clip(n - per_device * np.arange(n_dev), 0, per_device)
        loops = np.asarray(out[4])
        forward += int(np.sum(real * (loops + 2)))
        backward += int(np.sum(real * loops))
        parts.append([np.asarray(x)[:n] for x in out[:4]])
    cat = lambda i: np.concatenate([p[i] for p in parts])  # noqa: E731
    return WenResult(prompt_embeds=cat(0).astype(np.float32), loss_initial=cat(1), loss_final=cat(2),
                     updates=cat(3), unet_forward=forward, unet_backward=backward)


# Arguments of Pipeline.generate that must match between the optimisation and the sampling.
_SHARED = ("num_inference_steps", "seed", "scheduler", "negative_prompt", "sample_indices", "latents", "height",
           "width", "devices", "batch_size")


def wen_generate(
    pipe,
    prompts: str | Sequence[str],
    guidance: G.Guidance | Sequence[G.Guidance] = G.constant(7.5),
    *,
    lr: float = 0.05,
    iterations: int = 10,
    target_loss: float | None = 3.0,
    weight_decay: float = 0.01,
    **generate_kwargs,
) -> tuple[GenerationResult, WenResult]:
    """:func:`wen_optimize`, then ``pipe.generate(prompts, guidance, prompt_embeds=...)`` with the same
    sampling arguments. The result's ``unet_evals`` includes the optimisation (forward + backward)."""
    shared = {k: generate_kwargs[k] for k in _SHARED if k in generate_kwargs}
    wen = wen_optimize(pipe, prompts, lr=lr, iterations=iterations, target_loss=target_loss,
                       weight_decay=weight_decay, **shared)
    result = pipe.generate(prompts, guidance, prompt_embeds=wen.prompt_embeds, **generate_kwargs)
    return dataclasses.replace(result, unet_evals=result.unet_evals + wen.unet_evals), wen


# ----------------------------------------------------------------------------- command lines


def generate_options(
    prompts: Sequence[str],
    sample_indices: Sequence[int],
    *,
    prompt_augmentation: str | None = None,
    cads: bool = False,
    seed: int = 0,
    tokenizer=None,
    repeat_num: int = 4,
) -> tuple[list[str], dict]:
    """The reference scripts' ``--prompt_augmentation KIND`` and ``--cads`` as (prompts, extra
    ``Pipeline.generate`` keyword arguments: the CADS conditioning hook). Neither adds UNet evaluations."""
    prompts = list(prompts)
    if prompt_augmentation:
        prompts = augment_prompts(prompts, prompt_augmentation, repeat_num, seed, tokenizer, sample_indices)
    return prompts, ({"conditioning": CADS()} if cads else {})
