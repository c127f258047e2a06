"""Transition detectors: when does a sample switch from the ``before`` scale to the ``after`` scale?

A detector is a small object whose per-sample state rides in the sampler's ``lax.scan`` carry. Its
array fields are traced data (sweeping a threshold never recompiles); its class and static fields
are the compiled structure. Write one as a ``flax.struct.dataclass`` subclass of :class:`Detector`:

* ``reads``: the signals ``update`` reads (names from :data:`SIGNALS`).
* ``init(batch) -> state``: a pytree whose leaves are per-sample arrays ``[B, ...]``.
* ``update(state, signals, j) -> state``: called once per step ``j`` with a :class:`Signals`. It runs
  as soon as every signal it reads exists: after the UNet halves and before the guided combine when
  it reads only :data:`EPS_SIGNALS` (a switch decided at step j applies at step j), otherwise after
  the scheduler step (a switch applies from step j+1 on).
* ``switched(state, j) -> bool [B]``: does ``after`` apply at step j?

Optional hooks with defaults: ``needs_both`` (which samples need both UNet halves at step j, so
that skipping a half stays correct), ``select`` (the scale from before/after), ``fell_back`` (the
switch came from a fallback rule, not a detection), ``replay`` (a detector for one more pass over
the same noise: the exact two-pass rule), ``latent_cosine`` (the formula of that signal, see
:data:`COSINE_FORMULAS`), ``update_at`` (stage routing, for composites) and ``report`` (per-sample
values kept with each image, e.g. a gate's score and flag).

Built-ins: :class:`FixedSwitch` (constant CFG, STP), :class:`NoiseDiffMinimum` (DTP),
:class:`LatentCosineMinimum` (causal OG+DTP), :class:`TwoPass` (exact OG+DTP: a recording pass
that never switches, composed with a replay rule, :func:`exact_latent_cosine`), and :class:`Gated`
(detect, then mitigate: a per-sample memorization flag from the first steps' signal chooses between
any of these and constant CFG).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cfgbasin_jax.method import official_cosine
from cfgbasin_jax.method.arrays import Latents, Mask, PerSample, PerStep, Scalar
from cfgbasin_jax.schedulers import working_dtype

EPS_SIGNALS = ("j", "t", "x", "eps_u", "eps_c", "noise_diff")
"""Known after the UNet halves of step j, before the guided combine."""
STEP_SIGNALS = ("x_next", "latent_cosine")
"""Known only after the scheduler step of step j."""
SIGNALS = EPS_SIGNALS + STEP_SIGNALS
STAGES = ("eps", "step")
HALF_SIGNALS = frozenset({"noise_diff", "eps_u", "eps_c"})
"""Signals that are only meaningful where both UNet halves ran."""

# The official opposite-guidance script falls back to this index when c has no local minimum.
LATENT_COSINE_FALLBACK_INDEX = 5
NEVER = int(np.iinfo(np.int32).max)
"""A switch step that is never reached."""


class Signals(NamedTuple):
    """What a detector may read at step j (float32; x_next and latent_cosine are None before the
    scheduler step).

    j: int32 [] step index. t: [] timestep. x: [B,C,h,w] latents entering the step.
    eps_u, eps_c: [B,C,h,w] unconditional / conditional model outputs (a skipped half holds the
    other). noise_diff: [B] ||eps_c - eps_u|| (NaN where a half was skipped).
    x_next: [B,C,h,w] latents after the step. latent_cosine: [B] the cosine distance of x_next and x.
    """

    j: Scalar
    t: Scalar
    x: Latents
    eps_u: Latents
    eps_c: Latents
    noise_diff: PerSample
    x_next: Latents | None = None
    latent_cosine: PerSample | None = None


# ------------------------------------------------------------------------------------------ signals


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1).astype(working_dtype(x))


def safe_sqrt(sq: jax.Array) -> jax.Array:
    """sqrt with a finite gradient at 0 (the gradient there is 0)."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def l2_norm(x: Latents) -> PerSample:
    """[B,...] -> [B]: L2 norm of each sample's whole tensor (finite gradient at 0)."""
    return safe_sqrt(jnp.sum(jnp.square(_flat(x)), axis=-1))


def _unit(x: jax.Array) -> jax.Array:
    norm = l2_norm(x)[:, None]
    return _flat(x) / jnp.where(norm > 0, norm, 1.0)


def cosine_distance(a: Latents, b: Latents) -> PerSample:
    """[B,...] x [B,...] -> [B]: 1 - cos(a_i, b_i) over each sample's flattened tensor.

    Computed as ||a/|a| - b/|b|||^2 / 2 (the same quantity), which keeps float32 precision when
    consecutive latents are nearly parallel (c ~ 1e-5), where ``1 - dot/(|a||b|)`` cancels.
    """
    return 0.5 * jnp.sum(jnp.square(_unit(a) - _unit(b)), axis=-1)


COSINE_FORMULAS: dict[str, Callable[[Latents, Latents], PerSample]] = {
    "stable": cosine_distance,
    "official": official_cosine.official_cosine_distance,
}
"""Formulas of the latent-cosine signal by precision name. ``"stable"`` (the default) stays smooth
where consecutive latents are nearly parallel; ``"official"`` is the official script's float32
``1 - torch cosine_similarity``, bit for bit (:mod:`cfgbasin_jax.method.official_cosine`), whose values
near convergence are small multiples of 2^-24 with ties. A new formula is one entry here
(``fn(x_next, x) -> [B]``) and is then accepted as ``precision=``."""


PER_SAMPLE_FORMULAS = frozenset({"official"})
"""Formulas whose values follow float rounding (the official one's ties): a pass that records one
runs the UNet one sample at a time, so a sample's signal is the same bits in any batch
(:attr:`Detector.per_sample_unet`)."""


def cosine_formula(precision: str) -> Callable[[Latents, Latents], PerSample]:
    """The latent-cosine formula named ``precision`` (ValueError naming the known ones)."""
    if precision not in COSINE_FORMULAS:
        raise ValueError(f"guidance: unknown precision {precision!r} of the latent-cosine signal; expected one of "
                         f"{', '.join(COSINE_FORMULAS)}")
    return COSINE_FORMULAS[precision]


# ---------------------------------------------------------------------------------------- interface


class Detector:
    """Base class of transition detectors (see the module docstring). Subclasses are
    ``flax.struct.dataclass`` objects: array fields are traced, static fields compile."""

    reads: tuple = ()
    passes: int = 1

    def init(self, batch: int) -> Any:
        """Initial per-sample state (a pytree of [B,...] arrays)."""
        return ()

    def update(self, state, signals: Signals, j: Scalar):
        """The state after observing step j's signals."""
        return state

    def switched(self, state, j: Scalar) -> Mask:
        """bool [B]: ``after`` applies at step j."""
        raise NotImplementedError(f"{type(self).__name__}.switched")

    # -- optional hooks -----------------------------------------------------------------------

    @property
    def stage(self) -> str:
        """"eps" when every signal read exists before the guided combine, else "step"."""
        unknown = set(self.reads) - set(SIGNALS)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown signal(s) {sorted(unknown)}; expected {', '.join(SIGNALS)}")
        return "eps" if set(self.reads) <= set(EPS_SIGNALS) else "step"

    def update_at(self, stage: str, state, signals: Signals, j: Scalar):
        """The sampler calls this at both stages of every step; ``update`` runs at :attr:`stage`.
        Composites override it to route each stage to their parts."""
        return self.update(state, signals, j) if stage == self.stage else state

    def needs_both(self, state, j: Scalar) -> Mask:
        """bool [B]: the sample needs both UNet halves at step j. Default: while not switched,
        if the detector reads a signal that needs both halves."""
        pending = ~self.switched(state, j)
        return pending if HALF_SIGNALS & set(self.reads) else jnp.zeros_like(pending)

    def select(self, state, j: Scalar, before: PerSample, after: PerSample) -> PerSample:
        """The scale [B] applied at step j, from the before / after scales [B]."""
        return jnp.where(self.switched(state, j), after, before)

    def fell_back(self, state) -> Mask:
        """bool [B]: the switch came from a fallback rule rather than a detection."""
        return jnp.zeros(jnp.shape(self.switched(state, 0)), bool)

    def replay(self, trace) -> "Detector | None":
        """A detector for one more pass from the same noise, decided from this pass's trace
        (:class:`~cfgbasin_jax.method.sampler.Trace`), or None (default: a single pass)."""
        return None

    def replay_needed(self, trace) -> Mask:
        """bool [B]: the samples whose result the pass that :meth:`replay` returns would change
        (default: all). When none does, the sampler skips that pass (``lax.cond`` under jit)."""
        return jnp.ones(jnp.shape(trace.transition_index), bool)

    @property
    def per_sample_unet(self) -> bool:
        """Static: this pass evaluates the UNet one sample at a time, so each sample's trajectory
        is bit for bit the same in any batch (needed by :data:`PER_SAMPLE_FORMULAS`; default False)."""
        return getattr(self, "precision", None) in PER_SAMPLE_FORMULAS

    def pass_detector(self) -> "Detector":
        """The detector the sampler runs for this pass (a multi-pass composite names its part)."""
        return self

    def latent_cosine(self, x_next: Latents, x: Latents) -> PerSample:
        """The latent-cosine signal recorded at every step (default formula: "stable")."""
        return cosine_distance(x_next, x)

    def report(self, state) -> dict:
        """Per-sample values [B] worth keeping with each image (e.g. a gate's score and flag);
        default: none."""
        return {}


def concatenate(detectors) -> Detector:
    """One batched detector from batched parts of the same structure (leaves concatenated along
    axis 0). ValueError when their classes or static fields differ."""
    detectors = list(detectors)
    if len({jax.tree_util.tree_structure(d) for d in detectors}) > 1:
        kinds = sorted({type(d).__name__ for d in detectors})
        detail = "" if len(kinds) > 1 else " with different static settings"
        raise ValueError(f"guidance: one batch cannot mix detector kinds {kinds}{detail}")

    def join(*leaves):
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return jnp.concatenate([jnp.asarray(x) for x in leaves])
        return np.concatenate([np.asarray(x) for x in leaves])

    return jax.tree.map(join, *detectors)


def broadcast(detector: Detector, batch: int) -> Detector:
    """``detector`` with every leaf broadcast to a leading batch axis [B,...] (leaves that already
    have it are kept)."""

    def widen(x):
        traced = isinstance(x, jax.core.Tracer)
        xp = jnp if traced else np
        x = xp.asarray(x)
        if x.ndim >= 1 and x.shape[0] == batch:
            return x
        return xp.broadcast_to(x, (batch,) + x.shape)

    return jax.tree.map(widen, detector)


def describe(detector: Detector) -> dict:
    """JSON-friendly description: class name, array fields as lists, static fields as they are."""
    out: dict = {"detector": type(detector).__name__}
    for name in getattr(detector, "__dataclass_fields__", {}):
        value = getattr(detector, name)
        if isinstance(value, Detector):
            value = describe(value)
        elif callable(value):
            value = getattr(value, "__name__", repr(value))
        elif isinstance(value, (np.ndarray, jax.Array, np.generic)):
            value = np.asarray(value).tolist()
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------- built-ins


@struct.dataclass
class FixedSwitch(Detector):
    """``after`` from step ``index`` on (>= S: never): constant CFG, STP, the exact rule's passes.

    index: int32 [B]. fallback: bool [B], the index came from a fallback rule (reported only).
    precision: the formula of the recorded latent cosine (:data:`COSINE_FORMULAS`).
    """

    index: Any
    fallback: Any = False
    precision: str = struct.field(pytree_node=False, default="stable")

    def switched(self, state, j):
        return j >= jnp.asarray(self.index)

    def fell_back(self, state):
        return jnp.asarray(self.fallback, bool) & jnp.ones(jnp.shape(self.index), bool)

    def latent_cosine(self, x_next, x):
        return cosine_formula(self.precision)(x_next, x)


class MinimumState(NamedTuple):
    """prev1, prev2: float32 [B], the signal one and two steps back (-1 before the first steps).
    index: int32 [B], the step from which ``after`` applies (-1 while undecided).
    fell_back: bool [B], the index is the fallback step."""

    prev1: jax.Array
    prev2: jax.Array
    index: jax.Array
    fell_back: jax.Array


def minimum_init(batch: int) -> MinimumState:
    minus_one = -jnp.ones((batch,), jnp.float32)
    return MinimumState(minus_one, minus_one, -jnp.ones((batch,), jnp.int32), jnp.zeros((batch,), bool))


def strict_minimum_behind(state: MinimumState, value: PerSample) -> Mask:
    """bool [B]: the previous value is a strict local minimum given the newest ``value``."""
    return (value > state.prev1) & (state.prev2 > state.prev1)


def _latched(state: MinimumState, j) -> Mask:
    return (state.index >= 0) & (j >= state.index)


@struct.dataclass
class NoiseDiffMinimum(Detector):
    """DTP (the official rule): with d_j = ||eps_c - eps_u||, ``after`` applies from the step j at
    which d_{j-1} is the first strict local minimum (d_j > d_{j-1} < d_{j-2}, d_{-1} = d_{-2} = -1).
    Decided before step j's combine, so the switch applies at step j itself."""

    reads = ("noise_diff",)

    def init(self, batch):
        return minimum_init(batch)

    def update(self, state, signals, j):
        d = signals.noise_diff
        new = (state.index < 0) & strict_minimum_behind(state, d)
        return state._replace(prev1=d, prev2=state.prev1, index=jnp.where(new, j, state.index))

    def switched(self, state, j):
        return _latched(state, j)


@struct.dataclass
class LatentCosineMinimum(Detector):
    """Causal OG+DTP: with c_j = 1 - cos(x_{j+1}, x_j) observed after step j, a strict local
    minimum at index j-1 >= 2 is confirmed then, and ``after`` applies from step j+1 on. A sample
    still undecided at step ``fallback`` (int32 [B]; >= S: never) switches there.
    ``precision``: the formula of c (:data:`COSINE_FORMULAS`)."""

    fallback: Any = NEVER
    precision: str = struct.field(pytree_node=False, default="stable")
    reads = ("latent_cosine",)

    def init(self, batch):
        return minimum_init(batch)

    def update(self, state, signals, j):
        c = signals.latent_cosine
        late = (state.index < 0) & (j >= self.fallback)
        index = jnp.where(late, jnp.asarray(self.fallback, jnp.int32), state.index)
        new = (index < 0) & strict_minimum_behind(state, c) & (j - 1 >= 2)
        return MinimumState(prev1=c, prev2=state.prev1, index=jnp.where(new, j + 1, index),
                            fell_back=state.fell_back | late)

    def switched(self, state, j):
        return _latched(state, j) | ((state.index < 0) & (j >= self.fallback))

    def fell_back(self, state):
        return state.fell_back

    def latent_cosine(self, x_next, x):
        return cosine_formula(self.precision)(x_next, x)


@struct.dataclass
class TwoPass(Detector):
    """A first pass sampled with ``first``, then a replay from the same noise with the detector that
    ``rule(trace of the first pass)`` returns (``rule`` is static). The sampler never sees a
    TwoPass: :func:`cfgbasin_jax.method.sampler.run_passes` runs its :meth:`pass_detector`."""

    first: Detector
    rule: Callable = struct.field(pytree_node=False)

    @property
    def passes(self):
        return self.first.passes + 1

    def pass_detector(self):
        return self.first.pass_detector()

    def switched(self, state, j):
        raise ValueError("detectors: a TwoPass runs in several passes; sample it with sampler.sample "
                         "(sampler.sample_loop runs one pass)")

    def replay(self, trace):
        return self.rule(trace)


GATE_SCORES = {"noise_diff_mean": "noise_diff"}
"""Scores of :class:`Gated` by name: the signal averaged over the gate's first steps. "noise_diff_mean"
is Wen et al.'s (ICLR 2024) memorization score, the mean of ``||eps_c - eps_u||``
(:func:`cfgbasin_jax.metrics.detection.detection_score` of the recorded trace). A new score is one entry."""


class GateState(NamedTuple):
    """score: float32 [B], the running mean of the gate's signal (final from step ``steps - 1`` on).
    flagged: bool [B], score > threshold (decided at step ``steps - 1``). inner: the mitigation's state."""

    score: jax.Array
    flagged: jax.Array
    inner: Any


@struct.dataclass
class Gated(Detector):
    """Detect, then mitigate: each sample's score (:data:`GATE_SCORES`, averaged over steps
    ``0..steps-1``, which run both UNet halves) flags it when above ``threshold``. Flagged samples
    follow ``mitigation`` (its scales and its detector, from step ``steps - 1`` on), the others
    ``after`` (constant CFG). A step's noise difference is known before its combine, so with
    ``steps=1`` the flag applies from the first step; before step ``steps - 1`` every sample uses
    ``pre_scale`` (float32 [B]; None: ``after``, so unflagged samples stay plain CFG throughout).

    threshold: float32 [B] (traced: sweeping it never recompiles). mitigation: any detector (a
    multi-pass one replays under the same gate). steps, score: static.
    """

    mitigation: Detector
    threshold: Any
    pre_scale: Any = None
    steps: int = struct.field(pytree_node=False, default=1)
    score: str = struct.field(pytree_node=False, default="noise_diff_mean")
    reads = ("noise_diff",)

    @property
    def passes(self):
        return self.mitigation.passes

    def init(self, batch):
        return GateState(jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), bool), self.mitigation.init(batch))

    def update_at(self, stage, state, signals, j):
        score, flagged = state.score, state.flagged
        if stage == "eps":
            value = getattr(signals, GATE_SCORES[self.score])
            score = score + jnp.where(j < self.steps, value, 0.0) / self.steps
            flagged = jnp.where(j == self.steps - 1, score > self.threshold, flagged)
        return GateState(score, flagged, self.mitigation.update_at(stage, state.inner, signals, j))

    def switched(self, state, j):
        return state.flagged & self.mitigation.switched(state.inner, j)

    def select(self, state, j, before, after):
        pre = after if self.pre_scale is None else jnp.asarray(self.pre_scale, jnp.result_type(after))
        mitigated = jnp.where(state.flagged, self.mitigation.select(state.inner, j, before, after), after)
        return jnp.where(j < self.steps - 1, pre, mitigated)

    def needs_both(self, state, j):
        return (j < self.steps) | (state.flagged & self.mitigation.needs_both(state.inner, j))

    def fell_back(self, state):
        return state.flagged & self.mitigation.fell_back(state.inner)

    def replay(self, trace):
        inner = self.mitigation.replay(trace)
        return None if inner is None else self.replace(mitigation=inner)

    def pass_detector(self):
        return self.replace(mitigation=self.mitigation.pass_detector())

    def replay_needed(self, trace):
        """Only flagged samples follow the mitigation's replay; the others' recording pass was
        already constant CFG, so a batch with no flagged sample skips the replay."""
        state = trace.detector_state
        return state.flagged & self.mitigation.replay_needed(trace._replace(detector_state=state.inner))

    @property
    def per_sample_unet(self):
        return self.mitigation.per_sample_unet

    def latent_cosine(self, x_next, x):
        return self.mitigation.latent_cosine(x_next, x)

    def report(self, state):
        return {"gate_score": state.score, "gate_flagged": state.flagged}


def first_minimum_index(c: PerStep) -> tuple[PerSample, Mask]:
    """The official opposite-guidance rule over whole recorded trajectories c [..., S] (jnp,
    traceable): the first strict local minimum; the second if the first is at index 1 and a
    second exists; :data:`LATENT_COSINE_FALLBACK_INDEX` if there is none.
    Returns (index int32 [...], fallback bool [...]: no minimum, the fallback index)."""
    c = jnp.asarray(c)
    mid = (c[..., 1:-1] < c[..., :-2]) & (c[..., 1:-1] < c[..., 2:])
    minima = jnp.pad(mid, [(0, 0)] * (c.ndim - 1) + [(1, 1)])
    k = jnp.arange(c.shape[-1])
    first = jnp.argmax(minima, axis=-1)
    later = minima & (k > first[..., None])
    second = jnp.argmax(later, axis=-1)
    none = ~jnp.any(minima, axis=-1)
    index = jnp.where((first == 1) & jnp.any(later, axis=-1), second, first)
    return jnp.where(none, LATENT_COSINE_FALLBACK_INDEX, index).astype(jnp.int32), none


def replay_at_first_minimum(trace) -> FixedSwitch:
    """The exact rule's replay: switch at :func:`first_minimum_index` of the recorded
    ``trace.latent_cosine`` [B,S] (the fallback flag kept for the result)."""
    index, fallback = first_minimum_index(trace.latent_cosine)
    return FixedSwitch(index=index, fallback=fallback)


def exact_latent_cosine(precision: str = "stable") -> TwoPass:
    """Exact OG+DTP, as the official script: record c (formula ``precision``) under ``before`` for
    the whole trajectory, then replay from the same noise switching at the official index (2x the
    UNet work)."""
    cosine_formula(precision)
    return TwoPass(first=FixedSwitch(index=np.int32(NEVER), precision=precision), rule=replay_at_first_minimum)


__all__ = [
    "COSINE_FORMULAS", "Detector", "EPS_SIGNALS", "FixedSwitch", "GATE_SCORES", "GateState", "Gated", "LATENT_COSINE_FALLBACK_INDEX", "LatentCosineMinimum",
    "MinimumState", "NEVER", "NoiseDiffMinimum", "PER_SAMPLE_FORMULAS", "SIGNALS", "STEP_SIGNALS", "Signals", "TwoPass",
    "broadcast", "concatenate", "cosine_distance", "cosine_formula", "describe", "exact_latent_cosine", "first_minimum_index",
    "l2_norm", "minimum_init", "replay_at_first_minimum", "strict_minimum_behind",
]
