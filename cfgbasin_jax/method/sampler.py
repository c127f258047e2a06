"""The sampler: one ``jax.lax.scan`` over the denoising steps.

Each step: pick which UNet halves are needed (traced), run them in one batched call, measure
``||eps_c - eps_u||``, let the transition detector update, combine with the per-sample scale
``eps_u + s (eps_c - eps_u)``, take the scheduler step, measure the latents' cosine distance and
let a detector that reads it update.

* :func:`sample_loop` is one pass; :func:`sample` also runs the extra passes a detector asks for
  (the exact two-pass rule); :func:`sweep` folds sweep points into the batch.
* Compiled once per (batch, resolution, step count, scheduler kind, detector structure); scales,
  transition points, detector thresholds, prompts and noise are traced arguments.
* Gradients are those of the full classifier-free-guidance combine, also where a UNet half is
  skipped (:func:`unet_halves` evaluates the skipped half for derivatives only).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from cfgbasin_jax.method import detectors as D
from cfgbasin_jax.method.arrays import Embeddings, Latents, Mask, PerSample, PerStep, StepIndex
from cfgbasin_jax.method.detectors import cosine_distance, l2_norm  # noqa: F401  (re-exported)
from cfgbasin_jax.schedulers import Scheduler

# Which UNet halves a step runs (the lax.switch branch index).
BOTH, UNCOND_ONLY, COND_ONLY = 0, 1, 2

UnetFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
"""unet_fn(params, sample [N,C,h,w], timesteps [N], context [N,L,D]) -> model output [N,C,h,w]."""

CondFn = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]
"""cond_fn(cond [B,L,D], timestep t [], step index j [], cond_aux pytree of [B,...]) -> cond [B,L,D]."""


class Conditioning:
    """A conditioning hook for ``Pipeline.generate(conditioning=...)``: ``cond_fn`` (static,
    hashable; see :data:`CondFn`) rewrites the conditional embedding at every step from per-sample
    traced data ``cond_aux(seed_key, sample_indices)`` (a pytree of [B,...] arrays). The
    unconditional embedding is never changed. Example: :class:`cfgbasin_jax.baselines.CADS`."""

    @property
    def cond_fn(self) -> CondFn:
        raise NotImplementedError

    def cond_aux(self, seed, sample_indices) -> Any:
        raise NotImplementedError


class Trace(NamedTuple):
    """What the loop returns (jnp arrays; B samples, S steps).

    latents: float32 [B,C,h,w] final latents. noise_diff, latent_cosine, scale: float32 [B,S]
    (noise_diff NaN where a half was skipped). branch: int32 [B,S] halves run per step for the
    sample (BOTH / UNCOND_ONLY / COND_ONLY; decided per device). transition_index: int32 [B] the
    first step with ``after`` (-1 none). transition_fallback: bool [B] that step came from a
    fallback rule (e.g. the official index 5), not a detection. nonfinite: bool [B].
    unet_evals: int32 [B] UNet evaluations spent on the sample (all passes).
    detector_state: the detector's final state (leaves [B,...]).
    """

    latents: Latents
    noise_diff: PerStep
    latent_cosine: PerStep
    scale: PerStep
    branch: StepIndex
    transition_index: PerSample
    transition_fallback: Mask
    nonfinite: Mask
    unet_evals: PerSample
    detector_state: Any


def halves_needed(scale_if_no_switch: PerSample, signal_pending) -> jax.Array:
    """int32 branch for a step: only the unconditional half when every scale is 0, only the
    conditional half when every scale is 1, both otherwise or while some sample's detector still
    needs both."""
    need_uncond = signal_pending | jnp.any(scale_if_no_switch != 1.0)
    need_cond = signal_pending | jnp.any(scale_if_no_switch != 0.0)
    return jnp.where(need_uncond & need_cond, BOTH, jnp.where(need_uncond, UNCOND_ONLY, COND_ONLY)).astype(jnp.int32)


def _both_halves(unet_fn: UnetFn, params, x, t, cond, uncond):
    b = x.shape[0]
    out = unet_fn(params, jnp.concatenate([x, x]), jnp.full((2 * b,), t), jnp.concatenate([uncond, cond]))
    return out[:b], out[b:]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def unet_halves(unet_fn: UnetFn, params, x_in: Latents, t, cond: Embeddings, uncond: Embeddings, branch):
    """Run the halves ``branch`` asks for. Returns (eps_u, eps_c), [B,...] each; a skipped half
    is filled with the other, so the combine stays exact at scale 0 or 1.

    Derivatives (custom JVP): both halves are evaluated, so gradients are those of the full
    combine ``eps_u + s (eps_c - eps_u)`` at every step, scale 0 and 1 included. Without
    differentiation the skipped half is never computed."""

    def one(context):
        def run(x):
            out = unet_fn(params, x, jnp.full((x.shape[0],), t), context)
            return out, out

        return run

    both = functools.partial(_both_halves, unet_fn, params, t=t, cond=cond, uncond=uncond)
    return jax.lax.switch(branch, [lambda x: both(x), one(uncond), one(cond)], x_in)


def _is_zero(tree) -> bool:
    return all(isinstance(leaf, SymbolicZero) for leaf in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, SymbolicZero)))


def _instantiate(tree):
    return jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype) if isinstance(v, SymbolicZero) else v, tree,
                        is_leaf=lambda v: isinstance(v, SymbolicZero))


@functools.partial(unet_halves.defjvp, symbolic_zeros=True)
def _unet_halves_jvp(unet_fn, primals, tangents):
    params, x_in, t, cond, uncond, _ = primals
    names = ("params", "x", "cond", "uncond")
    values = dict(zip(names, (params, x_in, cond, uncond)))
    moving = {n: tan for n, tan in zip(names, (tangents[0], tangents[1], tangents[3], tangents[4])) if not _is_zero(tan)}

    def full(*args):
        return _both_halves(unet_fn, t=t, **{**values, **dict(zip(moving, args))})

    if not moving:
        out = full()
        return out, jax.tree.map(jnp.zeros_like, out)
    return jax.jvp(full, tuple(values[n] for n in moving), tuple(_instantiate(v) for v in moving.values()))


def _validate(scheduler, latents, cond, uncond, before, after, detector) -> None:
    """One-line ValueErrors for the functional API (shapes are static, so this runs under jit)."""
    if not isinstance(scheduler, Scheduler):
        raise ValueError(f"sampler: scheduler must be a cfgbasin_jax.schedulers.Scheduler (make one with "
                         f"schedulers.make_scheduler(name, config, steps)), got {type(scheduler).__name__}")
    if detector is not None and not isinstance(detector, D.Detector):
        raise ValueError(f"sampler: detector must be a cfgbasin_jax.method.detectors.Detector, got {type(detector).__name__}")
    if jnp.ndim(latents) < 2:
        raise ValueError(f"sampler: latents must be [B,C,h,w], got shape {jnp.shape(latents)}")
    b, steps = jnp.shape(latents)[0], scheduler.timesteps.shape[0]
    for name, value in (("cond", cond), ("uncond", uncond)):
        if jnp.ndim(value) != 3 or jnp.shape(value)[0] != b:
            raise ValueError(f"sampler: {name} must be [B={b},L,D], got shape {jnp.shape(value)}")
    for name, value in (("before", before), ("after", after)):
        if jnp.shape(value) != (b, steps):
            raise ValueError(f"sampler: {name} must be [B={b}, S={steps}] (samples x steps), got shape {jnp.shape(value)}")


def sample_loop(
    params,
    scheduler,
    latents: Latents,
    cond: Embeddings,
    uncond: Embeddings,
    before: PerStep,
    after: PerStep,
    detector: D.Detector | None = None,
    *,
    unet_fn: UnetFn,
    on_step: Callable[[jax.Array], None] | None = None,
    skip_halves: bool = True,
    cond_fn: CondFn | None = None,
    cond_aux=None,
    remat: bool = False,
) -> Trace:
    """One sampling pass from ``latents`` [B,C,h,w] (already scaled by init_noise_sigma).

    cond, uncond: [B,L,D] text embeddings. before, after: float32 [B,S] per-step scales.
    detector: a :class:`~cfgbasin_jax.method.detectors.Detector` with per-sample leaves (default: never
    switch, i.e. ``before`` throughout). ``scheduler``: a :class:`cfgbasin_jax.schedulers.Scheduler`.
    ``on_step(j)``, if given, is traced into every step (e.g. a host callback advancing a progress
    bar). ``skip_halves=False`` always runs both halves (the reference path; same results within
    float tolerance). ``cond_fn(cond, t, j, cond_aux)``, if given (static), replaces the conditional
    embedding at every step (e.g. CADS); ``cond_aux`` is a traced pytree of per-sample arrays
    [B,...]. ``remat=True`` rematerialises each step under differentiation (``jax.checkpoint``),
    trading compute for memory on long trajectories.
    """
    _validate(scheduler, latents, cond, uncond, before, after, detector)
    b, steps = latents.shape[0], scheduler.timesteps.shape[0]
    if detector is None:
        detector = D.FixedSwitch(index=jnp.full((b,), steps, jnp.int32))
    latents = latents.astype(jnp.float32)
    per_sample = lambda v, dtype=None: jnp.broadcast_to(jnp.asarray(v, dtype), (b,))  # noqa: E731
    view = (-1,) + (1,) * (latents.ndim - 1)
    carry0 = (latents, scheduler.init_state(latents), detector.init(b), -jnp.ones((b,), jnp.int32),
              jnp.zeros((b,), bool))
    xs = (jnp.arange(steps, dtype=jnp.int32), scheduler.timesteps, jnp.asarray(before).T, jnp.asarray(after).T)

    def step(carry, xs_j):
        x, sched_state, det, first, nonfinite = carry
        j, t, before_j, after_j = xs_j
        if on_step is not None:
            on_step(j)
        scale_pre = per_sample(detector.select(det, j, before_j, after_j))
        pending = jnp.any(per_sample(detector.needs_both(det, j), bool))
        branch = halves_needed(scale_pre, pending | (not skip_halves))
        x_in = scheduler.scale_model_input(sched_state, x, j)
        cond_j = cond if cond_fn is None else cond_fn(cond, t, j, cond_aux)
        eps_u, eps_c = unet_halves(unet_fn, params, x_in, t, cond_j, uncond, branch)
        eps_u, eps_c = eps_u.astype(jnp.float32), eps_c.astype(jnp.float32)
        d = jnp.where(branch == BOTH, l2_norm(eps_c - eps_u), jnp.nan)
        signals = D.Signals(j=j, t=t, x=x, eps_u=eps_u, eps_c=eps_c, noise_diff=d)
        det = detector.update_at("eps", det, signals, j)
        s = per_sample(detector.select(det, j, before_j, after_j))
        first = jnp.where((first < 0) & per_sample(detector.switched(det, j), bool), j, first)
        x_next, sched_state = scheduler.step(sched_state, eps_u + s.reshape(view) * (eps_c - eps_u), j, x)
        c = detector.latent_cosine(x_next, x)
        det = detector.update_at("step", det, signals._replace(x_next=x_next, latent_cosine=c), j)
        nonfinite = nonfinite | ~jnp.all(jnp.isfinite(x_next.reshape(b, -1)), axis=-1)
        return (x_next, sched_state, det, first, nonfinite), (d, c, s, jnp.broadcast_to(branch, (b,)))

    body = jax.checkpoint(step) if remat else step
    (x, _, det, first, nonfinite), (d, c, s, branch) = jax.lax.scan(body, carry0, xs)
    return Trace(
        latents=x, noise_diff=d.T, latent_cosine=c.T, scale=s.T, branch=branch.T, transition_index=first,
        transition_fallback=per_sample(detector.fell_back(det), bool) & (first >= 0), nonfinite=nonfinite,
        unet_evals=jnp.sum(jnp.where(branch == BOTH, 2, 1), axis=0).astype(jnp.int32), detector_state=det,
    )


def run_passes(run_pass: Callable[[D.Detector], Trace], detector: D.Detector) -> list[Trace]:
    """``run_pass`` with the detector's pass detector, then one more pass for every detector that
    ``replay`` returns (the exact two-pass rule records, then replays). Returns all passes' traces."""
    traces = [run_pass(detector.pass_detector())]
    while (detector := detector.replay(traces[-1])) is not None:
        traces.append(run_pass(detector.pass_detector()))
    return traces


def combine_passes(traces: Sequence[Trace]) -> Trace:
    """The result of a multi-pass run: the last pass, with ``latent_cosine`` of the first
    (recording) pass and ``unet_evals`` summed over passes."""
    last = traces[-1]
    return last._replace(latent_cosine=traces[0].latent_cosine, unet_evals=sum(t.unet_evals for t in traces))


def sample(params, scheduler, latents: Latents, cond: Embeddings, uncond: Embeddings, before: PerStep,
           after: PerStep, detector: D.Detector | None = None, **loop_kwargs) -> Trace:
    """:func:`sample_loop` with every pass its detector asks for (:func:`run_passes`), combined by
    :func:`combine_passes`. Same arguments as :func:`sample_loop`."""
    run = functools.partial(sample_loop, params, scheduler, latents, cond, uncond, before, after, **loop_kwargs)
    if detector is None:
        return run(None)
    return combine_passes(run_passes(lambda det: run(det), detector))


def sweep(params, scheduler, latents: Latents, cond: Embeddings, uncond: Embeddings, plans: Sequence, **loop_kwargs) -> Trace:
    """Sample the same B samples under P plans (``guidance.plan`` results for batch B, one detector
    structure) as ONE batch of P*B: halves are still skipped where every sample agrees (``jax.vmap``
    over :func:`sample_loop` would turn the branch choice into a select that runs every branch).
    Returns a Trace whose per-sample leaves are [P,B,...]."""
    plans = list(plans)
    if not plans:
        raise ValueError("sweep: no plans given")
    p, b = len(plans), latents.shape[0]
    tile = lambda x: jnp.concatenate([jnp.asarray(x)] * p)  # noqa: E731
    before = jnp.concatenate([jnp.asarray(pl.before) for pl in plans])
    after = jnp.concatenate([jnp.asarray(pl.after) for pl in plans])
    detector = D.concatenate([pl.detector for pl in plans])
    if loop_kwargs.get("cond_aux") is not None:
        loop_kwargs["cond_aux"] = jax.tree.map(tile, loop_kwargs["cond_aux"])
    trace = sample(params, scheduler, tile(latents), tile(cond), tile(uncond), before, after, detector, **loop_kwargs)
    return jax.tree.map(lambda a: a.reshape((p, b) + a.shape[1:]), trace)


__all__ = [
    "BOTH", "COND_ONLY", "CondFn", "Conditioning", "Trace", "UNCOND_ONLY", "UnetFn", "combine_passes", "cosine_distance",
    "halves_needed", "l2_norm", "run_passes", "sample", "sample_loop", "sweep", "unet_halves",
]
