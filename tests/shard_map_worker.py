"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (see test_sampler.py).

A user's own ``jax.shard_map`` with DEFAULT arguments (check_vma on) around ``sampler.sample_loop``
and ``sampler.sample`` on the stub denoiser, forward and under ``jax.grad``, for STP, DTP, exact
OG+DTP and gated OG+DTP; each compared with the same call on one device. Prints one JSON object.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import stub
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import sampler as S

B, STEPS = 4, 8
CASES = [  # (name, schedule, function)
    ("stp", G.static_transition(500, 0.0, 7.5), S.sample_loop),
    ("dtp", G.dynamic_transition(1.0, 7.5), S.sample),
    ("og-dtp", G.dynamic_transition(-7.5, 7.5, signal="latent_cosine"), S.sample),
    ("gated-og-dtp", G.gated(G.dynamic_transition(-7.5, 7.5, signal="latent_cosine"), 0.5), S.sample),
]


def main() -> None:
    assert jax.device_count() == 4, jax.devices()
    params = stub.params()
    sched, x0, cond, uncond = stub.inputs(B, STEPS)
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    out = {}
    for name, schedule, fn in CASES:
        plan = G.plan(schedule, B, sched.timesteps)

        def run(x0, cond, uncond, before, after, detector, fn=fn):
            t = fn(params, sched, x0, cond, uncond, before, after, detector, unet_fn=stub.unet)
            return t.latents, t.transition_index

        sharded = jax.shard_map(run, mesh=mesh, in_specs=P("batch"), out_specs=P("batch"))  # defaults

        def loss(s, f, plan=plan):
            latents, _ = f(x0, cond, uncond, plan.before * s, plan.after * s, plan.detector)
            return jnp.sum(latents ** 2)

        args = (x0, cond, uncond, plan.before, plan.after, plan.detector)
        latents, index = jax.jit(sharded)(*args)
        ref_latents, ref_index = jax.jit(run)(*args)
        grad = jax.jit(jax.grad(lambda s: loss(s, sharded)))(1.0)
        ref_grad = jax.jit(jax.grad(lambda s: loss(s, run)))(1.0)
        out[f"{name}/{fn.__name__}"] = {
            "latents_rel_err": float(jnp.max(jnp.abs(latents - ref_latents)) / jnp.max(jnp.abs(ref_latents))),
            "index": np.asarray(index).tolist(), "ref_index": np.asarray(ref_index).tolist(),
            "grad": float(grad), "ref_grad": float(ref_grad),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
