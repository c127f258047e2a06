"""The reference implementations, restated in plain Python/PyTorch for the tests AND the benchmark
(``bench/`` imports this module; nothing here calls the library's own detector code).

- the official scripts' transition rules (host-side, one trajectory at a time);
- one sampling loop with the official scripts' structure (both UNet halves every step, the scale
  decided on the host every step): :func:`official_pass` / :func:`official_trajectory`, over a
  backend: :class:`TorchBackend` (PyTorch UNet and diffusers scheduler) or :class:`FlaxBackend`
  (our converted model through its public ``unet_fn``, one jitted call per step).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

PT_SCHEDULERS = {
    "dpm++2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
OFFICIAL_OG_FALLBACK = 5  # the official opposite-guidance script's index when c has no minimum


# ------------------------------------------------------------------------------------- the rules


def official_dtp_index(d):
    """Official DTP script: prev values start at -1; the transition is the first step j with
    d[j] > d[j-1] and d[j-2] > d[j-1]; None if there is none."""
    prev2, prev1 = -1.0, -1.0
    for j, value in enumerate(d):
        if value > prev1 and prev2 > prev1:
            return j
        prev2, prev1 = prev1, value
    return None


def official_dtp_switch(d_history) -> bool:
    """The official DTP rule at the newest step of ``d_history``: switch now?"""
    return official_dtp_index(d_history) == len(d_history) - 1


def official_og_index(c):
    """Official opposite-guidance script: the first strict local minimum of c; the second if the
    first is at index 1 and a second exists; 5 if there is none."""
    minima = [k for k in range(1, len(c) - 1) if c[k] < c[k - 1] and c[k] < c[k + 1]]
    if not minima:
        return OFFICIAL_OG_FALLBACK
    if minima[0] == 1 and len(minima) >= 2:
        return minima[1]
    return minima[0]


def causal_og_index(c, fallback=None):
    """The documented causal approximation: a minimum at k >= 2 is confirmed after step k+1 and
    switches guidance from step k+2 on; a minimum at 1 is passed over; a sample still undecided
    at step ``fallback`` switches there. None if it never switches within the trajectory."""
    candidates = [k + 2 for k in range(2, len(c) - 1) if c[k] < c[k - 1] and c[k] < c[k + 1]][:1]
    if fallback is not None:
        candidates.append(fallback)
    index = min(candidates, default=None)
    return index if index is not None and index < len(c) else None


def cosine_distance_f64(a, b) -> np.ndarray:
    """[B,...] x [B,...] -> [B]: 1 - a.b / (|a||b|) per sample, in float64."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return 1 - np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ------------------------------------------------------------------------- the official loop


def official_pass(backend, ctx, x, steps: int, scale_at: Callable) -> tuple:
    """One official-structure pass over B samples: both halves every step, then
    ``scale_at(j, t, d_history [j+1, B]) -> scale (number or [B])`` on the host, then the step.
    ``ctx`` is the [uncond; cond] embedding, or ``ctx(j, t)`` giving it per step.
    Returns (final latents, d [S,B], c [S,B], scales [S,B], UNet evaluations)."""
    timesteps = backend.timesteps(steps)
    state = backend.init_state(x)
    ds, cs, scales = [], [], []
    for j, t in enumerate(timesteps):
        eu, ec = backend.eps_pair(state, x, j, t, ctx(j, int(t)) if callable(ctx) else ctx)
        ds.append(backend.diff_norm(eu, ec))  # host sync, every step
        s = np.broadcast_to(np.asarray(scale_at(j, t, np.asarray(ds)), np.float32), ds[-1].shape).copy()
        scales.append(s)
        x_next, state = backend.step(state, eu, ec, s, j, t, x)
        cs.append(backend.cosine(x_next, x))
        x = x_next
    n = len(ds[0])
    return x, np.stack(ds), np.stack(cs), np.stack(scales), 2 * n * len(ds)


def official_trajectory(backend, ctx, x0, steps: int, rule: str, before: float, after: float, t_switch=None) -> tuple:
    """The official scripts' rules on one batch: rule "constant" (``after`` throughout), "static"
    (``before`` while t > t_switch), "noise_diff" (DTP, decided every step) or "latent_cosine"
    (opposite guidance: a recording pass, then the replay at the official index; one sample).
    Returns (final latents, UNet evaluations, d [S,B], c [S,B] (recorded pass), index or None)."""
    if rule == "constant":
        x, d, c, _, evals = official_pass(backend, ctx, x0, steps, lambda j, t, d: after)
        return x, evals, d, c, None
    if rule == "static":
        x, d, c, _, evals = official_pass(backend, ctx, x0, steps, lambda j, t, d: before if t > t_switch else after)
        return x, evals, d, c, None
    if rule == "noise_diff":
        switched = []

        def dtp_scale(j, t, d):
            if not switched and official_dtp_switch(d[:, 0]):
                switched.append(j)
            return after if switched else before

        x, d, c, _, evals = official_pass(backend, ctx, x0, steps, dtp_scale)
        return x, evals, d, c, (switched[0] if switched else None)
    if rule == "latent_cosine":
        _, _, c, _, first = official_pass(backend, ctx, x0, steps, lambda j, t, d: before)
        index = official_og_index(c[:, 0])
        x, d, _, _, second = official_pass(backend, ctx, x0, steps, lambda j, t, d: after if j >= index else before)
        return x, first + second, d, c, index
    raise ValueError(f"unknown rule {rule!r}")


class TorchBackend:
    """PyTorch UNet and a diffusers PyTorch scheduler; ctx = [uncond; cond] embeddings [2B,L,D]."""

    def __init__(self, unet, scheduler):
        import torch

        self.torch, self.unet, self.sched = torch, unet, scheduler

    def timesteps(self, steps):
        self.sched.set_timesteps(steps)
        return [int(t) if not self.torch.is_floating_point(t) else float(t) for t in self.sched.timesteps]

    def init_state(self, x):
        return None

    def eps_pair(self, state, x, j, t, ctx):
        inp = self.sched.scale_model_input(self.torch.cat([x, x]), t)
        return self.unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)

    def diff_norm(self, eu, ec):
        return self.torch.linalg.vector_norm((ec - eu).reshape(eu.shape[0], -1), dim=-1).cpu().numpy()

    def step(self, state, eu, ec, s, j, t, x):
        s = self.torch.as_tensor(s, device=eu.device).reshape(-1, *([1] * (eu.ndim - 1)))
        return self.sched.step(eu + s * (ec - eu), t, x).prev_sample, None

    def cosine(self, a, b):
        return cosine_distance_f64(a.cpu().numpy(), b.cpu().numpy())


class FlaxBackend:
    """Our converted model (``pipe.unet_fn``, public) and our JAX scheduler ``name``, one jitted
    UNet call per step, results pulled to the host each step; ctx = [uncond; cond] [2B,L,D]."""

    def __init__(self, pipe, scheduler: str = "ddim"):
        import jax
        import jax.numpy as jnp

        self.jnp, self.pipe, self.name, self.sched = jnp, pipe, scheduler, None
        self.unet = jax.jit(lambda p, x, t, c: pipe.unet_fn(p, jnp.concatenate([x, x]), jnp.full((2 * x.shape[0],), t), c))
        self.scale_in = jax.jit(lambda sched, st, x, j: sched.scale_model_input(st, x, j))
        self._step = jax.jit(lambda sched, st, eps, j, x: sched.step(st, eps, j, x))

    def timesteps(self, steps):
        self.sched = self.pipe.make_scheduler(self.name, steps)
        return [t.item() for t in np.asarray(self.sched.timesteps)]

    def init_state(self, x):
        return self.sched.init_state(x)

    def eps_pair(self, state, x, j, t, ctx):
        eps = self.unet(self.pipe.params["unet"], self.scale_in(self.sched, state, x, j), t, ctx)
        b = x.shape[0]
        return eps[:b].astype(self.jnp.float32), eps[b:].astype(self.jnp.float32)

    def diff_norm(self, eu, ec):
        return np.linalg.norm(np.asarray(ec - eu, np.float32).reshape(eu.shape[0], -1), axis=-1)

    def step(self, state, eu, ec, s, j, t, x):
        s = self.jnp.asarray(s).reshape((-1,) + (1,) * (eu.ndim - 1))
        return self._step(self.sched, state, eu + s * (ec - eu), j, x)

    def cosine(self, a, b):
        return cosine_distance_f64(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------- PyTorch helpers


def pt_scheduler(name: str, scheduler_config: dict):
    """The diffusers PyTorch scheduler a user gets with ``Target.from_config(pipe.scheduler.config)``."""
    import diffusers

    source = getattr(diffusers, scheduler_config.get("_class_name", "PNDMScheduler"))
    return getattr(diffusers, PT_SCHEDULERS[name]).from_config(source.from_config(scheduler_config).config)


def pt_embed(text_encoder, tokenizer, prompts):
    import torch

    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def pt_guided_loop(unet, scheduler, noise, cond, uncond, steps, scale_rule, cond_at=None):
    """The official-structure loop in PyTorch. ``scale_rule(j, t, d_history) -> scale``.

    noise [B,C,h,w] (before init_noise_sigma). ``cond_at(j, t) -> cond`` replaces the conditional
    embedding at step j (e.g. CADS); the unconditional one never changes.
    Returns (final latents, per-step d [S,B], scales [S,B]).
    """
    import torch

    backend = TorchBackend(unet, scheduler)
    backend.timesteps(steps)
    x = torch.as_tensor(np.asarray(noise)) * scheduler.init_noise_sigma
    ctx = torch.cat([uncond, cond]) if cond_at is None else (lambda j, t: torch.cat([uncond, cond_at(j, t)]))
    with torch.no_grad():
        x, d, _, scales, _ = official_pass(backend, ctx, x, steps, scale_rule)
    return x.numpy(), d, scales


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
