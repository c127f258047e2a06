"""A sweep of the STP transition point: ``sampler.sweep`` (points folded into the batch) against
``jax.vmap`` over ``sampler.sample_loop`` (one vmapped axis of points), same model, same inputs.

    python -m bench.sweep                 # tiny sd1 model, 8 points x batch 2, 20 DDIM steps
    python -m bench.sweep --points 4 --batch 4 --steps 10 --repeats 5

Under vmap the per-step branch index is batched, so ``lax.switch`` becomes a select that runs every
branch (both halves plus each single half) at every step; folding keeps one traced branch choice for
the whole batch. Prints the median of interleaved per-round time ratios (vmap / sweep) and checks
that both give the same latents.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from bench import measure
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import sampler as S
from cfgbasin_jax.pipeline import Pipeline, initial_noise
from cfgbasin_jax.models.tiny import random_components


def build(points: int, batch: int, steps: int):
    """(sweep fn, vmap fn, args of each) for an STP sweep of ``points`` transition timesteps."""
    pipe = Pipeline(random_components("sd1"))
    sched = pipe.make_scheduler("ddim", steps)
    x0 = initial_noise(0, range(batch), pipe.latent_shape()) * sched.init_noise_sigma
    cond = pipe.encode_prompts([f"prompt {i}" for i in range(batch)])
    uncond = pipe.encode_prompts([""] * batch)
    ts = np.linspace(100, 900, points).astype(int)
    plans = [G.plan(G.static_transition(int(t), 0.0, G.CFG_SCALE), batch, np.asarray(sched.timesteps)) for t in ts]
    params = pipe.params["unet"]

    swept = jax.jit(functools.partial(S.sweep, unet_fn=pipe.unet_fn))

    @jax.jit
    def vmapped(params, sched, x0, cond, uncond, before, after, detector):
        one = lambda b, a, d: S.sample_loop(params, sched, x0, cond, uncond, b, a, d, unet_fn=pipe.unet_fn)  # noqa: E731
        return jax.vmap(one)(before, after, detector)

    stacked = (jnp.stack([jnp.asarray(p.before) for p in plans]), jnp.stack([jnp.asarray(p.after) for p in plans]),
               jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *[p.detector for p in plans]))
    return (lambda: swept(params, sched, x0, cond, uncond, plans),
            lambda: vmapped(params, sched, x0, cond, uncond, *stacked))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    sweep_fn, vmap_fn = build(args.points, args.batch, args.steps)
    a, b = sweep_fn(), vmap_fn()  # compile
    err = float(jnp.max(jnp.abs(a.latents - b.latents)) / jnp.max(jnp.abs(b.latents)))
    times = measure.interleaved({"sweep": sweep_fn, "vmap": vmap_fn}, args.repeats)
    ratio = measure.median_ratio(times["vmap"], times["sweep"])
    out = {"points": args.points, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
           "sweep_s": float(np.median(times["sweep"])), "vmap_s": float(np.median(times["vmap"])),
           "vmap_over_sweep": ratio, "max_rel_latent_diff": err,
           "unet_evals_sweep": int(np.sum(a.unet_evals)), "machine": measure.machine_line(measure.machine())}
    print(f"STP sweep, tiny sd1 model, {args.points} points x batch {args.batch}, {args.steps} DDIM steps: "
          f"sweep {out['sweep_s']:.2f} s, vmap {out['vmap_s']:.2f} s, vmap / sweep = {ratio:.2f}x "
          f"(same latents within {err:.1e})")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
