"""The sampler: one ``jax.lax.scan`` over the denoising steps.

Each step: pick which UNet halves are needed (traced), run them in one batched call, measure
``||eps_c - eps_u||``, let the transition detector update, combine with the per-sample scale
``eps_u + s (eps_c - eps_u)``, take the scheduler step, measure the latents' cosine distance.

Compiled once per (batch, resolution, step count, scheduler kind, detector kind, progress);
scales, transition points, prompts and noise are traced arguments.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from cfgbasin_jax import guidance as G
from cfgbasin_jax import official_cosine

# Which UNet halves a step runs (the lax.switch branch index).
BOTH, UNCOND_ONLY, COND_ONLY = 0, 1, 2

UnetFn = Callable[[object, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
"""unet_fn(params, sample [N,C,h,w], timesteps [N], context [N,L,D]) -> model output [N,C,h,w]."""

CondFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, object], jnp.ndarray]
"""cond_fn(cond [B,L,D], timestep t [], step index j [], cond_aux pytree of [B,...]) -> cond [B,L,D]."""


class Trace(NamedTuple):
    """What the loop returns (jnp arrays).

    latents: float32 [B,C,h,w] final latents. noise_diff, latent_cosine, scale: float32 [S,B]
    (noise_diff NaN where a half was skipped). branch: int32 [S] halves run per step
    (BOTH / UNCOND_ONLY / COND_ONLY). transition_index: int32 [B] (-1 none). nonfinite: bool [B].
    """

    latents: jnp.ndarray
    noise_diff: jnp.ndarray
    latent_cosine: jnp.ndarray
    scale: jnp.ndarray
    branch: jnp.ndarray
    transition_index: jnp.ndarray
    nonfinite: jnp.ndarray


def _per_sample(fn, x):
    return fn(x.reshape(x.shape[0], -1).astype(jnp.float32), axis=-1)


def l2_norm(x: jnp.ndarray) -> jnp.ndarray:
    """[B,...] -> [B]: L2 norm of each sample's whole tensor."""
    return jnp.sqrt(_per_sample(jnp.sum, jnp.square(x)))


def cosine_distance(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """[B,...] x [B,...] -> [B]: 1 - cos(a_i, b_i) over each sample's flattened tensor.

    Computed as ||a/|a| - b/|b|||^2 / 2 (the same quantity), which keeps float32 precision when
    consecutive latents are nearly parallel (c ~ 1e-5), where ``1 - dot/(|a||b|)`` cancels.
    """
    a2 = a.reshape(a.shape[0], -1).astype(jnp.float32)
    b2 = b.reshape(b.shape[0], -1).astype(jnp.float32)
    a2 = a2 / jnp.linalg.norm(a2, axis=-1, keepdims=True)
    b2 = b2 / jnp.linalg.norm(b2, axis=-1, keepdims=True)
    return 0.5 * jnp.sum(jnp.square(a2 - b2), axis=-1)


# The latent-cosine signal per guidance.PRECISIONS: [B,...] x [B,...] -> [B] float32.
COSINE_DISTANCE = {"stable": cosine_distance, "official": official_cosine.official_cosine_distance}


def halves_needed(scale_if_no_switch: jnp.ndarray, signal_pending: jnp.ndarray) -> jnp.ndarray:
    """int32 branch for a step: only the unconditional half when every scale is 0, only the
    conditional half when every scale is 1, both otherwise or while a noise-difference signal
    is still needed by some sample."""
    need_uncond = signal_pending | jnp.any(scale_if_no_switch != 1.0)
    need_cond = signal_pending | jnp.any(scale_if_no_switch != 0.0)
    return jnp.where(need_uncond & need_cond, BOTH, jnp.where(need_uncond, UNCOND_ONLY, COND_ONLY)).astype(jnp.int32)


def _unet_halves(unet_fn: UnetFn, params, x_in, t, cond, uncond, branch):
    """Run the halves ``branch`` asks for. Returns (eps_u, eps_c), [B,...] each; a skipped half
    is filled with the other so that the combine stays exact at scale 0 or 1."""
    b = x_in.shape[0]

    def both(x):
        out = unet_fn(params, jnp.concatenate([x, x]), jnp.full((2 * b,), t), jnp.concatenate([uncond, cond]))
        return out[:b], out[b:]

    def one(context):
        def run(x):
            out = unet_fn(params, x, jnp.full((b,), t), context)
            return out, out

        return run

    return jax.lax.switch(branch, [both, one(uncond), one(cond)], x_in)


def sample_loop(
    params,
    scheduler,
    latents: jnp.ndarray,
    cond: jnp.ndarray,
    uncond: jnp.ndarray,
    before: jnp.ndarray,
    after: jnp.ndarray,
    switch_index: jnp.ndarray,
    *,
    unet_fn: UnetFn,
    detector: str,
    on_step: Callable[[jnp.ndarray], None] | None = None,
    skip_halves: bool = True,
    cond_fn: CondFn | None = None,
    cond_aux=None,
    precision: str = "stable",
) -> Trace:
    """Denoise ``latents`` [B,C,h,w] (already scaled by init_noise_sigma).

    cond, uncond: [B,L,D] text embeddings. before, after: float32 [B,S] per-step scales;
    switch_index: int32 [B] (fixed detector: first step of ``after``; causal latent-cosine: the
    fallback step; >= S: never; ignored by the noise-difference detector).
    ``scheduler`` is a :class:`cfgbasin_jax.schedulers.Scheduler` pytree; ``detector`` one of
    :data:`cfgbasin_jax.guidance.DETECTORS`. ``on_step(j)``, if given, is traced into every step
    (e.g. a host callback advancing a progress bar). ``skip_halves=False`` always runs both halves
    (the reference path; same results within float tolerance). ``cond_fn(cond, t, j, cond_aux)``, if
    given (static), replaces the conditional embedding at every step (e.g. CADS); ``cond_aux`` is a
    traced pytree of per-sample arrays [B,...]; the unconditional embedding is never changed.
    ``precision`` (static) picks the latent-cosine formula (:data:`COSINE_DISTANCE`).
    """
    if detector not in G.DETECTORS:
        raise ValueError(f"sampler: unknown detector {detector!r}")
    if precision not in COSINE_DISTANCE:
        raise ValueError(f"sampler: unknown latent-cosine precision {precision!r}")
    latent_cosine = COSINE_DISTANCE[precision]
    latents = latents.astype(jnp.float32)
    never = jnp.full_like(switch_index, jnp.iinfo(jnp.int32).max)
    if detector == "fixed":
        det0 = G.detector_init(switch_index, never)
    elif detector == "latent_cosine":
        det0 = G.detector_init(jnp.full_like(switch_index, -1), switch_index)
    else:
        det0 = G.detector_init(jnp.full_like(switch_index, -1), never)
    carry0 = (latents, scheduler.init_state(latents), det0, jnp.zeros(latents.shape[0], bool))
    xs = (jnp.arange(scheduler.timesteps.shape[0], dtype=jnp.int32), scheduler.timesteps, before.T, after.T)

    def step(carry, xs_j):
        x, sched_state, det, nonfinite = carry
        j, t, before_j, after_j = xs_j
        if on_step is not None:
            on_step(j)
        pending = jnp.any(det.index < 0) if detector == "noise_diff" else jnp.asarray(False)
        scale_pre = jnp.where(G.switched(det, j), after_j, before_j)
        branch = halves_needed(scale_pre, pending | (not skip_halves))
        x_in = scheduler.scale_model_input(sched_state, x, j)
        cond_j = cond if cond_fn is None else cond_fn(cond, t, j, cond_aux)
        eps_u, eps_c = _unet_halves(unet_fn, params, x_in, t, cond_j, uncond, branch)
        eps_u, eps_c = eps_u.astype(jnp.float32), eps_c.astype(jnp.float32)
        d = jnp.where(branch == BOTH, l2_norm(eps_c - eps_u), jnp.nan)
        if detector == "noise_diff":
            det = G.noise_diff_update(det, d, j)
        s = jnp.where(G.switched(det, j), after_j, before_j)
        view = (-1,) + (1,) * (x.ndim - 1)
        eps = eps_u + s.reshape(view) * (eps_c - eps_u)
        x_next, sched_state = scheduler.step(sched_state, eps, j, x)
        c = latent_cosine(x_next, x)
        if detector == "latent_cosine":
            det = G.latent_cosine_update(det, c, j)
        nonfinite = nonfinite | ~jnp.all(jnp.isfinite(x_next.reshape(x.shape[0], -1)), axis=-1)
        return (x_next, sched_state, det, nonfinite), (d, c, s, branch)

    (x, _, det, nonfinite), (d, c, s, branch) = jax.lax.scan(step, carry0, xs)
    steps = scheduler.timesteps.shape[0]
    index = jnp.where((det.index >= 0) & (det.index < steps), det.index, -1)
    return Trace(latents=x, noise_diff=d, latent_cosine=c, scale=s, branch=branch, transition_index=index, nonfinite=nonfinite)
