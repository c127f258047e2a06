"""The benchmark sections. Each returns plain JSON-able dicts; :mod:`bench.report` formats them.

  table     per size and method: images/s of every runner that can express the method, ratio against
            (b) the official-structure PyTorch loop, UNet evaluations per image, compile time, peak
            memory, agreement of the images with (b); recompilations of our sampler over a 10-point
            sweep of the STP transition point; STP's UNet work relative to constant CFG.
  overhead  our sampler's cost per step beyond the bare UNet call (measured and isolated).
  dtp       DTP images/s at batch 1, 4, 8 on our sampler against the official structure in Flax
            (our model) and in PyTorch, both batch 1.
  percall   one UNet call, ours vs PyTorch (and diffusers' Flax UNet), pinned to one core with one
            thread and with the default threads, in child processes.

The anchors built on diffusers' own Flax models ((d) and the per-call diffusers Flax UNet) run only
where those classes exist (:mod:`bench.diffusers_flax`); elsewhere the report marks them skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench import diffusers_flax, measure
from bench import runners as R

TABLE_RUNNERS = ("ours", "torch_loop", "torch_pipe", "flax_pipe")
SWEEP_POINTS = 10
OVERHEAD_MIN_ROUNDS = 7  # a difference of a few percent needs more rounds than the table


def _pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    return int(np.max(np.abs(a[:n].astype(np.int16) - b[:n].astype(np.int16))))


def compare(calls: dict, repeats: int, anchor: str, log=print) -> dict:
    """Run each call once (first call: compile + peak memory), then ``repeats`` interleaved timed
    rounds. calls: {name: (fn, n_images)}. Returns {name: row}; ratio_vs_anchor is the median of
    per-round images/s ratios."""
    rows, firsts = {}, {}
    for name, (fn, n_images) in calls.items():
        measure.reset_device_peak()
        with measure.PeakRSS() as mem:
            first_s, out = measure.timed(fn)
        firsts[name] = out
        rows[name] = {"n_images": n_images, "first_call_s": first_s, "peak_rss_mb": mem.peak_mb,
                      "device_peak_mb": measure.device_peak_mb(), "unet_evals_per_image": out.unet_evals / n_images}
        log(f"    {name}: first call {first_s:.2f}s")
    times = measure.interleaved({name: fn for name, (fn, _) in calls.items()}, repeats)
    for name, row in rows.items():
        secs = np.asarray(times[name])
        rate = row["n_images"] / secs
        anchor_rate = rows[anchor]["n_images"] / np.asarray(times[anchor]) if anchor in rows else None
        row.update(
            seconds=[float(s) for s in secs],
            images_per_s=float(np.median(rate)),
            ratio_vs_anchor=float(np.median(rate / anchor_rate)) if anchor_rate is not None else None,
            compile_s=max(row["first_call_s"] - float(np.median(secs)), 0.0),
        )
        if anchor in firsts:
            row["max_pixel_diff_vs_anchor"] = _pixel_diff(firsts[name].images, firsts[anchor].images)
    return rows


def stp_sweep_recompiles(models, steps: int) -> dict:
    """Compilations of our sampler over a 10-point sweep of the STP transition point (batch 1,
    after one warm-up compile at this shape)."""
    pipe = models.pipe
    side = models.size.latent * pipe.vae_scale_factor
    from cfgbasin_jax.method import guidance as G

    def run(t):
        return pipe.generate(R.PROMPTS[:1], G.static_transition(int(t), R.STP_BEFORE, R.SCALE), num_inference_steps=steps,
                             height=side, width=side, scheduler="ddim", progress=False, decode=False, seed=int(t))

    run(999)
    before = pipe.compile_count()
    points = np.linspace(50, 950, SWEEP_POINTS).astype(int)
    transitions = [int(np.sum(run(t).guidance_scale[0] == R.STP_BEFORE)) for t in points]
    return {"points": points.tolist(), "recompiles": pipe.compile_count() - before,
            "steps_before_transition": transitions}


def table(models, methods, batch: int, steps: int, loop_images: int, repeats: int, runners=TABLE_RUNNERS,
          sweep: bool = True, log=print) -> dict:
    """The main table for one size (see the module docstring); ``sweep``: also count our sampler's
    recompilations over the STP transition-point sweep."""
    out = {"size": models.size.name, "batch": batch, "steps": steps, "loop_images": loop_images, "methods": {},
           "skipped": {}}
    if "flax_pipe" in runners and not diffusers_flax.available():
        runners = tuple(r for r in runners if r != "flax_pipe")
        out["skipped"]["flax_pipe"] = diffusers_flax.SKIP_NOTE
        log(f"  (d) diffusers Flax {diffusers_flax.SKIP_NOTE} ({diffusers_flax.missing()})")
    for method in methods:
        log(f"  table {models.size.name} {method}")
        calls = {r: R.make(r, models, method, batch, steps, loop_images) for r in runners
                 if method in R.RUNNER_METHODS[r]}
        out["methods"][method] = compare(calls, repeats, anchor="torch_loop", log=log)
    if sweep and "ours" in runners and R.STATIC in methods:
        out["stp_sweep"] = stp_sweep_recompiles(models, steps)
        out["methods"][R.STATIC]["ours"]["recompiles_sweep"] = out["stp_sweep"]["recompiles"]
    if "ours" in runners and R.STATIC in methods and R.ANCHOR in methods:
        stp, const = out["methods"][R.STATIC]["ours"], out["methods"][R.ANCHOR]["ours"]
        out["stp_work"] = {  # the time ratio is not from interleaved rounds: indicative only
            "unet_evals_ratio": stp["unet_evals_per_image"] / const["unet_evals_per_image"],
            "time_ratio_not_interleaved": const["images_per_s"] / stp["images_per_s"],
        }
    return out


# ------------------------------------------------------------------------------------------ overhead


def sampler_args(pipe, batch: int, steps: int, side: int):
    """Arguments of ``pipe.sampler()`` for constant CFG: (params, scheduler, x0, cond, uncond, before, after, detector)."""
    import jax.numpy as jnp

    from cfgbasin_jax.method import guidance as G

    sched = pipe.make_scheduler("ddim", steps)
    plan = G.plan(G.constant(R.SCALE), batch, np.asarray(sched.timesteps), sched.num_train_timesteps)
    cond = pipe.encode_prompts(R.PROMPTS[:batch])
    uncond = pipe.encode_prompts([""] * batch)
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal((batch, pipe.latent_channels, side, side)), jnp.float32)
    return (pipe.params["unet"], sched, x0, cond, uncond, jnp.asarray(plan.before), jnp.asarray(plan.after),
            plan.detector)


def host_callbacks_in_loop(pipe, args) -> int:
    """Host callbacks in the compiled sampler (progress off): 0 means no host round-trips per step."""
    text = pipe.sampler(progress=False, skip_halves=True).lower(*args).as_text()
    return sum(text.count(name) for name in ("callback", "host_compute", "SendToHost", "RecvFromHost"))


def overhead(models, batch: int, steps: int, repeats: int, log=print) -> dict:
    """Sampler cost per step as a fraction of the bare UNet work (constant CFG, both halves).

    bare: the same ``steps`` UNet calls at batch 2B in one compiled ``lax.scan`` (no sampler logic,
    no per-call dispatch). measured: (sampler loop - bare) / bare, same run, interleaved.
    isolated: the sampler loop with the UNet replaced by a stub, / bare.
    """
    import functools

    import jax
    import jax.numpy as jnp

    from cfgbasin_jax.method import sampler as S

    pipe = models.pipe
    args = sampler_args(pipe, batch, steps, models.size.latent)
    params, _, x0, cond, uncond = args[:5]
    loop = pipe.sampler(progress=False, skip_halves=True)
    x2, t2, c2 = jnp.concatenate([x0, x0]), jnp.full((2 * batch,), 500, jnp.int32), jnp.concatenate([uncond, cond])

    @jax.jit
    def bare(params, x, t, c):
        def body(x, _):
            return x + 1e-3 * pipe.unet_fn(params, x, t, c).astype(x.dtype), None

        return jax.lax.scan(body, x, None, length=steps)[0]

    def stub(p, x, t, c):
        return x * 0.5 + jnp.mean(c) + t[:, None, None, None].astype(x.dtype) * 1e-3

    stub_loop = jax.jit(functools.partial(S.sample_loop, unet_fn=stub, skip_halves=True))
    fns = {"loop": lambda: loop(*args), "bare": lambda: bare(params, x2, t2, c2), "stub_loop": lambda: stub_loop(*args)}
    for fn in fns.values():
        measure.timed(fn)
    log(f"  overhead {models.size.name}: compiled")
    times = measure.interleaved(fns, max(repeats, OVERHEAD_MIN_ROUNDS))
    loop_s, bare_s, stub_s = (np.asarray(times[k]) for k in ("loop", "bare", "stub_loop"))
    return {
        "size": models.size.name, "batch": batch, "steps": steps,
        "unet_call_s": float(np.median(bare_s / steps)),
        "loop_step_s": float(np.median(loop_s / steps)),
        "measured_fraction": float(np.median((loop_s - bare_s) / bare_s)),
        "isolated_fraction": float(np.median(stub_s / bare_s)),
        "host_callbacks_in_loop": host_callbacks_in_loop(pipe, args),
        "rounds_s": {k: [float(v) for v in times[k]] for k in times},
    }


# ---------------------------------------------------------------------------------------------- DTP


def dtp_batches(models, batches, steps: int, loop_images: int, repeats: int, log=print) -> dict:
    """DTP images/s: ours at each batch size vs the official structure (batch 1) in Flax and PyTorch."""
    calls = {f"ours_b{b}": R.make("ours", models, R.DYNAMIC, b, steps, loop_images) for b in batches}
    calls["flax_loop"] = R.make("flax_loop", models, R.DYNAMIC, 1, steps, loop_images)
    calls["torch_loop"] = R.make("torch_loop", models, R.DYNAMIC, 1, steps, loop_images)
    log(f"  dtp {models.size.name}")
    rows = compare(calls, repeats, anchor="torch_loop", log=log)
    flax = np.asarray(rows["flax_loop"]["n_images"]) / np.asarray(rows["flax_loop"]["seconds"])
    for name, row in rows.items():
        rate = row["n_images"] / np.asarray(row["seconds"])
        row["ratio_vs_flax_loop"] = float(np.median(rate / flax))
    return {"size": models.size.name, "steps": steps, "batches": list(batches), "rows": rows}


# ------------------------------------------------------------------------------------------ per call


def percall(configs, batch: int, latent: int, repeats: int, core: int | None, all_cpus, log=print) -> dict:
    """bench.percall in two child processes: pinned to ``core`` with 1 thread, and default threads."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    out = {}
    modes = {"pinned_1_thread": ({core}, 1), "default_threads": (set(all_cpus), 0)} if core is not None else {
        "default_threads": (set(all_cpus), 0)}
    for mode, (cpus, threads) in modes.items():
        log(f"  percall {mode} (cpus {sorted(cpus)})")
        cmd = [sys.executable, "-m", "bench.percall", "--threads", str(threads), "--configs", ",".join(configs),
               "--batch", str(batch), "--latent", str(latent), "--repeats", str(repeats),
               "--cpus", ",".join(str(c) for c in sorted(cpus))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"bench.percall ({mode}) failed:\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out
