"""Sweeps: ``sampler.sweep`` against ``jax.vmap``, a Python loop over one compiled function and one flat
batch, in UNet evaluations and wall time (ratios against the loop, the anchor, in the same run).

    python -m bench.sweep                     # tiny sd1 model, 8 points x batch 2, 10 DDIM steps
    python -m bench.sweep --points 4 --batch 4 --steps 20 --repeats 5 --kinds t

Two sweeps: over the STP transition timestep ``t`` (points disagree on which UNet half to run at
the steps between their transitions) and over the guidance scale after a fixed ``t`` (every point
runs the same halves). Runners, each compiled once before timing:

* loop: ``jax.jit(sampler.sample)`` for batch B, called once per point from Python (the anchor).
* sweep: ``sampler.sweep`` (default ``group="halves"``), the plans compiled in as constants: points
  whose halves agree at every step share a batch, the others run one after another in a ``lax.map``,
  all in one compiled call.
* flat batch: ``sampler.sweep(group="all")``: all P*B samples in one batch; a half is skipped only
  where every point agrees.
* vmap: ``jax.vmap`` over ``sampler.sample_loop``; the batched branch index turns ``lax.switch`` into
  a select that runs every branch (both halves and each single half: 4 rows per sample and step).

UNet evaluations per sample and point come from the traces (the rows the chosen branches run); for
vmap they are the 4 rows of every step. Wall time: median of interleaved rounds.
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
from cfgbasin_jax.models.tiny import random_components
from cfgbasin_jax.pipeline import Pipeline, initial_noise

RUNNERS = ("loop", "sweep", "flat batch", "vmap")
VMAP_ROWS_PER_STEP = 4  # the select runs BOTH (2 rows), UNCOND_ONLY (1) and COND_ONLY (1)


def schedules(kind: str, points: int) -> list:
    """The sweep's points: STP over t ("t") or over the scale after t = 500 ("scale")."""
    if kind == "t":
        return [G.static_transition(int(t), 0.0, G.CFG_SCALE) for t in np.linspace(100, 900, points).astype(int)]
    return [G.static_transition(500, 0.0, float(a)) for a in np.linspace(2.0, 9.0, points)]


def build(pipe: Pipeline, kind: str, points: int, batch: int, steps: int) -> dict:
    """{runner: (fn() -> traces, unet evaluations per sample and point)} for one sweep."""
    sched = pipe.make_scheduler("ddim", steps)
    x0 = initial_noise(0, range(batch), pipe.latent_shape()) * sched.init_noise_sigma
    cond = pipe.encode_prompts([f"prompt {i}" for i in range(batch)])
    uncond = pipe.encode_prompts([""] * batch)
    plans = [G.plan(g, batch, np.asarray(sched.timesteps)) for g in schedules(kind, points)]
    params = pipe.params["unet"]

    one = jax.jit(functools.partial(S.sample, unet_fn=pipe.unet_fn))

    def swept(group: str):
        """sweep compiled with the plans as constants: concrete, so "halves" can group the points (plans
        passed to jit as arguments are traced, and "halves" then runs one point at a time)."""
        return jax.jit(lambda params, sched, x0, cond, uncond: S.sweep(params, sched, x0, cond, uncond, plans,
                                                                       group=group, unet_fn=pipe.unet_fn))

    by_halves, flat = swept("halves"), swept("all")

    @jax.jit
    def vmapped(params, sched, x0, cond, uncond, before, after, detector):
        loop = lambda b, a, d: S.sample_loop(params, sched, x0, cond, uncond, b, a, d, unet_fn=pipe.unet_fn)  # noqa: E731
        return jax.vmap(loop)(before, after, detector)

    stacked = (jnp.stack([jnp.asarray(p.before) for p in plans]), jnp.stack([jnp.asarray(p.after) for p in plans]),
               jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *[p.detector for p in plans]))
    fns = {
        "loop": lambda: [one(params, sched, x0, cond, uncond, p.before, p.after, p.detector) for p in plans],
        "sweep": lambda: by_halves(params, sched, x0, cond, uncond),
        "flat batch": lambda: flat(params, sched, x0, cond, uncond),
        "vmap": lambda: vmapped(params, sched, x0, cond, uncond, *stacked),
    }
    out = {}
    for name, fn in fns.items():
        traces = fn()  # compile, and count
        evals = (VMAP_ROWS_PER_STEP * steps if name == "vmap" else
                 float(np.mean([np.asarray(t.unet_evals) for t in (traces if name == "loop" else [traces])])))
        out[name] = (fn, float(evals), _latents(traces))
    return out


def _latents(traces) -> np.ndarray:
    return np.stack([np.asarray(t.latents) for t in traces]) if isinstance(traces, list) else np.asarray(traces.latents)


def run_kind(pipe: Pipeline, kind: str, points: int, batch: int, steps: int, repeats: int) -> dict:
    runners = build(pipe, kind, points, batch, steps)
    ref = runners["loop"][2]
    times = measure.interleaved({name: fn for name, (fn, _, _) in runners.items()}, repeats)
    rows = {}
    for name, (_, evals, latents) in runners.items():
        rows[name] = {
            "unet_evals_per_sample_point": evals, "unet_evals_vs_loop": evals / runners["loop"][1],
            "median_s": float(np.median(times[name])), "time_vs_loop": measure.median_ratio(times[name], times["loop"]),
            "max_rel_latent_diff_vs_loop": float(np.max(np.abs(latents - ref)) / np.max(np.abs(ref))),
        }
    return rows


def table(kind: str, rows: dict) -> str:
    lines = [f"sweep over {'the transition timestep t' if kind == 't' else 'the scale after t = 500'}:",
             "| runner | UNet evals / sample / point | vs loop | median s | time vs loop | max rel latent diff |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['unet_evals_per_sample_point']:.1f} | {r['unet_evals_vs_loop']:.2f}x | "
                     f"{r['median_s']:.2f} | {r['time_vs_loop']:.2f}x | {r['max_rel_latent_diff_vs_loop']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kinds", default="t,scale", help="comma-separated sweeps: t, scale")
    args = p.parse_args(argv)
    pipe = Pipeline(random_components("sd1"))
    out = {"points": args.points, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
           "machine": measure.machine_line(measure.machine()), "sweeps": {}}
    for kind in args.kinds.split(","):
        out["sweeps"][kind] = rows = run_kind(pipe, kind, args.points, args.batch, args.steps, args.repeats)
        print(f"tiny sd1 model, {args.points} points x batch {args.batch}, {args.steps} DDIM steps; " + table(kind, rows))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
