"""models.conv: Conv2d against flax.linen.Conv (same parameters, same function) for each algorithm,
and the algorithm choice per backend, shape and ISA level."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgbasin_jax.models import conv as C

CASES = [  # (kernel, stride, padding, input H x W)
    (3, 1, ((1, 1), (1, 1)), (8, 8)),
    (3, 2, ((1, 1), (1, 1)), (9, 8)),
    (3, 2, ((0, 1), (0, 1)), (8, 8)),  # the VAE encoder's asymmetric downsampling pad
    (1, 1, "VALID", (5, 7)),
    (3, 1, "SAME", (6, 5)),
]


@pytest.mark.parametrize("implementation", ["xla", "gemm", "auto"])
@pytest.mark.parametrize("kernel, stride, padding, hw", CASES)
def test_conv2d_is_flax_conv(implementation, kernel, stride, padding, hw):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *hw, 6)).astype(np.float32))
    ref = nn.Conv(5, (kernel, kernel), strides=(stride, stride), padding=padding)
    ours = C.Conv2d(5, (kernel, kernel), strides=(stride, stride), padding=padding, implementation=implementation)
    key = jax.random.PRNGKey(1)
    p_ref, p_ours = ref.init(key, x), ours.init(key, x)
    # Same tree, same initial values (flax's initialisers): checkpoints and training are unchanged.
    assert jax.tree.structure(p_ref) == jax.tree.structure(p_ours)
    jax.tree.map(np.testing.assert_array_equal, p_ref, p_ours)
    p = {"params": {"kernel": p_ref["params"]["kernel"], "bias": jnp.arange(5.0)}}
    want, got = ref.apply(p, x), ours.apply(p, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_bfloat16_dtype_follows_flax():
    x = jnp.ones((1, 4, 4, 3), jnp.float32)
    for impl in ("xla", "gemm"):
        m = C.Conv2d(2, (3, 3), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16, implementation=impl)
        assert m.apply(m.init(jax.random.PRNGKey(0), x), x).dtype == jnp.bfloat16


@pytest.mark.parametrize("kernel, rows, channels, backend, isa, expected", [
    ((1, 1), 2 * 64 * 64, 4, "cpu", "avx512", "gemm"),      # 1x1: a product over channels, any size
    ((3, 3), 2 * 8 * 8, 1280, "cpu", "avx512", "gemm"),
    ((3, 3), 2 * 16 * 16, 640, "cpu", "avx512", "gemm"),    # 512 rows at 640 channels: the first limit
    ((3, 3), 2 * 16 * 16, 512, "cpu", "amx", "gemm"),
    ((3, 3), 2 * 16 * 16, 511, "cpu", "amx", "xla"),        # too few channels
    ((3, 3), 2 * 16 * 16 + 1, 640, "cpu", "avx512", "xla"),  # too many rows for 640 channels
    ((3, 3), 4 * 16 * 16, 1280, "cpu", "avx512", "gemm"),   # 1024 rows at 1024+ channels: the second
    ((3, 3), 2 * 32 * 32, 1280, "cpu", "amx", "xla"),       # SD 1.5's 32x32: XLA's
    ((3, 3), 16 * 8 * 8, 128, "cpu", "amx", "xla"),         # small UNets: XLA's
    ((3, 3), 2 * 8 * 8, 1280, "cpu", "neon", "gemm"),       # unmeasured levels: the default limits
    ((1, 1), 2 * 8 * 8, 1280, "gpu", "avx512", "xla"),      # cuDNN's convolutions elsewhere
    ((3, 3), 2 * 8 * 8, 1280, "tpu", None, "xla"),
])
def test_auto_choice(kernel, rows, channels, backend, isa, expected):
    assert C.resolve("auto", kernel, rows, channels, backend=backend, isa=isa) == expected


def test_explicit_choice_and_limits(monkeypatch):
    assert C.resolve("xla", (1, 1), 1, 1, backend="cpu") == "xla"
    assert C.resolve("gemm", (3, 3), 10**6, 4, backend="gpu") == "gemm"
    with pytest.raises(ValueError, match="convolution implementation 'im2col'"):
        C.resolve("im2col", (3, 3), 1, 1)
    assert C.gemm_limits("avx512") == C.gemm_limits("amx") == ((512, 512), (1024, 1024))
    # A level with its own entry takes it, and only that level.
    monkeypatch.setitem(C.GEMM_LIMITS, "avx2", ((64, 4096),))
    assert C.resolve("auto", (3, 3), 2 * 32 * 32, 128, backend="cpu", isa="avx2") == "gemm"
    assert C.resolve("auto", (3, 3), 2 * 32 * 32, 128, backend="cpu", isa="amx") == "xla"


def test_conv2d_counts_rows_over_the_batch(monkeypatch):
    """Conv2d asks resolve() with N*Ho*Wo rows and its output channels (strides and padding applied)."""
    seen = []
    monkeypatch.setattr(C, "resolve", lambda impl, kernel, rows, channels, **kw: seen.append((kernel, rows, channels)) or "xla")
    m = C.Conv2d(7, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = jnp.ones((3, 9, 8, 2))
    m.init(jax.random.PRNGKey(0), x)
    assert seen == [((3, 3), 3 * 5 * 4, 7)]
