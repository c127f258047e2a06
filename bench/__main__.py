"""``python -m bench``: run the benchmark sections and write bench/results/latest.{md,json}.

On an accelerator machine the same command measures the accelerator path (the JAX default
backend; PyTorch uses CUDA when available), e.g. bfloat16 with fused attention:

    python -m bench --pin none --dtype bfloat16 --sizes sd --steps 50

On a full-size random model (built once, offline, cached; see bench/full.py):

    python -m bench --config sd15               # conversion, load, memory, compile, table
    python -m bench --config sd21 --sections memory
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from cfgbasin_jax.method.registry import BENCH

SECTIONS = ("table", "overhead", "dtp", "percall", "compile", "profile")
FULL_CONFIGS = ("sd15", "sd21")
# Defaults that differ on a full-size model (--config sd15 / sd21): few steps, batch 1, one round.
FULL_DEFAULTS = {"runners": "ours,torch_loop,torch_pipe", "repeats": 1, "loop_images": 1, "pin": "none", "steps": 3,
                 "batch": 1}
SMALL_DEFAULTS = {"runners": "ours,torch_loop,torch_pipe,flax_pipe", "repeats": 3, "loop_images": 2, "pin": "auto"}


def parse_args(argv=None) -> argparse.Namespace:
    from bench import full

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, choices=FULL_CONFIGS,
                   help="a full-size random model instead of --sizes: sd15 (512x512) or sd21 (768x768); "
                        "built once under --cache-dir")
    p.add_argument("--sizes", default="tiny,sd", help="comma-separated model sizes: tiny, sd")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated: {', '.join(SECTIONS)}; with --config: {', '.join(full.SECTIONS)}")
    p.add_argument("--methods", default=",".join(BENCH.methods),
                   help="table methods (names of cfgbasin_jax.method.registry; default: its BENCH preset)")
    p.add_argument("--runners", default=None, help=f"table runners (default {SMALL_DEFAULTS['runners']}; "
                                                    f"with --config {FULL_DEFAULTS['runners']})")
    p.add_argument("--batch", "--batch_size", type=int, default=None,
                   help="batch of the batched runners (default: per size, tiny 8, sd 4; --config 1)")
    p.add_argument("--steps", "--num_inference_steps", type=int, default=None,
                   help="denoising steps (default: per size, tiny 50, sd 10; --config 3)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (median; default 3, --config 1)")
    p.add_argument("--loop-images", "--loop_images", type=int, default=None, help="images per round of the batch-1 loops (2; --config 1)")
    p.add_argument("--dtp-batches", "--dtp_batches", default="1,4,8", help="batch sizes of our sampler in the DTP section")
    p.add_argument("--dtype", default="float32", help="our pipeline's and the Flax anchor's dtype")
    p.add_argument("--pin", default=None,
                   help="run pinned to one core with one thread: 'auto' (last allowed core; the default), a core "
                        "number, or 'none' (the default with --config)")
    p.add_argument("--percall-configs", "--percall_configs", default="tiny,sd")
    p.add_argument("--percall-batch", "--percall_batch", type=int, default=16)
    p.add_argument("--percall-latent", "--percall_latent", type=int, default=32)
    p.add_argument("--percall-repeats", "--percall_repeats", type=int, default=5)
    p.add_argument("--cache-dir", "--cache_dir", default=None,
                   help="--config: where the full-size model is built and converted (default "
                        "$CFGBASIN_BENCH_CACHE, else $XDG_CACHE_HOME/cfgbasin_jax/bench)")
    p.add_argument("--memory-steps", "--memory_steps", type=int, default=1,
                   help="--config: steps of the memory and compile jobs (batch 1, VAE decode included)")
    p.add_argument("--memory-dtypes", "--memory_dtypes", default="float32,bfloat16", help="--config: our dtypes in the memory section")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for key, value in (FULL_DEFAULTS if args.config else SMALL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    known = full.SECTIONS if args.config else SECTIONS
    args.sections = args.sections or ",".join(known)
    bad = [s for s in args.sections.split(",") if s not in known]
    if bad:
        p.error(f"--sections: unknown {', '.join(bad)} (use {', '.join(known)})")
    return args


def pin_core(spec: str, cpus: list) -> int | None:
    """The core to pin to for --pin (None: do not pin)."""
    if spec == "none":
        return None
    if spec == "auto":
        return cpus[-1]
    try:
        core = int(spec)
    except ValueError:
        raise SystemExit(f"python -m bench: error: --pin {spec!r}: use 'auto', 'none' or a core number") from None
    if core not in cpus:
        raise SystemExit(f"python -m bench: error: --pin {core}: not one of the allowed cores {cpus}")
    return core


def run(args, log=print) -> dict:
    """Run the selected sections; returns the result dict (also written by bench.report.write)."""
    all_cpus = sorted(os.sched_getaffinity(0))
    core = pin_core(args.pin, all_cpus)
    if core is not None:  # before JAX / PyTorch start their thread pools
        os.sched_setaffinity(0, {core})
    import torch

    if core is not None:
        torch.set_num_threads(1)

    from bench import diffusers_flax, harness, measure, report
    from bench import models as M
    from cfgbasin_jax.method import registry as Registry

    sections = args.sections.split(",")
    info = measure.machine()
    info["load_avg_start"] = info.pop("load_avg")
    info["setting"] = (f"pinned to core {core}, 1 thread (JAX and PyTorch)" if core is not None
                       else f"default threads (PyTorch {torch.get_num_threads()})")
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench"] + [shlex.quote(a) for a in args.argv]),
        "args": vars(args), "machine": info, "sizes": {},
        "notes": [
            "ratios are measured in the same run, interleaved round by round; the machine is shared, "
            "so the load average is given at start and end",
            "(b) runs both UNet halves at every step (the official scripts' batch of 2), decides the "
            "transition on the host and syncs every step; OG+DTP there is two passes as in the official script",
            "peak RSS +MB: highest resident memory during a runner's first call (compilation included) "
            "above the memory already held; memory the allocators kept from earlier runners is not recounted",
            "compile s: first call minus the median steady call",
        ],
    }
    if not diffusers_flax.available():
        result["notes"].append(f"(d) diffusers Flax and the per-call diffusers Flax UNet: {diffusers_flax.SKIP_NOTE}")
    started = time.time()
    if args.config:
        from bench import full

        result["notes"] = result["notes"][:3] + full.NOTES
        full.run(args, result, log=log)
        sections = []
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        for name in ([] if args.config else args.sizes.split(",")):
            size = M.SIZES[name]
            steps = args.steps or size.steps
            batch = args.batch or size.batch
            log(f"size {name}: building models")
            models = M.build(size, Path(tmp), dtype=args.dtype)
            result["sizes"][name] = {"name": name, "description": size.description, "latent": size.latent,
                                     "unet_params_m": models.unet_params_m, "parity": models.parity}
            if "table" in sections:
                result.setdefault("table", {})[name] = harness.table(
                    models, [Registry.get(m).name for m in args.methods.split(",")], batch, steps, args.loop_images, args.repeats,
                    tuple(args.runners.split(",")), log=log)
            if "overhead" in sections:
                result.setdefault("overhead", {})[name] = harness.overhead(models, batch, steps, args.repeats, log=log)
            if "compile" in sections:  # a second process on the same shapes (diffusers folder, converted in memory)
                from bench import full

                result.setdefault("compile", {})[name] = full.compile_section(
                    models.folder, Path(tmp), size.latent * models.pipe.vae_scale_factor, steps, batch, log=log)
            if "profile" in sections:
                from bench import full

                result.setdefault("profile", {})[name] = full.profile_section(models, args.repeats, log=log)
            if "dtp" in sections:
                batches = [int(b) for b in args.dtp_batches.split(",")]
                result.setdefault("dtp", {})[name] = harness.dtp_batches(
                    models, batches, steps, args.loop_images, args.repeats, log=log)
    if "percall" in sections:
        result["percall"] = harness.percall(args.percall_configs.split(","), args.percall_batch, args.percall_latent,
                                            args.percall_repeats, core if core is not None else all_cpus[-1],
                                            all_cpus, log=log)
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = time.time() - started
    md, js = report.write(result, Path(args.out), args.config or "latest")
    log(report.markdown(result))
    log(f"wrote {md} and {js}")
    return result


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
