"""Images/s of the sharded sampler with 1, 2, 4 devices (forced host devices on a CPU machine).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m bench.devices

On CPU the forced devices share the same cores, so no real gain is expected: this measures the
sharding overhead. On a multi-GPU/TPU host it measures the real scaling (no flag needed).
"""

import time

import jax
import numpy as np

from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.pipeline import Pipeline
from cfgbasin_jax.models.tiny import random_components


def images_per_second(pipe, devices: int, batch: int = 8, steps: int = 20, rounds: int = 3) -> float:
    prompts = [f"prompt {i}" for i in range(batch)]
    kw = dict(guidance=G.dynamic_transition(1.0, G.CFG_SCALE), num_inference_steps=steps, scheduler="ddim",
              progress=False, devices=devices)
    pipe.generate(prompts, **kw)  # compile
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        pipe.generate(prompts, seed=r, **kw)
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def main() -> None:
    pipe = Pipeline(random_components("sd1"))
    n = len(jax.local_devices())
    counts = [c for c in (1, 2, 4, 8) if c <= n]
    rates = {c: images_per_second(pipe, c) for c in counts}
    from bench import measure

    print(f"{jax.devices()[0].platform}, {n} local device(s); DTP, tiny sd1 model, batch 8, 20 DDIM steps")
    print(f"Host: {measure.machine_line(measure.machine())}")
    print("| devices | images/s | vs 1 device |\n|---|---|---|")
    for c, r in rates.items():
        print(f"| {c} | {r:.2f} | {r / rates[1]:.2f}x |")


if __name__ == "__main__":
    main()
