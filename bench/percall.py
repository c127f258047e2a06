"""One UNet call, our Flax UNet against its PyTorch twin (and diffusers' Flax UNet where the classic
stack provides it, see :mod:`bench.diffusers_flax`), same weights.

Run by the harness in a child process so that the thread setting is real:

    python -m bench.percall --threads 1 --cpus 1 --configs tiny,sd --batch 16 --latent 32   # prints JSON

``--threads 1 --cpus 1`` runs pinned to core 1 with one thread: the affinity is set before JAX
and PyTorch start (JAX sizes its CPU thread pool from it), PyTorch gets ``torch.set_num_threads(1)``. ``--threads 0`` keeps both libraries' defaults.
Each repeat times every implementation once, in turn; the ratio is the median of the per-repeat
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

IMPLEMENTATIONS = ("ours", "diffusers_flax")


def measure_config(size_name: str, batch: int, latent: int, repeats: int, workdir: Path, impls=IMPLEMENTATIONS) -> dict:
    """Times of one UNet call at [batch, 4, latent, latent] for torch and each Flax implementation."""
    import jax
    import jax.numpy as jnp
    import torch

    from bench import measure
    from bench.models import SIZES, build_torch_modules, configs_for, torch_device
    from bench import diffusers_flax
    from cfgbasin_jax.loading import load_unet_folder

    configs = configs_for(SIZES[size_name])
    unet, _, _ = build_torch_modules(configs)
    device = torch_device()
    unet = unet.to(device)
    folder = Path(tempfile.mkdtemp(dir=workdir))
    unet.save_pretrained(folder)
    ours, _, params = load_unet_folder(folder)  # our converter, our UNet
    modules = {"ours": ours}
    if "diffusers_flax" in impls:
        modules["diffusers_flax"] = diffusers_flax.unet(configs["unet"])

    rng = np.random.default_rng(0)
    cross = configs["unet"]["cross_attention_dim"]
    x = rng.standard_normal((batch, 4, latent, latent)).astype(np.float32)
    t = np.full((batch,), 500, np.int32)
    c = rng.standard_normal((batch, 77, cross)).astype(np.float32)
    xj, tj, cj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(c)
    xt, tt, ct = (torch.from_numpy(a).to(device) for a in (x, t.astype(np.int64), c))

    def torch_call():
        with torch.no_grad():
            out = unet(xt, tt, ct).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    fns, compile_s, errors = {"torch": torch_call}, {}, {}
    ref = torch_call().cpu().numpy()
    for name in impls:
        module = modules[name]
        fn = jax.jit(lambda p, x, t, c, module=module: module.apply({"params": p}, x, t, c).sample)
        seconds, out = measure.timed(lambda fn=fn: fn(params, xj, tj, cj))
        compile_s[name] = seconds
        errors[name] = float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))
        fns[name] = lambda fn=fn: fn(params, xj, tj, cj)
    times = measure.interleaved(fns, repeats)
    return {
        "config": size_name,
        "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "shape": [batch, 4, latent, latent],
        "seconds": {k: float(np.median(v)) for k, v in times.items()},
        "ratio_vs_torch": {k: measure.median_ratio(times[k], times["torch"]) for k in impls},
        "first_call_s": compile_s,
        "rel_err_vs_torch": errors,
        "repeats": repeats,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.percall", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: library defaults)")
    parser.add_argument("--configs", default="tiny,sd", help="comma-separated sizes (bench.models.SIZES)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--cpus", default=None, help="comma-separated CPU affinity, set before JAX / PyTorch start")
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    import torch

    from bench import diffusers_flax

    impls, skipped = tuple(args.impls.split(",")), {}
    if "diffusers_flax" in impls and not diffusers_flax.available():
        impls = tuple(i for i in impls if i != "diffusers_flax")
        skipped["diffusers_flax"] = diffusers_flax.SKIP_NOTE
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_percall_") as tmp:
        for name in args.configs.split(","):
            results.append(measure_config(name, args.batch, args.latent, args.repeats, Path(tmp), impls))
            print(f"percall {name}: {results[-1]['ratio_vs_torch']}", file=sys.stderr, flush=True)
    setting = {"torch_threads": torch.get_num_threads(), "affinity": affinity, "load_avg": list(os.getloadavg())}
    print(json.dumps({"setting": setting, "results": results, "skipped": skipped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
