"""Scaled dot-product attention with one implementation per backend.

All implementations take and return the same layout and compute the same function:

    attend(q [B,Sq,H,D], k [B,Sk,H,D], v [B,Sk,H,D], implementation) -> [B,Sq,H,D]
    out = softmax(q k^T / sqrt(D)) v, per batch element and head.

Implementations (static, chosen when the model is traced):
  "dense"    the whole score tensor [B*H,Sq,Sk] and a softmax over it (diffusers' Flax attention;
             the reference).
  "chunked"  the CPU path: large problems run one (batch, head) pair at a time with ``lax.map`` and
             query chunks sized per CPU (:func:`query_chunk`), so each score block stays in cache;
             the softmax normalisation is applied to the [Sq,D] output instead of the [Sq,Sk]
             scores. Small problems (cross-attention over 77 tokens, low resolutions) run batched
             with the same deferred normalisation.
  "xla"      ``jax.nn.dot_product_attention(implementation="xla")`` (TPU default; softmax in float32).
  "fused"    ``jax.nn.dot_product_attention`` with cuDNN's fused flash attention where cuDNN supports
             the shape and dtype (bfloat16 / float16), else the XLA implementation (GPU default).
  "auto"     "chunked" on CPU, "fused" on GPU, "xla" on TPU and other backends.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfgbasin_jax.runtime import cpu

IMPLEMENTATIONS = ("auto", "dense", "chunked", "xla", "fused")

# The chunked path maps over (batch, head) pairs once a pair's score matrix has this many
# entries (Sq * Sk); below it the batched path is faster (loop overhead dominates).
CHUNK_MIN_SCORES = 512 * 512
# Queries per chunk, (against more than MANY_KEYS keys, against fewer), by ISA level
# (cfgbasin_jax.runtime.cpu.isa_level); levels without an entry take the default. Measured with SD 1.5's
# self-attention (8 heads of 40, batch 2), 2 cores:
#   "avx512" (AMD Zen 4), against 128-query chunks: 4096 tokens 0.83-0.88x the time with 256 (512:
#     0.96-0.98x); 1024 tokens 0.72-0.81x with 512 (256: 0.74-0.88x). The default.
#   "amx" (Intel Sapphire Rapids), against 256: 4096 tokens 0.82-0.86x the time with 1024 (512:
#     0.87-0.89x); 1024 tokens 512 fastest (256: 1.32x, 1024: 1.18x its time).
DEFAULT_QUERY_CHUNKS = (256, 512)
QUERY_CHUNKS = {"amx": (1024, 512)}
MANY_KEYS = 2048


def query_chunk(sq: int, sk: int, isa: str | None = None) -> int:
    """Queries per chunk of the chunked path for Sq queries over Sk keys on CPU ``isa`` (default:
    this machine's level): the size above, halved (down to 64) until it divides Sq; Sq itself (one
    chunk) when none does."""
    many, few = cpu.by_level(QUERY_CHUNKS, DEFAULT_QUERY_CHUNKS, isa)
    chunk = many if sk > MANY_KEYS else few
    while chunk >= 64:
        if sq % chunk == 0:
            return chunk
        chunk //= 2
    return sq


def resolve(implementation: str, backend: str | None = None) -> str:
    """The concrete implementation for ``implementation`` on ``backend`` (default: JAX's default)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "chunked"
    if backend in ("gpu", "cuda", "rocm"):
        return "fused"
    return "xla"


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, implementation: str = "auto") -> jnp.ndarray:
    """softmax(q k^T / sqrt(D)) v. q [B,Sq,H,D], k and v [B,Sk,H,D] -> [B,Sq,H,D] (q's dtype)."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[::2] != k.shape[::2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: need q [B,Sq,H,D] and k, v [B,Sk,H,D], got {q.shape}, {k.shape}, {v.shape}")
    impl = resolve(implementation)
    if impl == "dense":
        return dense(q, k, v)
    if impl == "chunked":
        return chunked(q, k, v)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return fused(q, k, v)


def _heads_first(x: jnp.ndarray) -> jnp.ndarray:
    """[B,S,H,D] -> [B*H,S,D]"""
    b, s, h, d = x.shape
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, s, d)


def _heads_last(x: jnp.ndarray, b: int) -> jnp.ndarray:
    """[B*H,S,D] -> [B,S,H,D]"""
    bh, s, d = x.shape
    return jnp.transpose(x.reshape(b, bh // b, s, d), (0, 2, 1, 3))


def dense(q, k, v):
    """Whole score tensor, softmax over keys (diffusers' FlaxAttention math)."""
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bid,bjd->bij", _heads_first(q), _heads_first(k)) * scale
    probs = jax.nn.softmax(scores, axis=-1)
    return _heads_last(jnp.einsum("bij,bjd->bid", probs, _heads_first(v)), q.shape[0])


def _deferred_softmax_attention(q, k, v):
    """[..., Sq, D] x [..., Sk, D] -> [..., Sq, D]; exp(s - max) @ v, normalised afterwards.
    Scores, softmax and sums in float32 (also for bfloat16 / float16 inputs)."""
    f32 = jnp.float32
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = jnp.einsum("...id,...jd->...ij", q, k, preferred_element_type=f32)
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    out = jnp.einsum("...ij,...jd->...id", weights.astype(v.dtype), v, preferred_element_type=f32)
    return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(q.dtype)


def chunked(q, k, v):
    """CPU attention: per (batch, head) pair and query chunk when the score matrix is large."""
    b, sq, _, d = q.shape
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    if sq * k.shape[1] < CHUNK_MIN_SCORES:
        return _heads_last(_deferred_softmax_attention(qh, kh, vh), b)
    n_chunks = sq // query_chunk(sq, k.shape[1])

    def one_pair(args):
        q1, k1, v1 = args  # [Sq,D], [Sk,D], [Sk,D]
        if n_chunks == 1:
            return _deferred_softmax_attention(q1, k1, v1)
        out = jax.lax.map(lambda qc: _deferred_softmax_attention(qc, k1, v1), q1.reshape(n_chunks, -1, d))
        return out.reshape(sq, d)

    return _heads_last(jax.lax.map(one_pair, (qh, kh, vh)), b)


def fused(q, k, v):
    """cuDNN flash attention where it applies (GPU, bfloat16 / float16), else XLA's."""
    if q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() in ("gpu", "cuda"):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):  # shape / head size / version unsupported
            pass
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
