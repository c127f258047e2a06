"""Guidance schedules and transition detectors: the method of Jain et al. (CVPR 2025) in two pieces.

1. **Schedules** are pure data: a :class:`Guidance` says which classifier-free-guidance scale applies
   *before* the transition point and which *after* it, each optionally shaped over the timestep
   (the official ``--CFG_scheduling`` shapes). :func:`plan` turns it into per-step scale arrays.
2. **Detectors** decide *when* the transition happens. For static rules the switch step is known in
   advance (``switch_index``); for the dynamic rules it is found during sampling by a small pure state
   machine (:class:`DetectorState`, :func:`noise_diff_update`, :func:`latent_cosine_update`) that rides
   in the sampler's ``lax.scan`` carry, one state per sample.

Everything numeric here is traced data in the compiled sampler: sweeping ``t``, ``before`` or
``after`` never recompiles. Only the detector *kind* (:attr:`Plan.detector`) is static.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

SHAPES = ("static", "linear", "invlinear", "cosine", "sine", "v_shape", "a_shape")
SIGNALS = ("noise_diff", "latent_cosine")
MODES = ("exact", "causal")
# How the latent-cosine signal is computed (see cfgbasin_jax.sampler.cosine_distance):
#   "stable"    0.5 ||a/|a| - b/|b|||^2 in float32, smooth where consecutive latents are nearly parallel
#   "official"  the official script's float32 1 - torch.nn.functional.cosine_similarity, bit for bit
#               (cfgbasin_jax.official_cosine), with its 2^-24 steps and ties near convergence
PRECISIONS = ("stable", "official")

# Detector kinds, static in the compiled sampler:
#   "fixed"          the switch step per sample is given (constant CFG, static transition, replay)
#   "noise_diff"     DTP: first strict local minimum of ||eps_c - eps_u||, found inside the loop
#   "latent_cosine"  OG+DTP causal: first strict local minimum (index >= 2) of the latents' cosine
#                    distance, switched on the step after it is confirmed
DETECTORS = ("fixed", "noise_diff", "latent_cosine")

# The official opposite-guidance script falls back to this index when c has no local minimum.
LATENT_COSINE_FALLBACK_INDEX = 5


@dataclasses.dataclass(frozen=True)
class Guidance:
    """A guidance schedule. Build it with :func:`constant`, :func:`static_transition`,
    :func:`dynamic_transition` or :func:`per_step`; the fields are its plain description.

    Attributes:
      before, after: scales before / from the transition on (floats), or for ``rule="per_step"`` a
        float array [S] applied at every step (``before is after``).
      shape_before, shape_after: CFG shape names (see :func:`shaped_scale`).
      rule: "constant" | "static" | "dynamic" | "per_step".
      t: static rule: ``before`` applies while the step's timestep is ``> t``, ``after`` while ``<= t``.
      signal, mode: dynamic rule: "noise_diff" | "latent_cosine", and "exact" | "causal".
      fallback: causal latent-cosine rule: switch at this step if no minimum is confirmed by then.
      precision: latent-cosine rule: how the signal is computed (one of :data:`PRECISIONS`).
    """

    before: float | np.ndarray
    after: float | np.ndarray
    shape_before: str = "static"
    shape_after: str = "static"
    rule: str = "constant"
    t: int | None = None
    signal: str | None = None
    mode: str | None = None
    fallback: int | None = None
    precision: str | None = None

    @property
    def detector(self) -> str:
        """Static detector kind used in the compiled loop (see :data:`DETECTORS`)."""
        if self.signal == "noise_diff":
            return "noise_diff"
        if self.signal == "latent_cosine" and self.mode == "causal":
            return "latent_cosine"
        return "fixed"

    @property
    def two_pass(self) -> bool:
        """True for the exact latent-cosine rule (record pass, then replay pass)."""
        return self.rule == "dynamic" and self.signal == "latent_cosine" and self.mode == "exact"

    def describe(self) -> dict:
        """JSON-friendly description (for run metadata)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        for k in ("before", "after"):
            if isinstance(out.get(k), np.ndarray):
                out[k] = out[k].tolist()
        return out


def finite_number(owner: str, name: str, value) -> float:
    """``float(value)``, or one ValueError ``"{owner}: {name} must be ..."`` if it is not a finite number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return value


def _finite_scale(name: str, value) -> float:
    return finite_number("guidance", name, value)


def _check_shape(name: str, shape: str) -> str:
    if shape not in SHAPES:
        raise ValueError(f"guidance: unknown {name} {shape!r}; expected one of {', '.join(SHAPES)}")
    return shape


def constant(scale: float) -> Guidance:
    """Ordinary classifier-free guidance with one scale at every step."""
    s = _finite_scale("scale", scale)
    return Guidance(before=s, after=s, rule="constant")


def static_transition(
    t: int,
    before: float,
    after: float,
    shape_before: str = "static",
    shape_after: str = "static",
) -> Guidance:
    """Static transition point (STP): ``before`` while the step's timestep > t, ``after`` at <= t.

    Opposite guidance + STP is the same call with a negative ``before`` (paper: -2.0 above t=650,
    7.5 after). Mirrors the official script's ``--guidance_change_step``, ``--guidance_scale``,
    ``--guidance_scale_later``, ``--CFG_scheduling`` and ``--CFG_scheduling_later``.
    """
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise ValueError(f"guidance: transition timestep t must be an integer, got {t!r}")
    return Guidance(
        before=_finite_scale("before", before),
        after=_finite_scale("after", after),
        shape_before=_check_shape("shape_before", shape_before),
        shape_after=_check_shape("shape_after", shape_after),
        rule="static",
        t=int(t),
    )


def dynamic_transition(
    before: float = 1.0,
    after: float = 7.5,
    signal: str = "noise_diff",
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
      precision="stable" (default) computes c as ``0.5 ||x_{j+1}/|x_{j+1}| - x_j/|x_j|||^2``, which
      keeps float32 precision when consecutive latents are nearly parallel; precision="official"
      computes it as the official script does (float32 ``1 - torch cosine_similarity``, whose values
      near convergence are small multiples of 2^-24 with ties), so the official rule sees the
      official script's ties and spurious minima.
    """
    if fallback == "official":
        causal = signal == "latent_cosine" and mode == "causal"
        fallback = LATENT_COSINE_FALLBACK_INDEX if causal else None
    if fallback is not None and (isinstance(fallback, bool) or not isinstance(fallback, (int, np.integer)) or fallback < 0):
        raise ValueError(f"guidance: fallback must be a non-negative step index or None, got {fallback!r}")
    if fallback is not None and not (signal == "latent_cosine" and mode == "causal"):
        raise ValueError("guidance: fallback applies only to signal='latent_cosine', mode='causal'")
    if signal not in SIGNALS:
        raise ValueError(f"guidance: unknown signal {signal!r}; expected one of {', '.join(SIGNALS)}")
    if mode not in MODES:
        raise ValueError(f"guidance: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"guidance: unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision != "stable" and signal != "latent_cosine":
        raise ValueError("guidance: precision applies only to signal='latent_cosine'")
    return Guidance(
        before=_finite_scale("before", before),
        after=_finite_scale("after", after),
        shape_before=_check_shape("shape_before", shape_before),
        shape_after=_check_shape("shape_after", shape_after),
        rule="dynamic",
        signal=signal,
        mode=mode if signal == "latent_cosine" else None,
        fallback=None if fallback is None else int(fallback),
        precision=precision if signal == "latent_cosine" else None,
    )


def per_step(scales: Sequence[float] | np.ndarray) -> Guidance:
    """A user-supplied scale for every step (float array [S], S = the scheduler's step count)."""
    arr = np.asarray(scales, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"guidance: per-step scales must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("guidance: per-step scales must all be finite")
    return Guidance(before=arr, after=arr, rule="per_step")


def shaped_scale(shape: str, scale, t, num_train_timesteps: int = 1000):
    """The official CFG shapes: the scale applied at timestep ``t`` (numpy or jnp, broadcasts).

    static g; linear g(1 - t/T); invlinear g t/T; cosine g(cos(pi t/T) + 1);
    sine g(sin(pi t/T - pi/2) + 1); v_shape linear for t > T/2 and invlinear at or below;
    a_shape the reverse. T = num_train_timesteps (1000 for SD).
    """
    xp = jnp if isinstance(t, jnp.ndarray) else np
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


class Plan(NamedTuple):
    """Per-sample, per-step guidance data for the sampler (all numpy, traced when passed in).

    before, after: float32 [B, S] scales before / from the transition on.
    switch_index: int32 [B] first step of ``after`` for the "fixed" detector (S = never; also
      for constant and per-step schedules, where before == after); for the causal latent-cosine
      detector, the fallback step (S = never).
    detector: static detector kind (one of :data:`DETECTORS`), the same for the whole batch.
    two_pass: the exact latent-cosine rule (record pass, then replay with the found index).
    precision: how the sampler computes the latent-cosine signal (one of :data:`PRECISIONS`).
    """

    before: np.ndarray
    after: np.ndarray
    switch_index: np.ndarray
    detector: str
    two_pass: bool = False
    precision: str = "stable"


def _static_switch_index(timesteps: np.ndarray, t: int) -> int:
    """First step whose timestep is <= t (len(timesteps) if none)."""
    below = np.nonzero(np.asarray(timesteps) <= t)[0]
    return int(below[0]) if below.size else len(timesteps)


def plan_one(g: Guidance, timesteps: np.ndarray, num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One sample's (before [S], after [S], switch_index) for the given scheduler timesteps [S]."""
    timesteps = np.asarray(timesteps)
    steps = len(timesteps)
    if g.rule == "per_step":
        if g.before.shape != (steps,):
            raise ValueError(
                f"guidance: per-step scales have length {g.before.shape[0]} but the scheduler runs "
                f"{steps} steps"
            )
        arr = g.before.astype(np.float32)
        return arr, arr, steps
    if g.rule == "static" and not 0 <= g.t < num_train_timesteps:
        raise ValueError(f"guidance: transition timestep t={g.t} outside [0, {num_train_timesteps})")
    if g.rule == "dynamic" and steps < 3:
        raise ValueError(f"guidance: a dynamic transition needs at least 3 steps, got {steps}")
    for name in ("before", "after"):
        _finite_scale(name, getattr(g, name))
    before = shaped_scale(g.shape_before, g.before, timesteps, num_train_timesteps).astype(np.float32)
    after = shaped_scale(g.shape_after, g.after, timesteps, num_train_timesteps).astype(np.float32)
    if g.rule == "static":
        switch = _static_switch_index(timesteps, g.t)
    else:
        switch = min(g.fallback, steps) if g.fallback is not None else steps
    return before, after, switch


def plan(guidance: Guidance | Sequence[Guidance], batch: int, timesteps: np.ndarray, num_train_timesteps: int = 1000) -> Plan:
    """Stack per-sample plans. ``guidance`` is one schedule for all, or one per sample (length B);
    all must share the detector kind."""
    items = [guidance] * batch if isinstance(guidance, Guidance) else list(guidance)
    if len(items) != batch:
        raise ValueError(f"guidance: got {len(items)} schedules for {batch} prompts")
    for g in items:
        if not isinstance(g, Guidance):
            raise ValueError(f"guidance: expected a cfgbasin_jax.guidance.Guidance, got {type(g).__name__}")
    kinds = {(g.detector, g.two_pass) for g in items}
    if len(kinds) > 1:
        raise ValueError(f"guidance: one batch cannot mix detector kinds {sorted(kinds)}")
    precisions = {g.precision or "stable" for g in items}
    if len(precisions) > 1:
        raise ValueError(f"guidance: one batch cannot mix latent-cosine precisions {sorted(precisions)}")
    rows = [plan_one(g, timesteps, num_train_timesteps) for g in items]
    return Plan(
        before=np.stack([r[0] for r in rows]),
        after=np.stack([r[1] for r in rows]),
        switch_index=np.asarray([r[2] for r in rows], dtype=np.int32),
        detector=items[0].detector,
        two_pass=items[0].two_pass,
        precision=precisions.pop(),
    )


# ----------------------------------------------------------------------------------------------
# Transition detectors: pure state machines, one state per sample, carried through lax.scan.


class DetectorState(NamedTuple):
    """prev1, prev2: float32 [B], the signal one and two steps back (-1 before the first steps).
    index: int32 [B], the transition step (-1 while none). fallback: int32 [B], the step at which
    a still-undecided sample switches anyway (>= S: never)."""

    prev1: jnp.ndarray
    prev2: jnp.ndarray
    index: jnp.ndarray
    fallback: jnp.ndarray


def detector_init(index, fallback) -> DetectorState:
    """Initial state from int [B] arrays: ``index`` the known switch step (fixed detector) or -1
    (dynamic detectors); ``fallback`` the forced switch step (>= S: never)."""
    index = jnp.asarray(index, jnp.int32)
    minus_one = -jnp.ones(index.shape, jnp.float32)
    return DetectorState(prev1=minus_one, prev2=minus_one, index=index, fallback=jnp.asarray(fallback, jnp.int32))


def switched(state: DetectorState, step) -> jnp.ndarray:
    """bool [B]: does ``after`` apply at ``step`` (given what is known before this step's signal)?"""
    decided = (state.index >= 0) & (step >= state.index)
    return decided | ((state.index < 0) & (step >= state.fallback))


def _strict_min_behind(state: DetectorState, value) -> jnp.ndarray:
    """bool [B]: the previous value is a strict local minimum given the newest ``value``."""
    return (value > state.prev1) & (state.prev2 > state.prev1)


def _shift(state: DetectorState, value, index) -> DetectorState:
    return DetectorState(prev1=value, prev2=state.prev1, index=index, fallback=state.fallback)


def noise_diff_update(state: DetectorState, d, step) -> DetectorState:
    """DTP rule at step j with ``d`` = ||eps_c - eps_u|| [B]: latch j as the transition where
    d_{j-1} is the first strict local minimum. Steps 0 and 1 never qualify (prev = -1)."""
    new = (state.index < 0) & _strict_min_behind(state, d)
    return _shift(state, d, jnp.where(new, step, state.index))


def latent_cosine_update(state: DetectorState, c, step) -> DetectorState:
    """Causal OG+DTP rule after step j with ``c`` = 1 - cos(x_{j+1}, x_j) [B]: a strict local
    minimum at index j-1 >= 2 is confirmed now, so ``after`` applies from step j+1 on; a sample
    still undecided when its fallback step is reached latches the fallback."""
    undecided = state.index < 0
    index = jnp.where(undecided & (step >= state.fallback), state.fallback, state.index)
    new = (index < 0) & _strict_min_behind(state, c) & (step - 1 >= 2)
    return _shift(state, c, jnp.where(new, step + 1, index))


def latent_cosine_transition_index(c: np.ndarray) -> int:
    """The official OG rule over a whole recorded trajectory ``c`` [S] (host-side, numpy):
    first strict local minimum; the second if the first is at index 1 and a second exists;
    :data:`LATENT_COSINE_FALLBACK_INDEX` if there is none."""
    c = np.asarray(c, dtype=np.float64)
    minima = [k for k in range(1, len(c) - 1) if c[k - 1] > c[k] < c[k + 1]]
    if not minima:
        return LATENT_COSINE_FALLBACK_INDEX
    if minima[0] == 1 and len(minima) > 1:
        return minima[1]
    return minima[0]
