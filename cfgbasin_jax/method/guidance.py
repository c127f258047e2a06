"""Guidance schedules: the method of Jain et al. (CVPR 2025) as data.

A :class:`Guidance` says which classifier-free-guidance scale applies *before* the transition point
and which *after* it, each optionally shaped over the timestep (the official ``--CFG_scheduling``
shapes), and which transition detector (:mod:`cfgbasin_jax.method.detectors`) decides when the transition
happens. :func:`plan` turns schedules into per-sample, per-step scale arrays [B,S] plus one batched
detector for the sampler.

Everything numeric is traced data in the compiled sampler: sweeping ``t``, ``before``, ``after`` or
a detector's threshold never recompiles. The builders accept Python numbers, numpy / jax arrays
(one value per sample) and tracers; only concrete values are validated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfgbasin_jax.method import detectors as D
from cfgbasin_jax.method.arrays import PerSample, PerStep, Timesteps

CFG_SCALE = 7.5  # the paper's classifier-free guidance scale (every method's scale from the transition on)
SHAPES = ("static", "linear", "invlinear", "cosine", "sine", "v_shape", "a_shape")
SIGNALS = ("noise_diff", "latent_cosine")
MODES = ("exact", "causal")
PRECISIONS = tuple(D.COSINE_FORMULAS)
"""Formulas of the latent-cosine signal (:data:`cfgbasin_jax.method.detectors.COSINE_FORMULAS`): "stable" (default)
and "official" (the official script's float32 ``1 - torch cosine_similarity``, bit for bit)."""

# The official opposite-guidance script falls back to this index when c has no local minimum.
LATENT_COSINE_FALLBACK_INDEX = D.LATENT_COSINE_FALLBACK_INDEX


def _traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


@dataclasses.dataclass(frozen=True)
class Gate:
    """Detect, then mitigate (see :func:`gated`): samples whose ``score`` over the first ``steps``
    steps exceeds ``threshold`` follow the schedule, the others constant CFG (its ``after``).

    threshold: a number >= 0, an array [B], a tracer, or None (not set yet: calibrate it with
    :func:`cfgbasin_jax.pipeline.calibrate_threshold`; sampling refuses None).
    steps: the score's steps (static). score: a name in
    :data:`cfgbasin_jax.method.detectors.GATE_SCORES` (static). pre_scale: the scale of steps
    ``0..steps-2``, before the flag is known (None: the CFG scale ``after``).
    """

    threshold: Any
    steps: int = 1
    score: str = "noise_diff_mean"
    pre_scale: Any = None

    def describe(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("threshold", "pre_scale"):
            if isinstance(out[name], (np.ndarray, jax.Array, np.generic)):
                out[name] = np.asarray(out[name]).tolist()
        return out


@dataclasses.dataclass(frozen=True)
class Guidance:
    """A guidance schedule. Build it with :func:`constant`, :func:`static_transition`,
    :func:`dynamic_transition` or :func:`per_step`; the fields are its plain description.

    Attributes:
      before, after: scales before / from the transition on: a number, or an array [B] with one
        value per sample; for ``rule="per_step"`` an array [S] (or [B,S]) applied at every step.
      shape_before, shape_after: CFG shape names (see :func:`shaped_scale`).
      rule: "constant" | "static" | "dynamic" | "per_step".
      t: static rule: ``before`` applies while the step's timestep is ``> t``, ``after`` while
        ``<= t`` (an integer, or an integer array [B]).
      signal: dynamic rule: "noise_diff" | "latent_cosine", or a
        :class:`~cfgbasin_jax.method.detectors.Detector` (a user-defined rule).
      mode: latent-cosine rule: "exact" | "causal".
      fallback: causal latent-cosine rule: switch at this step if no minimum is confirmed by then.
      precision: latent-cosine formula (:data:`cfgbasin_jax.method.detectors.COSINE_FORMULAS`).
      gate: a :class:`Gate` (detect, then mitigate; see :func:`gated`) or None.
    """

    before: Any
    after: Any
    shape_before: str = "static"
    shape_after: str = "static"
    rule: str = "constant"
    t: Any = None
    signal: Any = None
    mode: str | None = None
    fallback: int | None = None
    precision: str | None = None
    gate: Gate | None = None

    def make_detector(self, timesteps: Timesteps, batch: int = 1) -> D.Detector:
        """The transition detector of this schedule for scheduler ``timesteps`` [S], its leaves
        broadcast to [batch,...]."""
        steps = int(np.shape(timesteps)[0])
        if self.rule == "static":
            detector = D.FixedSwitch(index=timestep_to_index(timesteps, self.t))
        elif self.rule != "dynamic":
            detector = D.FixedSwitch(index=np.int32(steps))
        elif isinstance(self.signal, D.Detector):
            detector = self.signal
        elif self.signal == "noise_diff":
            detector = D.NoiseDiffMinimum()
        elif self.mode == "causal":
            fallback = steps if self.fallback is None else min(self.fallback, steps)
            detector = D.LatentCosineMinimum(fallback=np.int32(fallback), precision=self.precision)
        else:
            detector = D.exact_latent_cosine(self.precision)
        if self.gate is not None:
            gate = self.gate
            if gate.threshold is None:
                raise ValueError("guidance: the gate's threshold is not set; give one, or calibrate it on plain "
                                 "prompts (cfgbasin_jax.pipeline.calibrate_threshold)")
            pre = None if gate.pre_scale is None else _as_float32(gate.pre_scale)
            detector = D.Gated(mitigation=detector, threshold=_as_float32(gate.threshold), pre_scale=pre,
                               steps=gate.steps, score=gate.score)
        return D.broadcast(detector, batch)

    def describe(self) -> dict:
        """JSON-friendly description (for run metadata)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or (field.name == "precision" and value == "stable"):
                continue
            if isinstance(value, D.Detector):
                value = D.describe(value)
            elif isinstance(value, Gate):
                value = value.describe()
            elif isinstance(value, (np.ndarray, jax.Array, np.generic)):
                value = np.asarray(value).tolist()
            out[field.name] = value
        return out


def _as_float32(value):
    return value if _traced(value) else np.asarray(value, np.float32)


def finite_number(owner: str, name: str, value) -> float:
    """``float(value)``, or one ValueError ``"{owner}: {name} must be ..."`` if it is not a finite number."""
    if np.iscomplexobj(value):
        raise ValueError(f"{owner}: {name} must be a real number, got the complex {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return value


def _scale(name: str, value):
    """A scale: a finite number, a finite array [B] (one per sample), or a tracer (unchecked)."""
    if _traced(value):
        return value
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) > 0:
        if np.iscomplexobj(value):
            raise ValueError(f"guidance: {name} must be real, got a {np.asarray(value).dtype} array")
        arr = np.asarray(value, np.float64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"guidance: {name} must be a number or a 1-D array (one per sample), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"guidance: {name} must be finite, got {arr.tolist()}")
        return arr
    return finite_number("guidance", name, value)


def _timestep(t):
    """A transition timestep: an integer, an integer array [B], or an integer tracer."""
    dtype = getattr(t, "dtype", None)
    if _traced(t):
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"guidance: transition timestep t must be an integer, got a {dtype} tracer")
        return t
    if isinstance(t, (np.ndarray, jax.Array, np.generic)):
        if not np.issubdtype(dtype, np.integer) or np.ndim(t) > 1:
            raise ValueError(f"guidance: transition timestep t must be an integer or a 1-D integer array, got {t!r}")
        return np.asarray(t) if np.ndim(t) else int(t)
    if isinstance(t, bool) or not isinstance(t, int):
        raise ValueError(f"guidance: transition timestep t must be an integer, got {t!r}")
    return t


def _check_shape(name: str, shape: str) -> str:
    if shape not in SHAPES:
        raise ValueError(f"guidance: unknown {name} {shape!r}; expected one of {', '.join(SHAPES)}")
    return shape


def constant(scale) -> Guidance:
    """Ordinary classifier-free guidance with one scale at every step (a number or one per sample)."""
    s = _scale("scale", scale)
    return Guidance(before=s, after=s, rule="constant")


def static_transition(t, before, after, shape_before: str = "static", shape_after: str = "static") -> Guidance:
    """Static transition point (STP): ``before`` while the step's timestep > t, ``after`` at <= t.

    Opposite guidance + STP is the same call with a negative ``before`` (paper: -2.0 above t=650,
    7.5 after). Mirrors the official script's ``--guidance_change_step``, ``--guidance_scale``,
    ``--guidance_scale_later``, ``--CFG_scheduling`` and ``--CFG_scheduling_later``.
    """
    return Guidance(
        before=_scale("before", before),
        after=_scale("after", after),
        shape_before=_check_shape("shape_before", shape_before),
        shape_after=_check_shape("shape_after", shape_after),
        rule="static",
        t=_timestep(t),
    )


def dynamic_transition(
    before=1.0,
    after=CFG_SCALE,
    signal: str | D.Detector = "noise_diff",
    mode: str = "exact",
    shape_before: str = "static",
    shape_after: str = "static",
    fallback: int | None | str = "official",
    precision: str = "stable",
) -> Guidance:
    """Dynamic transition point (DTP), detected per sample during sampling.

    signal="noise_diff": the paper's DTP; ``d_j = ||eps_c - eps_u||`` per sample; the transition is
      the step j at which d has its first strict local minimum at j-1 (``d_j > d_{j-1}`` and
      ``d_{j-2} > d_{j-1}``, with ``d_{-1} = d_{-2} = -1``); ``after`` applies from step j on.
      ``mode`` is ignored (detection is causal by construction).
    signal="latent_cosine": opposite guidance + DTP; ``c_j = 1 - cos(x_{j+1}, x_j)`` under ``before``;
      transition = first strict local minimum of c (the second if the first is at index 1 and a
      second exists; index 5 if none). mode="exact" records c in a first pass and replays with the
      switch (2x UNet work, the official semantics); mode="causal" switches in one pass two steps after
      a minimum at index >= 2 (the step after it is observed); a sample with no such minimum by
      step ``fallback`` switches there ("official": the official rule's own fallback,
      :data:`LATENT_COSINE_FALLBACK_INDEX`; ``None``: never switch without a minimum).
      ``precision`` names the formula of c (:data:`cfgbasin_jax.method.detectors.COSINE_FORMULAS`):
      "stable" (default) computes ``0.5 ||x_{j+1}/|x_{j+1}| - x_j/|x_j|||^2``, which keeps float32 precision
      when consecutive latents are nearly parallel; "official" computes it as the official script does
      (float32 ``1 - torch cosine_similarity``, whose values near convergence are small multiples of
      2^-24 with ties), so the official rule sees the official script's ties and spurious minima.
    signal=<a Detector>: a user-defined rule (see :mod:`cfgbasin_jax.method.detectors`); ``mode``,
      ``fallback`` and ``precision`` do not apply.
    """
    custom = isinstance(signal, D.Detector)
    if not custom and signal not in SIGNALS:
        raise ValueError(f"guidance: unknown signal {signal!r}; expected one of {', '.join(SIGNALS)} or a "
                         "cfgbasin_jax.method.detectors.Detector")
    if mode not in MODES:
        raise ValueError(f"guidance: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    causal = signal == "latent_cosine" and mode == "causal"
    if fallback == "official":
        fallback = LATENT_COSINE_FALLBACK_INDEX if causal else None
    if fallback is not None and (isinstance(fallback, bool) or not isinstance(fallback, (int, np.integer)) or fallback < 0):
        raise ValueError(f"guidance: fallback must be a non-negative step index or None, got {fallback!r}")
    if fallback is not None and not causal:
        raise ValueError("guidance: fallback applies only to signal='latent_cosine', mode='causal'")
    cosine = signal == "latent_cosine"
    if cosine:
        D.cosine_formula(precision)
    elif precision != "stable":
        raise ValueError("guidance: precision applies only to signal='latent_cosine'")
    return Guidance(
        before=_scale("before", before),
        after=_scale("after", after),
        shape_before=_check_shape("shape_before", shape_before),
        shape_after=_check_shape("shape_after", shape_after),
        rule="dynamic",
        signal=signal,
        mode=mode if cosine else None,
        fallback=None if fallback is None else int(fallback),
        precision=precision if cosine else None,
    )


GATEABLE = ("static", "dynamic")
"""Rules a gate can mitigate with: STP, OG+STP (static) and DTP, OG+DTP (dynamic)."""


def _threshold(value):
    """A gate threshold: None (set later), a tracer, or finite numbers >= 0 (a number or [B])."""
    if value is None or _traced(value):
        return value
    arr = np.asarray(value, np.float64) if isinstance(value, (np.ndarray, jax.Array, list, tuple)) else None
    if arr is None:
        value = finite_number("guidance", "threshold", value)
        arr = np.asarray(value)
    if arr.ndim > 1 or arr.size == 0:
        raise ValueError(f"guidance: threshold must be a number or a 1-D array (one per sample), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"guidance: threshold must be finite, got {arr.tolist()}")
    if np.any(arr < 0):
        raise ValueError(f"guidance: threshold must be >= 0 (a noise-difference magnitude), got {arr.tolist()}")
    return value if arr.ndim == 0 else arr


def gated(mitigation: Guidance, threshold, steps: int = 1, score: str = "noise_diff_mean", pre_scale=None) -> Guidance:
    """Detect, then mitigate, per sample in one compiled pass: a sample whose ``score`` (the mean of
    ``||eps_c - eps_u||`` over its first ``steps`` steps, Wen et al.'s memorization signal) exceeds
    ``threshold`` follows ``mitigation`` (STP, OG+STP, DTP or OG+DTP); every other sample follows
    constant CFG at the mitigation's ``after`` scale. The threshold is traced (sweeping it never
    recompiles); calibrate it on plain prompts with
    :func:`cfgbasin_jax.pipeline.calibrate_threshold`.

    With ``steps=1`` the flag is known before the first update, so both groups follow their rule
    from the first step. With ``steps > 1`` the first ``steps - 1`` updates use ``pre_scale``
    (default: the CFG scale, so unflagged samples stay identical to CFG).
    """
    if not isinstance(mitigation, Guidance):
        raise ValueError(f"guidance: gated needs a Guidance as mitigation, got {type(mitigation).__name__}")
    if mitigation.gate is not None:
        raise ValueError("guidance: the mitigation is already gated")
    if mitigation.rule not in GATEABLE:
        raise ValueError(f"guidance: a {mitigation.rule} schedule cannot be gated (nothing to mitigate with); the "
                         "mitigation must be a transition method: STP, OG+STP, DTP or OG+DTP")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"guidance: gate steps must be an integer >= 1, got {steps!r}")
    if score not in D.GATE_SCORES:
        raise ValueError(f"guidance: unknown gate score {score!r}; expected one of {', '.join(D.GATE_SCORES)}")
    gate = Gate(threshold=_threshold(threshold), steps=int(steps), score=score,
                pre_scale=None if pre_scale is None else _scale("pre_scale", pre_scale))
    return dataclasses.replace(mitigation, gate=gate)


def with_threshold(g: Guidance, threshold) -> Guidance:
    """The gated schedule ``g`` with another threshold (validated as in :func:`gated`)."""
    if not isinstance(g, Guidance) or g.gate is None:
        raise ValueError("guidance: with_threshold needs a gated schedule (guidance.gated)")
    return dataclasses.replace(g, gate=dataclasses.replace(g.gate, threshold=_threshold(threshold)))


def per_step(scales) -> Guidance:
    """A user-supplied scale for every step (float array [S], S = the scheduler's step count, or
    [B,S] with one row per sample)."""
    if _traced(scales):
        return Guidance(before=scales, after=scales, rule="per_step")
    if np.iscomplexobj(scales):
        raise ValueError("guidance: per-step scales must be real, got complex values")
    arr = np.asarray(scales, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise ValueError(f"guidance: per-step scales must be a non-empty [S] or [B,S] array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("guidance: per-step scales must all be finite")
    return Guidance(before=arr, after=arr, rule="per_step")


def shaped_scale(shape: str, scale, t, num_train_timesteps: int = 1000):
    """The official CFG shapes: the scale applied at timestep ``t`` (numpy or jnp, broadcasts).

    static g; linear g(1 - t/T); invlinear g t/T; cosine g(cos(pi t/T) + 1);
    sine g(sin(pi t/T - pi/2) + 1); v_shape linear for t > T/2 and invlinear at or below;
    a_shape the reverse. T = num_train_timesteps (1000 for SD).
    """
    xp = jnp if isinstance(t, jax.Array) or isinstance(scale, jax.Array) else np
    u = xp.asarray(t, dtype=xp.float32) / num_train_timesteps
    linear, invlinear = scale * (1.0 - u), scale * u
    if shape == "static":
        return scale * xp.ones_like(u)
    if shape == "linear":
        return linear
    if shape == "invlinear":
        return invlinear
    if shape == "cosine":
        return scale * (xp.cos(xp.pi * u) + 1.0)
    if shape == "sine":
        return scale * (xp.sin(xp.pi * u - xp.pi / 2) + 1.0)
    if shape == "v_shape":
        return xp.where(u > 0.5, linear, invlinear)
    if shape == "a_shape":
        return xp.where(u > 0.5, invlinear, linear)
    raise ValueError(f"guidance: unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def timestep_to_index(timesteps: Timesteps, t) -> PerSample:
    """int32 [...]: the first step whose timestep is <= t (S if none), for t of any shape (jnp,
    traceable). The static rule switches at this step."""
    ts = jnp.asarray(timesteps)
    below = ts <= jnp.asarray(t)[..., None]
    return jnp.where(jnp.any(below, axis=-1), jnp.argmax(below, axis=-1), ts.shape[0]).astype(jnp.int32)


class Plan(NamedTuple):
    """Per-sample, per-step guidance data for the sampler (numpy, or jnp when built from tracers).

    before, after: float32 [B, S] scales before / from the transition on.
    detector: a :class:`~cfgbasin_jax.method.detectors.Detector` with per-sample leaves [B,...].
    """

    before: PerStep
    after: PerStep
    detector: D.Detector


def _per_sample(name: str, value, batch: int, xp) -> Any:
    """value as float32 [batch, 1] (or [batch, S] for per-step rows)."""
    arr = xp.asarray(value, xp.float32)
    if arr.ndim == 0:
        return xp.broadcast_to(arr, (batch, 1))
    if arr.shape[0] != batch:
        raise ValueError(f"guidance: {arr.shape[0]} per-sample values of {name} for {batch} prompts")
    return arr[:, None] if arr.ndim == 1 else arr


def check_steps(g: Guidance, steps: int, num_train_timesteps: int) -> None:
    """Host-side checks of ``g`` against a run of ``steps`` steps (ValueError, one line); touches no
    device, so it may run before ``jax.distributed.initialize``."""
    if g.rule == "static" and not _traced(g.t):
        t = np.asarray(g.t)
        if np.any(t < 0) or np.any(t >= num_train_timesteps):
            raise ValueError(f"guidance: transition timestep t={g.t} outside [0, {num_train_timesteps})")
    if g.rule == "dynamic" and not isinstance(g.signal, D.Detector) and steps < 3:
        raise ValueError(f"guidance: a dynamic transition needs at least 3 steps, got {steps}")
    if g.rule == "per_step" and np.shape(g.before)[-1] != steps:
        raise ValueError(f"guidance: per-step scales have length {np.shape(g.before)[-1]} but the scheduler runs "
                         f"{steps} steps")
    for name in ("before", "after"):
        value = getattr(g, name)
        if not _traced(value) and not np.all(np.isfinite(np.asarray(value, np.float64))):
            raise ValueError(f"guidance: {name} must be finite, got {value}")
    if g.gate is not None and g.gate.steps >= steps:
        raise ValueError(f"guidance: the gate's score needs steps < the {steps} sampling steps, got steps={g.gate.steps}")


def plan_batch(g: Guidance, batch: int, timesteps: Timesteps, num_train_timesteps: int = 1000) -> Plan:
    """The plan of one schedule for ``batch`` samples (per-sample array fields must have length B)."""
    if not isinstance(g, Guidance):
        raise ValueError(f"guidance: expected a cfgbasin_jax.method.guidance.Guidance, got {type(g).__name__}")
    steps = int(np.shape(timesteps)[0])
    check_steps(g, steps, num_train_timesteps)
    xp = jnp if _traced(g.before, g.after, g.t, timesteps) or isinstance(g.before, jax.Array) else np
    ts = xp.asarray(timesteps)[None, :]
    if g.rule == "per_step":
        rows = xp.asarray(g.before, xp.float32)
        if rows.ndim == 2 and rows.shape[0] != batch:
            raise ValueError(f"guidance: {rows.shape[0]} rows of per-step scales for {batch} prompts")
        before = after = xp.broadcast_to(rows, (batch, steps))
    else:
        before = shaped_scale(g.shape_before, _per_sample("before", g.before, batch, xp), ts, num_train_timesteps)
        after = shaped_scale(g.shape_after, _per_sample("after", g.after, batch, xp), ts, num_train_timesteps)
    if g.rule == "static" and np.ndim(g.t) == 1 and np.shape(g.t)[0] != batch:
        raise ValueError(f"guidance: {np.shape(g.t)[0]} per-sample values of t for {batch} prompts")
    for name in ("threshold", "pre_scale"):
        value = None if g.gate is None else getattr(g.gate, name)
        if np.ndim(value) == 1 and np.shape(value)[0] != batch:
            raise ValueError(f"guidance: {np.shape(value)[0]} per-sample values of the gate's {name} for {batch} prompts")
    detector = g.make_detector(timesteps, batch)
    return Plan(before=before.astype(xp.float32), after=after.astype(xp.float32), detector=detector)


def plan(guidance: Guidance | Sequence[Guidance], batch: int, timesteps: Timesteps,
         num_train_timesteps: int = 1000) -> Plan:
    """Per-sample plans. ``guidance`` is one schedule for all B samples, or one per sample (length
    B; all with the same detector structure). Works on concrete values and inside ``jax.jit``."""
    if isinstance(guidance, Guidance):
        return plan_batch(guidance, batch, timesteps, num_train_timesteps)
    if isinstance(guidance, (str, bytes)) or not isinstance(guidance, Sequence):
        raise ValueError(f"guidance: expected a Guidance (e.g. guidance.constant(7.5)) or a list of one per prompt, "
                         f"got {type(guidance).__name__} {guidance!r}")
    items = list(guidance)
    if len(items) != batch:
        raise ValueError(f"guidance: got {len(items)} schedules for {batch} prompts")
    rows = [plan_batch(g, 1, timesteps, num_train_timesteps) for g in items]
    xp = jnp if any(isinstance(r.before, jax.Array) for r in rows) else np
    return Plan(
        before=xp.concatenate([r.before for r in rows]),
        after=xp.concatenate([r.after for r in rows]),
        detector=D.concatenate([r.detector for r in rows]),
    )


def latent_cosine_transition_index(c) -> int:
    """The official OG rule over one recorded trajectory ``c`` [S] (see
    :func:`cfgbasin_jax.method.detectors.first_minimum_index`)."""
    return int(D.first_minimum_index(np.asarray(c))[0])
