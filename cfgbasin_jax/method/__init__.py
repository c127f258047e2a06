"""The method: guidance schedules, transition detectors and the one-scan sampler.

    guidance     per-step guidance scales (CFG, STP, OG+STP, DTP, OG+DTP): pure data, traced
    detectors    transition detectors: pytree state machines carried through the scan (also the gate of
                 guidance.gated: detect memorization, then mitigate per sample)
    sampler      the sampling loop (one ``jax.lax.scan``) and the reference-free functional API
    registry     the method names the CLI, demo and bench share, with the paper's defaults
    sharding     data parallelism (pmap semantics on jit + shard_map)
    official_cosine, arrays   the official scripts' cosine rule restated; small array helpers
"""
