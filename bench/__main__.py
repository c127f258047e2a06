"""``python -m bench``: run the benchmark sections and write bench/results/latest.{md,json}.

On an accelerator machine the same command measures the accelerator path (the JAX default
backend; PyTorch uses CUDA when available), e.g. bfloat16 with fused attention:

    python -m bench --pin none --dtype bfloat16 --sizes sd --steps 50
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

SECTIONS = ("table", "overhead", "dtp", "percall")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,sd", help="comma-separated model sizes: tiny, sd")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--methods", default="cfg,stp,dtp,og-dtp", help="table methods (names of cfgbasin_jax.method.registry)")
    p.add_argument("--runners", default="ours,torch_loop,torch_pipe,flax_pipe", help="table runners")
    p.add_argument("--batch", type=int, default=None, help="batch of the batched runners (default: per size, 8)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: per size, tiny 50, sd 10)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (median)")
    p.add_argument("--loop-images", type=int, default=2, help="images per round of the batch-1 loops")
    p.add_argument("--dtp-batches", default="1,4,8", help="batch sizes of our sampler in the DTP section")
    p.add_argument("--dtype", default="float32", help="our pipeline's and the Flax anchor's dtype")
    p.add_argument("--pin", default="auto",
                   help="run pinned to one core with one thread: 'auto' (last allowed core), a core number, or 'none'")
    p.add_argument("--percall-configs", default="tiny,sd")
    p.add_argument("--percall-batch", type=int, default=16)
    p.add_argument("--percall-latent", type=int, default=32)
    p.add_argument("--percall-repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    args = p.parse_args(argv)
    bad = [s for s in args.sections.split(",") if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {', '.join(bad)} (use {', '.join(SECTIONS)})")
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
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if sys.argv[0].endswith(
            ("__main__.py", "bench")) else [])),
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
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        for name in args.sizes.split(","):
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
    md, js = report.write(result, Path(args.out))
    log(report.markdown(result))
    log(f"wrote {md} and {js}")
    return result


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
