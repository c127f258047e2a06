"""2-D convolution (NHWC, HWIO kernels) with the algorithm chosen per shape and backend.

:class:`Conv2d` has ``flax.linen.Conv``'s parameters (``kernel`` [kh,kw,Cin,Cout], ``bias`` [Cout]),
initialisers and dtype rules, so parameter trees stay diffusers' Flax trees. It computes

    conv(x [N,H,W,Cin]) -> [N,Ho,Wo,Cout]

in one of two ways (static, chosen when the model is traced):

  "xla"   ``lax.conv_general_dilated`` (XLA's convolution: cuDNN on GPU, Eigen's spatial
          convolution on CPU).
  "gemm"  one matrix product: a 1x1 convolution is a product over channels; a k x k convolution
          gathers its k*k shifted windows into [N,Ho,Wo,k*k*Cin] and multiplies by the kernel
          reshaped to [k*k*Cin, Cout].
  "auto"  "gemm" on CPU for 1x1 convolutions, and for k x k ones with many output channels and
          few output rows (batch x pixels; :func:`gemm_limits`): there XLA's CPU convolution
          parallelises poorly; "xla" otherwise and on every other backend.

The two differ by float32 rounding only (about 1e-6 relative). The CPU measurements behind the
limits: ``python -m bench --config sd15 --sections profile`` and the README's *CPU speed*.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfgbasin_jax.runtime import cpu

IMPLEMENTATIONS = ("auto", "xla", "gemm")

# When a k x k convolution runs as one matrix product on CPU: (min output channels, max output rows)
# pairs, rows = batch x output pixels; "gemm" when any pair admits the shape. Measured on 2 cores:
# SD 1.5's shapes at batch 2 on AMD Zen 4 ("avx512") and Intel Sapphire Rapids ("amx"), and on the
# Intel host a grid of square 3x3 convolutions (batch 2-16, 8x8 to 32x32, 128-1280 channels). The
# product took 0.4-0.9x XLA's time at 1280 channels up to 1024 rows and at 640 channels up to 512
# rows; 0.85-1.6x at 320 channels, up to 1.9x at 128; at 2048 rows (SD 1.5's 32x32) it lost at 640
# channels on both hosts. Zen 4's measurements fit the same limits, so GEMM_LIMITS (overrides per ISA
# level, cfgbasin_jax.runtime.cpu.by_level) has no entry yet.
DEFAULT_GEMM_LIMITS = ((512, 512), (1024, 1024))
GEMM_LIMITS: dict = {}


def gemm_limits(isa: str | None = None) -> tuple:
    """The CPU (min output channels, max output rows) pairs for ``isa`` (default: this machine's level)."""
    return cpu.by_level(GEMM_LIMITS, DEFAULT_GEMM_LIMITS, isa)


def resolve(implementation: str, kernel: Sequence[int], out_rows: int, out_channels: int,
            backend: str | None = None, isa: str | None = None) -> str:
    """The concrete algorithm ("xla" or "gemm") for a convolution with ``kernel`` (kh, kw) whose output
    is [out_rows = N*Ho*Wo, out_channels], on ``backend`` (default: JAX's) and CPU ``isa``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"convolution implementation {implementation!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    if (backend or jax.default_backend()) != "cpu":
        return "xla"
    if tuple(kernel) == (1, 1) or any(out_channels >= c and out_rows <= r for c, r in gemm_limits(isa)):
        return "gemm"
    return "xla"


def _pairs(padding, kernel: Sequence[int]) -> tuple:
    """Explicit ((top, bottom), (left, right)) padding from 'SAME', 'VALID' or pairs (stride 1 for SAME)."""
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":
        return tuple(((k - 1) // 2, k // 2) for k in kernel)
    return tuple(tuple(p) for p in padding)


def conv_gemm(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int], padding) -> jnp.ndarray:
    """The convolution as one matrix product. x [N,H,W,Cin], kernel [kh,kw,Cin,Cout] -> [N,Ho,Wo,Cout]."""
    kh, kw, cin, cout = kernel.shape
    (pt, pb), (pl, pr) = _pairs(padding, (kh, kw))
    sh, sw = strides
    if (pt, pb, pl, pr) != (0, 0, 0, 0):
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    if (kh, kw) == (1, 1):
        windows = x[:, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw, :]
    else:
        windows = jnp.concatenate([x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
                                   for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.einsum("nhwk,kd->nhwd", windows, kernel.reshape(kh * kw * cin, cout))


class Conv2d(nn.Module):
    """``flax.linen.Conv`` (2-D, NHWC) with the algorithm of :func:`resolve`; same parameters."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    implementation: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        (pt, pb), (pl, pr) = _pairs(self.padding, (kh, kw))
        ho = (x.shape[1] + pt + pb - kh) // self.strides[0] + 1
        wo = (x.shape[2] + pl + pr - kw) // self.strides[1] + 1
        if resolve(self.implementation, (kh, kw), x.shape[0] * ho * wo, self.features) == "gemm":
            y = conv_gemm(x, kernel, self.strides, self.padding)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, tuple(self.strides), ((pt, pb), (pl, pr)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if bias is None else y + bias
