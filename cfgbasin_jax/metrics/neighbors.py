"""Nearest-neighbour search by inner product (cosine for unit descriptors), on device, bounded memory.

For N queries against M keys the device holds the queries [N,D], one key block [kc,D] and one
similarity tile [qc,kc] at a time; keys stream from the host block by block, so M is bounded only
by host memory. One compile serves every N and M (both are padded to whole chunks; padded keys are
masked). Ties resolve to the lowest key index, as ``numpy.argmax`` does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("query_chunk",), donate_argnums=(0, 1))
def _update_block(best_sim, best_idx, queries, key_block, block_start, n_valid, query_chunk: int):
    """Fold one key block into the running (best_sim [Np], best_idx [Np]); queries [Np,D] with
    Np a multiple of query_chunk; key rows >= n_valid are padding."""
    kc = key_block.shape[0]
    valid = jnp.arange(kc) < n_valid
    q_tiles = queries.reshape(-1, query_chunk, queries.shape[-1])

    def tile(q):
        sims = jnp.dot(q, key_block.T, precision=jax.lax.Precision.HIGHEST)
        sims = jnp.where(valid[None, :], sims, -jnp.inf)
        return jnp.max(sims, axis=1), jnp.argmax(sims, axis=1).astype(jnp.int32)

    tile_max, tile_arg = jax.lax.map(tile, q_tiles)
    tile_max, tile_arg = tile_max.reshape(-1), tile_arg.reshape(-1) + block_start
    better = tile_max > best_sim
    return jnp.where(better, tile_max, best_sim), jnp.where(better, tile_arg, best_idx)


def nearest_neighbors(
    queries: np.ndarray, keys: np.ndarray, query_chunk: int = 1024, key_chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Highest inner product of each query row with any key row.

    queries [N,D], keys [M,D] (float; unit rows give cosine similarity) ->
    (max_similarity float32 [N], index int32 [N] into keys).
    """
    queries, keys = np.asarray(queries, np.float32), np.asarray(keys, np.float32)
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"need queries [N,D] and keys [M,D] with equal D, got {queries.shape} and {keys.shape}")
    n, m = queries.shape[0], keys.shape[0]
    if n == 0 or m == 0:
        raise ValueError(f"nearest_neighbors needs at least one query and one key, got N={n}, M={m}")
    if query_chunk < 1 or key_chunk < 1:
        raise ValueError("query_chunk and key_chunk must be positive")
    qc = min(query_chunk, n)
    n_pad = -(-n // qc) * qc
    kc = min(key_chunk, m)
    q = jnp.asarray(np.pad(queries, ((0, n_pad - n), (0, 0))))
    best_sim = jnp.full((n_pad,), -jnp.inf, jnp.float32)
    best_idx = jnp.zeros((n_pad,), jnp.int32)
    for start in range(0, m, kc):
        block = keys[start : start + kc]
        n_valid = block.shape[0]
        if n_valid < kc:
            block = np.pad(block, ((0, kc - n_valid), (0, 0)))
        best_sim, best_idx = _update_block(
            best_sim, best_idx, q, jnp.asarray(block), jnp.int32(start), jnp.int32(n_valid), query_chunk=qc
        )
    return np.asarray(best_sim)[:n], np.asarray(best_idx)[:n]
