"""Data parallelism with pmap semantics on ``jax.jit`` + ``jax.shard_map`` over a 1-D "data" mesh.

Params and the scheduler are replicated; prompts, noise, guidance plans and detector state are
split along the batch. Each device runs its own ``lax.scan`` over its shard (so halves are skipped
per device, exactly as pmap would), and the per-step results come back as global arrays.
``jax.shard_map`` runs with its defaults (``check_vma=True``): the sampler types its loop state as
varying over the mesh axes its inputs vary over, as a user's own shard_map needs too.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def resolve_devices(devices=None) -> tuple:
    """``None`` -> all local devices; an int n -> the first n; or an explicit sequence of devices."""
    local = jax.local_devices()
    if devices is None:
        return tuple(local)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices={devices} requested but {len(local)} local device(s) exist: {local}")
        return tuple(local[:devices])
    devices = tuple(devices)
    if not devices:
        raise ValueError("devices: empty device list")
    missing = [d for d in devices if d not in local]
    if missing:
        raise ValueError(f"devices: {missing} are not local devices of this process ({local})")
    return devices


def data_mesh(devices: Sequence) -> Mesh:
    return Mesh(np.asarray(devices, dtype=object), (AXIS,))


def replicate(tree, mesh: Mesh):
    """Place a pytree on every device of ``mesh`` (params, scheduler tables)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree, mesh: Mesh):
    """Split every array of a pytree along axis 0 over the mesh's data axis."""
    return jax.device_put(tree, NamedSharding(mesh, P(AXIS)))


def padded_size(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pad axis 0 to ``size`` by repeating the last row (padding is computed, then dropped)."""
    x = np.asarray(x)
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def first_device_only(fn: Callable) -> Callable:
    """Wrap a host-callback hook so that inside shard_map only the first device calls it."""

    def hook(j):
        jax.lax.cond(jax.lax.axis_index(AXIS) == 0, lambda: fn(j), lambda: None)

    return hook


def sharded_sample_loop(loop: Callable, mesh: Mesh, cond_aux: bool = False) -> Callable:
    """shard_map a ``sample_loop(params, scheduler, x0, cond, uncond, before, after, detector)``
    over ``mesh``; returns a function of the same arguments (global arrays; the detector's leaves
    are per sample) giving a global :class:`~cfgbasin_jax.method.sampler.Trace` (every field [B,...]).
    With ``cond_aux=True`` it takes a ninth argument, a pytree of per-sample arrays [B,...]
    (sharded like the batch), passed to the loop as ``cond_aux=``."""

    def local(params, sched, x0, cond, uncond, before, after, detector, *aux):
        extra = {"cond_aux": aux[0]} if cond_aux else {}
        return loop(params, sched, x0, cond, uncond, before, after, detector, **extra)

    data = P(AXIS)
    in_specs = (P(), P(), data, data, data, data, data, data) + ((data,) if cond_aux else ())
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=data)
