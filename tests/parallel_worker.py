"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (see test_parallel.py).

Generates the same 12 prompts for a grid of (device count, batch size), and 5 prompts (padded) on 2
and 4 devices, and saves all images, transition indices and UNet-evaluation counts to an .npz file.
"""

import sys

import jax
import numpy as np

import cfgbasin_jax
from cfgbasin_jax.method import guidance as G

# (devices, batch size): per-device batches 12, 3, 1, 3, 6 (batch 5 on 2 devices pads to 6)
GRID = [(1, 12), (2, 5), (4, 1), (4, 12), (2, 12)]
PROMPTS = [f"prompt number {i} with a red circle" if i % 2 else f"two blue squares {i}" for i in range(12)]


def main(model: str, out: str) -> None:
    assert len(jax.local_devices()) == 4, jax.local_devices()
    pipe = cfgbasin_jax.load_pipeline(model)
    results = {}
    for method, g in [("stp", G.static_transition(500, 0.0, 7.5)), ("dtp", G.dynamic_transition(1.0, 7.5))]:
        for n_dev, bs in GRID:
            r = pipe.generate(PROMPTS, g, num_inference_steps=5, seed=3, scheduler="ddim", progress=False,
                              devices=n_dev, batch_size=bs)
            key = f"{method}_{n_dev}_{bs}"
            results[key + "_images"] = r.images
            results[key + "_index"] = r.transition_index
            results[key + "_evals"] = np.asarray(r.unet_evals)
    # 5 prompts: padded to 6 on 2 devices (3 each: the (2, 5) shape above) and to 8 on 4 devices
    for n_dev in (2, 4):
        r = pipe.generate(PROMPTS[:5], G.static_transition(500, 0.0, 7.5), num_inference_steps=5, seed=3,
                          scheduler="ddim", progress=False, devices=n_dev, decode=False)
        results[f"pad5_{n_dev}_evals"] = np.asarray(r.unet_evals)
    try:
        pipe.generate(PROMPTS[:1], num_inference_steps=5, progress=False, devices=8)
        results["too_many_devices_error"] = np.asarray("")
    except ValueError as e:
        results["too_many_devices_error"] = np.asarray(str(e))
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
