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
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from cfgbasin_jax.method import detectors as D
from cfgbasin_jax.method.arrays import Embeddings, Latents, Mask, PerSample, PerStep, StepIndex, like, vary, varying_axes
from cfgbasin_jax.method.detectors import cosine_distance, l2_norm  # noqa: F401  (re-exported)
from cfgbasin_jax.schedulers import Scheduler, working_dtype

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

    latents: [B,C,h,w] final latents, float64 for float64 input latents, else float32.
    noise_diff, latent_cosine, scale: [B,S] in the same dtype (noise_diff NaN where a half was
    skipped; the official-precision latent_cosine is float32 values). branch: int32 [B,S] halves run per step for the
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


def _per_sample_unet(unet_fn: UnetFn) -> UnetFn:
    """``unet_fn`` evaluated one row at a time (``lax.map`` over the rows), so each sample's output
    has the same float rounding whatever else is in the batch (XLA:CPU picks shape-dependent
    kernels). A single row is evaluated twice: XLA inlines a loop of one iteration, which would
    compile it differently from the loop body."""

    def run(params, x, t, context):
        n = x.shape[0]
        rows = (x, t, context) if n > 1 else tuple(jnp.concatenate([a, a]) for a in (x, t, context))
        out = jax.lax.map(lambda row: unet_fn(params, *(a[None] for a in row))[0], rows)
        return out[:n]

    return run


def _real_float(name: str, value) -> None:
    dtype = jnp.result_type(value)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"sampler: {name} must be a real float array (float32 or float64), got {dtype}")


def _validate(scheduler, latents, cond, uncond, before, after, detector) -> None:
    """One-line ValueErrors for the functional API (shapes are static, so this runs under jit)."""
    if not isinstance(scheduler, Scheduler):
        raise ValueError(f"sampler: scheduler must be a cfgbasin_jax.schedulers.Scheduler (make one with "
                         f"schedulers.make_scheduler(name, config, steps)), got {type(scheduler).__name__}")
    if detector is not None and not isinstance(detector, D.Detector):
        raise ValueError(f"sampler: detector must be a cfgbasin_jax.method.detectors.Detector, got {type(detector).__name__}")
    if jnp.ndim(latents) < 2:
        raise ValueError(f"sampler: latents must be [B,C,h,w], got shape {jnp.shape(latents)}")
    _real_float("latents", latents)
    b, steps = jnp.shape(latents)[0], scheduler.timesteps.shape[0]
    for name, value in (("cond", cond), ("uncond", uncond)):
        if jnp.ndim(value) != 3 or jnp.shape(value)[0] != b:
            raise ValueError(f"sampler: {name} must be [B={b},L,D], got shape {jnp.shape(value)}")
    for name, value in (("before", before), ("after", after)):
        if jnp.shape(value) != (b, steps):
            raise ValueError(f"sampler: {name} must be [B={b}, S={steps}] (samples x steps), got shape {jnp.shape(value)}")
        _real_float(name, value)
    if detector is not None:
        _check_batch("detector", detector, b)


def _check_batch(name: str, tree, b: int) -> None:
    """Every array leaf of ``tree`` with a leading axis must have B rows (per-sample leaves)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] != b:
            raise ValueError(f"sampler: {name}{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; per-sample "
                             f"leaves must be [B={b},...] (build the detector for this batch, e.g. guidance.plan)")


def _initial_state(detector: D.Detector, b: int, dtype):
    """``detector.init(b)`` with its float leaves in the sampler's dtype (checked: [B,...] leaves)."""
    state = detector.init(b)
    _check_batch(f"{type(detector).__name__}.init({b})", state, b)
    return jax.tree.map(lambda v: jnp.asarray(v, dtype) if jnp.issubdtype(jnp.result_type(v), jnp.floating)
                        else jnp.asarray(v), state)


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
    dtype = working_dtype(latents)
    latents = jnp.asarray(latents, dtype)
    before, after = jnp.asarray(before, dtype), jnp.asarray(after, dtype)
    if detector.per_sample_unet:
        unet_fn = _per_sample_unet(unet_fn)
    per_sample = lambda v, dtype=None: jnp.broadcast_to(jnp.asarray(v, dtype), (b,))  # noqa: E731
    view = (-1,) + (1,) * (latents.ndim - 1)
    # Inside a user's jax.shard_map the loop state must vary over the mesh axes its inputs vary over
    # (the carry's type is the body's output type), so state built from constants is cast to them.
    axes = varying_axes(params, scheduler, latents, cond, uncond, before, after, detector, cond_aux)
    carry0 = vary((latents, scheduler.init_state(latents), _initial_state(detector, b, dtype),
                   -jnp.ones((b,), jnp.int32), jnp.zeros((b,), bool)), axes)
    xs = (jnp.arange(steps, dtype=jnp.int32), scheduler.timesteps, before.T, after.T)

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
        if eps_u.shape != x.shape:
            raise ValueError(f"sampler: unet_fn returned shape {eps_u.shape} for latents of shape {x.shape}; it must "
                             "return the model output [N,C,h,w] of its input's shape (check the UNet's out_channels)")
        eps_u, eps_c = eps_u.astype(dtype), eps_c.astype(dtype)
        d = jnp.where(branch == BOTH, l2_norm(eps_c - eps_u), jnp.nan)
        signals = D.Signals(j=j, t=t, x=x, eps_u=eps_u, eps_c=eps_c, noise_diff=d)
        det = detector.update_at("eps", det, signals, j)
        s = per_sample(detector.select(det, j, before_j, after_j))
        first = jnp.where((first < 0) & per_sample(detector.switched(det, j), bool), j, first)
        x_next, sched_state = scheduler.step(sched_state, eps_u + s.reshape(view) * (eps_c - eps_u), j, x)
        c = detector.latent_cosine(x_next, x)
        det = detector.update_at("step", det, signals._replace(x_next=x_next, latent_cosine=c), j)
        nonfinite = nonfinite | ~jnp.all(jnp.isfinite(x_next.reshape(b, -1)), axis=-1)
        out = like((x_next, sched_state, det, first, nonfinite), carry)
        return out, (d, c.astype(dtype), s.astype(dtype), jnp.broadcast_to(branch, (b,)))

    body = jax.checkpoint(step) if remat else step
    (x, _, det, first, nonfinite), (d, c, s, branch) = jax.lax.scan(body, carry0, xs)
    return Trace(
        latents=x, noise_diff=d.T, latent_cosine=c.T, scale=s.T, branch=branch.T, transition_index=first,
        transition_fallback=per_sample(detector.fell_back(det), bool) & (first >= 0), nonfinite=nonfinite,
        unet_evals=jnp.sum(jnp.where(branch == BOTH, 2, 1), axis=0).astype(jnp.int32), detector_state=det,
    )


def run_passes(run_pass: Callable[[D.Detector], Trace], detector: D.Detector) -> list[Trace]:
    """``run_pass`` with the detector's pass detector, then one more pass for every detector that
    ``replay`` returns (the exact two-pass rule records, then replays). A replay that no sample
    needs (:meth:`~cfgbasin_jax.method.detectors.Detector.replay_needed`, e.g. a gated batch with
    no flagged sample) costs nothing: skipped on the host, or a ``lax.cond`` under jit; its trace
    is then the previous pass's with ``unet_evals`` 0. Returns all passes' traces."""
    traces = [run_pass(detector.pass_detector())]
    while (replay := detector.replay(traces[-1])) is not None:
        traces.append(_replay_if_needed(run_pass, replay, detector.replay_needed(traces[-1]), traces[-1]))
        detector = replay
    return traces


def _replay_if_needed(run_pass, replay: D.Detector, needed: Mask, previous: Trace) -> Trace:
    def skip():
        return previous._replace(unet_evals=previous.unet_evals * 0)

    if not isinstance(needed, jax.core.Tracer):
        return run_pass(replay.pass_detector()) if np.any(needed) else skip()
    return jax.lax.cond(jnp.any(needed), lambda: run_pass(replay.pass_detector()), skip)


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


SWEEP_GROUPS = ("halves", "points", "all")
"""How :func:`sweep` batches its points: "halves" (default) folds points whose UNet halves agree
at every step (known before sampling), else one point at a time; "points" one point at a time;
"all" every point in one batch."""


def halves_schedule(plan, skip_halves: bool = True) -> np.ndarray | None:
    """int32 [S]: the branch (BOTH / UNCOND_ONLY / COND_ONLY) each step of ``plan`` runs, when it
    is known before sampling (concrete scales and a :class:`~cfgbasin_jax.method.detectors.FixedSwitch`),
    else None (a detector decides during sampling, or the plan is traced)."""
    leaves = (plan.before, plan.after, *jax.tree.leaves(plan.detector))
    if not isinstance(plan.detector, D.FixedSwitch) or any(isinstance(v, jax.core.Tracer) for v in leaves):
        return None
    before, after = np.asarray(plan.before), np.asarray(plan.after)
    if not skip_halves:
        return np.full(before.shape[1], BOTH, np.int32)
    steps = np.arange(before.shape[1])
    index = np.broadcast_to(np.asarray(plan.detector.index), before.shape[:1])
    scale = np.where(steps[None, :] >= index[:, None], after, before)
    uncond, cond = np.any(scale != 1.0, axis=0), np.any(scale != 0.0, axis=0)
    return np.where(uncond & cond, BOTH, np.where(uncond, UNCOND_ONLY, COND_ONLY)).astype(np.int32)


def sweep_chunks(plans: Sequence, group: str = "halves", skip_halves: bool = True) -> list[list[int]]:
    """The points of each batch :func:`sweep` runs (equal sizes; see :data:`SWEEP_GROUPS`). With
    "halves", points with the same :func:`halves_schedule` are folded, in chunks of the largest
    size that divides every such group (so no point runs a half its own loop would skip)."""
    if group not in SWEEP_GROUPS:
        raise ValueError(f"sweep: group must be one of {', '.join(SWEEP_GROUPS)}, got {group!r}")
    p = len(plans)
    if group == "all":
        return [list(range(p))]
    schedules = [halves_schedule(pl, skip_halves) for pl in plans] if group == "halves" else [None]
    if any(sch is None for sch in schedules):
        return [[i] for i in range(p)]
    groups: dict[bytes, list[int]] = {}
    for i, sch in enumerate(schedules):
        groups.setdefault(sch.tobytes(), []).append(i)
    size = functools.reduce(math.gcd, (len(g) for g in groups.values()))
    return [g[k:k + size] for g in groups.values() for k in range(0, len(g), size)]


def sweep(params, scheduler, latents: Latents, cond: Embeddings, uncond: Embeddings, plans: Sequence,
          group: str = "halves", **loop_kwargs) -> Trace:
    """Sample the same B samples under P plans (``guidance.plan`` results for batch B, one detector
    structure) in one compiled call. Points are run in batches of g points (g*B samples) by a
    ``lax.map`` (:func:`sweep_chunks`): by default only points whose UNet halves agree at every step
    share a batch, so no point spends more UNet evaluations than a Python loop over
    :func:`sample` would; ``group="all"`` folds every point into one batch of P*B (the most batching,
    but a half is skipped only where every point agrees). ``jax.vmap`` over :func:`sample_loop`
    would turn the branch choice into a select that runs every branch. Returns a Trace whose
    per-sample leaves are [P,B,...]."""
    plans = list(plans)
    if not plans:
        raise ValueError("sweep: no plans given")
    p, b = len(plans), latents.shape[0]
    chunks = sweep_chunks(plans, group, loop_kwargs.get("skip_halves", True))
    g = len(chunks[0])
    tile = lambda x: jnp.concatenate([jnp.asarray(x)] * g)  # noqa: E731
    if loop_kwargs.get("cond_aux") is not None:
        loop_kwargs["cond_aux"] = jax.tree.map(tile, loop_kwargs["cond_aux"])
    xp = jnp if any(isinstance(v, jax.core.Tracer) for pl in plans for v in jax.tree.leaves(pl)) else np

    def stacked(chunk):
        return (xp.concatenate([xp.asarray(plans[i].before) for i in chunk]),
                xp.concatenate([xp.asarray(plans[i].after) for i in chunk]),
                D.concatenate([plans[i].detector for i in chunk]))

    run = functools.partial(sample, params, scheduler, tile(latents), tile(cond), tile(uncond), **loop_kwargs)
    parts = [stacked(c) for c in chunks]
    if len(chunks) == 1:
        trace = jax.tree.map(lambda a: a[None], run(*parts[0]))
    else:
        trace = jax.lax.map(lambda part: run(*part), jax.tree.map(lambda *xs: xp.stack(xs), *parts))
    order = np.argsort([i for c in chunks for i in c])
    return jax.tree.map(lambda a: a.reshape((p, b) + a.shape[2:])[order], trace)


__all__ = [
    "BOTH", "COND_ONLY", "CondFn", "Conditioning", "Trace", "UNCOND_ONLY", "UnetFn", "combine_passes", "cosine_distance",
    "SWEEP_GROUPS", "halves_needed", "halves_schedule", "l2_norm", "run_passes", "sample", "sample_loop", "sweep",
    "sweep_chunks", "unet_halves",
]
