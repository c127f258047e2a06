"""bfloat16 against float32 over whole trajectories: the same tiny random SD model loaded in both dtypes,
the same prompts and noise, constant CFG 7.5, per scheduler and step count.

    python -m bench.precision                          # 4 schedulers x 6, 20 and 50 steps, batch 4
    python -m bench.precision --steps 6 --schedulers ddim

Reports, per (scheduler, steps): max |latents_bf16 - latents_f32|, max |latents_f32|, their ratio,
and the mean and max uint8 pixel difference of the decoded images.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench import measure
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.models.tiny import random_components
from cfgbasin_jax.pipeline import Pipeline


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="6,20,50")
    p.add_argument("--schedulers", default="ddim,dpm++2m,euler,pndm")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    f32, bf16 = Pipeline(random_components("sd1")), Pipeline(random_components("sd1", dtype="bfloat16"))
    prompts = [f"a photo of object number {i}" for i in range(args.batch)]
    noise = np.random.default_rng(0).standard_normal((args.batch, *f32.latent_shape())).astype(np.float32)
    rows = []
    print("| scheduler | steps | max abs latent diff | max abs latent (f32) | ratio | mean pixel diff | max pixel diff |")
    print("|---|---|---|---|---|---|---|")
    for name in args.schedulers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            kw = dict(num_inference_steps=steps, latents=noise, scheduler=name, progress=False)
            ref, low = f32.generate(prompts, G.constant(7.5), **kw), bf16.generate(prompts, G.constant(7.5), **kw)
            latent = float(np.max(np.abs(low.latents - ref.latents)))
            scale = float(np.max(np.abs(ref.latents)))
            pixels = np.abs(low.images.astype(np.int16) - ref.images)
            row = {"scheduler": name, "steps": steps, "max_abs_latent_diff": latent, "max_abs_latent": scale,
                   "mean_pixel_diff": float(pixels.mean()), "max_pixel_diff": int(pixels.max())}
            rows.append(row)
            print(f"| {name} | {steps} | {latent:.3f} | {scale:.2f} | {latent / scale:.3f} | {row['mean_pixel_diff']:.2f} | "
                  f"{row['max_pixel_diff']} |", flush=True)
    out = {"batch": args.batch, "rows": rows, "machine": measure.machine_line(measure.machine())}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
