"""The reference implementations, restated in plain Python/PyTorch for the tests.

- the official scripts' transition rules (host-side, one trajectory at a time);
- a PyTorch sampling loop with the official scripts' structure (batch 1 or B, host decisions each step)
  on the PyTorch copy of the weights.
"""

from __future__ import annotations

import numpy as np
import torch

PT_SCHEDULERS = {
    "dpm++2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


def official_dtp_index(d):
    """Official DTP script: prev values start at -1; the transition is the first step j with
    d[j] > d[j-1] and d[j-2] > d[j-1]; None if there is none."""
    prev2, prev1 = -1.0, -1.0
    for j, value in enumerate(d):
        if value > prev1 and prev2 > prev1:
            return j
        prev2, prev1 = prev1, value
    return None


def official_og_index(c):
    """Official opposite-guidance script: the first strict local minimum of c; the second if the
    first is at index 1 and a second exists; 5 if there is none."""
    minima = [k for k in range(1, len(c) - 1) if c[k] < c[k - 1] and c[k] < c[k + 1]]
    if not minima:
        return 5
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


def pt_scheduler(name: str, scheduler_config: dict):
    """The diffusers PyTorch scheduler a user gets with ``Target.from_config(pipe.scheduler.config)``."""
    import diffusers

    source = getattr(diffusers, scheduler_config.get("_class_name", "PNDMScheduler"))
    return getattr(diffusers, PT_SCHEDULERS[name]).from_config(source.from_config(scheduler_config).config)


@torch.no_grad()
def pt_embed(text_encoder, tokenizer, prompts):
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def pt_guided_loop(unet, scheduler, noise, cond, uncond, steps, scale_rule, cond_at=None):
    """Official-structure loop. ``scale_rule(j, t, d_history) -> (scale, stop_signal)``.

    noise [B,C,h,w] (before init_noise_sigma). ``cond_at(j, t) -> cond`` replaces the conditional
    embedding at step j (e.g. CADS); the unconditional one never changes.
    Returns (final latents, per-step d [S,B], scales [S,B]).
    """
    scheduler.set_timesteps(steps)
    x = torch.as_tensor(np.asarray(noise)) * scheduler.init_noise_sigma
    ds, scales = [], []
    for j, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        cond_j = cond if cond_at is None else cond_at(j, int(t))
        eps = unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond_j])).sample
        eu, ec = eps.chunk(2)
        d = torch.linalg.vector_norm((ec - eu).reshape(x.shape[0], -1), dim=-1).numpy()
        ds.append(d)
        s = np.array(scale_rule(j, int(t), np.asarray(ds)), np.float32).reshape(-1)
        s = np.broadcast_to(s, (x.shape[0],)).copy()
        scales.append(s)
        guided = eu + torch.as_tensor(s).reshape(-1, 1, 1, 1) * (ec - eu)
        x = scheduler.step(guided, t, x).prev_sample
    return x.numpy(), np.stack(ds), np.stack(scales)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
