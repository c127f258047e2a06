"""The official opposite-guidance signal at the official script's precision (jnp, pure).

The official OG+DTP script records ``1 - torch.nn.functional.cosine_similarity(x_{j+1}.flatten(),
x_j.flatten(), dim=0)`` in float32. In torch 2.13 that is ``sum((a / max(|a|, eps)) * (b / max(|b|,
eps)))`` with eps = float32(1e-8) clamping each norm separately (torch 1.x instead clamped
``|a|^2 |b|^2`` at eps^2), every step rounded to float32. Near convergence the cosine is within a few
ulps of 1, so the signal is a small multiple of 2^-24 and ties between steps are common; the official
minimum rule sees those ties.

:func:`official_cosine_distance` reproduces it bit for bit, reductions included, by restating torch's
CPU kernels in the order they add: the 8-lane (AVX2) kernels, which torch also dispatches on AVX512
CPUs, of

* ``linalg_vector_norm`` (p=2, last dim): one 8-lane accumulator ``acc += v * v`` over the vectors,
  its lanes added left to right, then the tail: groups of 4 squares added one by one, and a last 1 to
  3 squares that torch's compiled loop fuses (``fma``). Here they are multiplied and added separately,
  so for sizes that are not a multiple of 4 the norm can differ by one ulp; latents with 4 channels
  (every SD model) are always a multiple of 4.
* ``sum`` (cascade sum): 8-lane vectors in rows of 4 (instruction-level parallelism), rows added in
  chunks of 16 whose sums cascade through 4 levels, then the scalar tail, then the lanes.

Verified against torch 2.13 on CPU (``tests/test_official_cosine.py``). A reduction over more than
32768 elements can be split across threads by torch, which this does not follow; the official script
itself ran on CUDA, whose reduction order is different again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfgbasin_jax.method.arrays import vary, varying_axes

LANES = 8  # float32 lanes of torch's AVX2 reduction kernels
ILP = 4  # rows of vectors summed side by side (row_sum's ilp_factor)
LEVELS = 4  # cascade levels of multi_row_sum
EPS = 1e-8  # torch.nn.functional.cosine_similarity's default eps


def _rounded(x: jnp.ndarray) -> jnp.ndarray:
    """``x`` itself (``nextafter(x, x) == x``), as a value XLA cannot fuse into a following add: on
    CPU it would otherwise contract ``a * b + c`` into one fma and round once where torch rounds twice."""
    return jax.lax.nextafter(x, x)


def _ceil_log2(n: int) -> int:
    return 1 if n <= 2 else (n - 1).bit_length()


def _multi_row_sum(rows: jnp.ndarray) -> jnp.ndarray:
    """[B, size, ...] -> [B, ...]: torch's multi_row_sum: chunks of ``2**level_power`` rows added in
    order, chunk sums cascading through :data:`LEVELS` accumulators."""
    size = rows.shape[1]
    power = max(4, _ceil_log2(size) // LEVELS)
    step, mask = 1 << power, (1 << power) - 1
    zero = jnp.zeros(rows.shape[:1] + rows.shape[2:], rows.dtype)
    acc = [zero] * LEVELS
    n_chunks = size // step
    if n_chunks:
        chunks = rows[:, : n_chunks * step].reshape(rows.shape[:1] + (n_chunks, step) + rows.shape[2:])
        chunk_sum = zero[:, None] + chunks[:, :, 0]
        for r in range(1, step):
            chunk_sum = chunk_sum + chunks[:, :, r]
        done = 0
        for c in range(n_chunks):
            acc[0] = chunk_sum[:, c]
            done += step
            for j in range(1, LEVELS):
                acc[j], acc[j - 1] = acc[j] + acc[j - 1], zero
                if done & (mask << (j * power)):
                    break
    for r in range(n_chunks * step, size):
        acc[0] = acc[0] + rows[:, r]
    total = acc[0]
    for j in range(1, LEVELS):
        total = total + acc[j]
    return total


def _row_sum(items: jnp.ndarray) -> jnp.ndarray:
    """[B, size, ...] -> [B, ...]: torch's row_sum (rows of :data:`ILP` items, then the leftovers)."""
    size = items.shape[1]
    n_rows = size // ILP
    rows = items[:, : n_rows * ILP].reshape(items.shape[:1] + (n_rows, ILP) + items.shape[2:])
    partial = _multi_row_sum(rows)
    first = partial[:, 0]
    for i in range(n_rows * ILP, size):
        first = first + items[:, i]
    for k in range(1, ILP):
        first = first + partial[:, k]
    return first


def torch_sum(x: jnp.ndarray) -> jnp.ndarray:
    """[B, n] float32 -> [B]: ``x.sum(-1)`` added in the order of torch's CPU cascade sum."""
    b, n = x.shape
    if n < LANES:
        return _row_sum(x)
    n_vec = n // LANES
    lanes = _row_sum(x[:, : n_vec * LANES].reshape(b, n_vec, LANES))
    total = jnp.zeros((b,), x.dtype)
    for k in range(n_vec * LANES, n):
        total = total + x[:, k]
    for k in range(LANES):
        total = total + lanes[:, k]
    return total


def torch_vector_norm(x: jnp.ndarray) -> jnp.ndarray:
    """[B, n] float32 -> [B]: ``torch.linalg.vector_norm(x, dim=-1)`` in torch's CPU order."""
    b, n = x.shape
    n_main = n - n % LANES
    squares = _rounded(x * x)
    vectors = jnp.moveaxis(squares[:, :n_main].reshape(b, n_main // LANES, LANES), 1, 0)
    zero = vary(jnp.zeros((b, LANES), x.dtype), varying_axes(x))  # typed like x inside shard_map
    acc, _ = jax.lax.scan(lambda a, v: (a + v, None), zero, vectors, unroll=8)
    total = acc[:, 0]
    for k in range(1, LANES):
        total = total + acc[:, k]
    for k in range(n_main, n):  # torch fuses the last n % 4 of these into fma (see the module doc)
        total = total + squares[:, k]
    return jnp.sqrt(total)


def torch_cosine_similarity(a: jnp.ndarray, b: jnp.ndarray, eps: float = EPS) -> jnp.ndarray:
    """[B, ...] x [B, ...] -> [B] float32: ``F.cosine_similarity(a_i.flatten(), b_i.flatten(), dim=0,
    eps=eps)`` for each sample, as torch 2.13 computes it on CPU."""
    a2 = a.reshape(a.shape[0], -1).astype(jnp.float32)
    b2 = b.reshape(b.shape[0], -1).astype(jnp.float32)
    norms = jnp.maximum(torch_vector_norm(jnp.concatenate([a2, b2])), jnp.float32(eps))[:, None]
    na, nb = norms[: a2.shape[0]], norms[a2.shape[0]:]
    return torch_sum(_rounded(_divide(a2, na) * _divide(b2, nb)))


def _divide(x: jnp.ndarray, norm: jnp.ndarray) -> jnp.ndarray:
    """[B, n] / [B, 1], an IEEE division per element. Dividing by a broadcast norm would let XLA
    multiply by its reciprocal instead; an elementwise divisor (NaN where x is NaN, the result
    there either way) keeps the division."""
    return x / jnp.where(jnp.isnan(x), x, norm)


def official_cosine_distance(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """[B, ...] x [B, ...] -> [B] float32: the official script's ``1 - cosine_similarity(a, b)``."""
    return jnp.float32(1.0) - torch_cosine_similarity(a, b)
