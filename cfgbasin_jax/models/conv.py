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
  "winograd", "winograd4"
          Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray, 2016) for stride-1 3x3
          convolutions whose output height and width are multiples of m (2 for "winograd", 4 for
          "winograd4"): (m+2)^2 products [N*tiles, Cin] x [Cin, Cout] replace the 9 of a direct
          convolution per m x m output tile, 2.25x (m=2) or 4x (m=4) fewer multiplications.
  "auto"  on CPU: "gemm" for 1x1 convolutions; in float32 (while :data:`AUTO_WINOGRAD`),
          "winograd4" / "winograd" for stride-1 3x3 ones with at least
          :data:`WINOGRAD4_MIN_PIXELS` / :data:`WINOGRAD_MIN_PIXELS` output pixels per image
          (never by batch size: same seed, same image at any batch); else "gemm" for k x k ones with many
          output channels and few rows (:func:`gemm_limits`), where XLA's CPU convolution
          parallelises poorly; "xla" otherwise and on every other backend.

"xla" and "gemm" differ by float32 rounding only (about 1e-6 relative to the output's largest
value), as does "winograd"; "winograd4" by about 2e-5 (its transforms multiply by up to 8 and
1/24). The transformed kernels [(m+2)^2, Cin, Cout] are computed at every call, next to their
convolution (see :class:`Conv2d`); large images run in bands of tile rows
(:data:`WINOGRAD_BAND_ELEMENTS`). The CPU measurements behind the rules: ``python -m bench --config sd15 --sections profile`` and
the README's *CPU speed*.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cfgbasin_jax.runtime import cpu

IMPLEMENTATIONS = ("auto", "xla", "gemm", "winograd", "winograd4")
WINOGRAD_TILES = {"winograd": 2, "winograd4": 4}

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


# "auto" on CPU uses Winograd for a stride-1 3x3 float32 convolution from this many output pixels
# per image (Ho x Wo; the batch size never changes the algorithm, so an image does not depend on the
# batch it is sampled in), with the 4x4 tile from WINOGRAD4_MIN_PIXELS. Measured on Intel Sapphire
# Rapids (2 cores) inside a scan, the kernels transformed once (ms; XLA / "gemm" / "winograd" /
# "winograd4"): 64x64 x 320 channels at batch 1 (4096 rows) 27 / 40 / 19 / 10; 32x32 x 640 at
# batch 2 (2048) 50 / 53 / 26 / 18, at batch 1 (1024) 26 / 28 / 14 / 11; 16x16 x 1280 at batch 1
# (256) 54 / 26 / 18 / 25; 8x8 x 1280 at batch 2 (128) 39 / 15 / 12 / 19, where the transformed
# kernels (16/9 and 4x the weights' size) are read for few rows: "gemm" stays below 256 pixels, which
# also keeps SD 1.5's 8x8 kernels (1.5 GB transformed) out of memory. Small widths (32-128
# channels, 256-16384 rows) were even or faster with the same rule.
WINOGRAD_MIN_PIXELS = 256
WINOGRAD4_MIN_PIXELS = 1024
# Whether "auto" takes Winograd at all (set False for XLA's/"gemm"'s rounding, about 1e-6 instead of up to 2e-5).
AUTO_WINOGRAD = True
# Elements per image of one band's transformed tiles in conv_winograd (64 MB in float32): SD 1.5's
# UNet runs whole; the VAE decoder's from 128x128 (512 channels) run in bands of a few tile rows,
# which keeps the decode's peak memory near the direct convolution's (whole, SD 1.5's 1-step
# generate peaked at 6.44 GB instead of 5.53).
WINOGRAD_BAND_ELEMENTS = 1 << 24


def gemm_limits(isa: str | None = None) -> tuple:
    """The CPU (min output channels, max output rows) pairs for ``isa`` (default: this machine's level)."""
    return cpu.by_level(GEMM_LIMITS, DEFAULT_GEMM_LIMITS, isa)


def winograd_fits(implementation: str, kernel: Sequence[int], strides: Sequence[int], out_hw: Sequence[int]) -> bool:
    """Whether Winograd ``implementation`` computes this convolution: 3x3, stride 1, output
    height and width (``out_hw``) multiples of its tile."""
    m = WINOGRAD_TILES[implementation]
    return tuple(kernel) == (3, 3) and tuple(strides) == (1, 1) and all(n % m == 0 for n in out_hw)


def resolve(implementation: str, kernel: Sequence[int], out_rows: int, out_channels: int,
            backend: str | None = None, isa: str | None = None, strides: Sequence[int] = (1, 1),
            out_hw: Sequence[int] | None = None, dtype: Any = jnp.float32) -> str:
    """The concrete algorithm ("xla", "gemm", "winograd" or "winograd4") for a convolution with
    ``kernel`` (kh, kw) and ``strides`` whose output is [N, *out_hw, out_channels] (out_rows =
    N*Ho*Wo), computed in ``dtype``, on ``backend`` (default: JAX's) and CPU ``isa``. An explicit
    Winograd choice must fit (:func:`winograd_fits`); ``out_hw=None``: never Winograd for "auto"."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"convolution implementation {implementation!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if implementation in WINOGRAD_TILES and not (out_hw is not None and winograd_fits(implementation, kernel, strides, out_hw)):
        raise ValueError(f"convolution implementation {implementation!r} needs a 3x3 kernel, stride 1 and an output "
                         f"height and width divisible by {WINOGRAD_TILES[implementation]}; got kernel {tuple(kernel)}, "
                         f"strides {tuple(strides)}, output {None if out_hw is None else tuple(out_hw)}")
    if implementation != "auto":
        return implementation
    if (backend or jax.default_backend()) != "cpu":
        return "xla"
    if tuple(kernel) == (1, 1):
        return "gemm"
    if AUTO_WINOGRAD and out_hw is not None and jnp.dtype(dtype) == jnp.float32:
        for name, min_pixels in (("winograd4", WINOGRAD4_MIN_PIXELS), ("winograd", WINOGRAD_MIN_PIXELS)):
            if out_hw[0] * out_hw[1] >= min_pixels and winograd_fits(name, kernel, strides, out_hw):
                return name
    if any(out_channels >= c and out_rows <= r for c, r in gemm_limits(isa)):
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


# Winograd F(m x m, 3 x 3): y = A^T [(G g G^T) * (B^T d B)] A per (m+2) x (m+2) input tile d,
# interpolating at 0, +-1 (m=2) and 0, +-1, +-2 (m=4), and infinity. (B^T, G, A^T) per tile m.
_WINOGRAD_MATRICES = {
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
         (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}


def _kron(tile: int, which: int) -> np.ndarray:
    """M (x) M for one of the tile's matrices (0: B^T, 1: G, 2: A^T): M X M^T on an a x a grid X,
    flattened row-major, is (M (x) M) @ vec(X): one small matrix product per transform."""
    m = np.asarray(_WINOGRAD_MATRICES[tile][which], np.float64)
    return np.kron(m, m).astype(np.float32)


def _transform(matrix: np.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """matrix [r, k] @ x [k, ...] -> [r, ...] in full float32 (no TF32 or bfloat16 passes)."""
    out = jnp.dot(jnp.asarray(matrix, x.dtype), x.reshape(x.shape[0], -1), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(matrix.shape[0], *x.shape[1:])


def winograd_kernel(kernel: jnp.ndarray, tile: int) -> jnp.ndarray:
    """G g G^T for F(tile x tile, 3x3): kernel [3,3,Cin,Cout] -> [(tile+2)^2, Cin, Cout]."""
    return _transform(_kron(tile, 1), kernel.reshape(9, *kernel.shape[2:]))


def winograd_band_rows(tile_rows: int, tile_cols: int, tile: int, channels: int) -> int:
    """Tile rows per band of :func:`conv_winograd`: the most (a divisor of ``tile_rows``) whose
    transformed tiles [(tile+2)^2, rows * tile_cols, channels] (channels: the larger of Cin and Cout)
    have at most :data:`WINOGRAD_BAND_ELEMENTS` elements per image; all rows when they fit."""
    per_row = (tile + 2) ** 2 * tile_cols * channels
    fitting = [r for r in range(1, tile_rows + 1) if tile_rows % r == 0 and r * per_row <= WINOGRAD_BAND_ELEMENTS]
    return max(fitting, default=1)


def _zeros_tied_to(x: jnp.ndarray, shape: Sequence[int], dtype: Any) -> jnp.ndarray:
    """Zeros [*shape] that depend on ``x``: 0 times a 0/1 flag of x's first element, always exactly 0
    (also for a non-finite input) and kept by XLA's IEEE arithmetic. What is computed from them
    waits for x, and inside shard_map they vary over x's mesh axes."""
    return jnp.zeros(shape, dtype) * (x[(0,) * x.ndim] != 0).astype(dtype)


def _winograd_tiles(xb: jnp.ndarray, u: jnp.ndarray, tile: int) -> jnp.ndarray:
    """Winograd on whole blocks: xb [N, R+1, tile, C+1, tile, Cin] (the padded input cut into
    tile x tile blocks, one more than tiles each way), u [(tile+2)^2, Cin, Cout] -> [N, R*tile, C*tile, Cout]."""
    a = tile + 2
    n, rows, cols, cin, cout = xb.shape[0], xb.shape[1] - 1, xb.shape[3] - 1, xb.shape[5], u.shape[-1]
    # Every input tile is its block and the first 2 rows / columns of the next block: [N, R, a, C, a, Cin].
    xb = jnp.concatenate([xb[:, :rows], xb[:, 1:, :2]], axis=2)
    xb = jnp.concatenate([xb[:, :, :, :cols], xb[:, :, :, 1:, :2]], axis=4)
    # Element (i, j) of every input tile, stacked: [a*a, N*R*C, Cin].
    d = xb.transpose(2, 4, 0, 1, 3, 5).reshape(a * a, n * rows * cols, cin)
    v = _transform(_kron(tile, 0), d)  # B^T d B per tile
    prod = jax.lax.dot_general(v, u.astype(v.dtype), (((2,), (1,)), ((0,), (0,))))  # [a*a, N*R*C, Cout]
    y = _transform(_kron(tile, 2), prod)  # A^T m A per tile: [tile*tile, N*R*C, Cout]
    y = y.reshape(tile, tile, n, rows, cols, cout).transpose(2, 3, 0, 4, 1, 5)  # [N, R, tile, C, tile, Cout]
    return y.reshape(n, rows * tile, cols * tile, cout)


def conv_winograd(x: jnp.ndarray, u: jnp.ndarray, padding, tile: int) -> jnp.ndarray:
    """A stride-1 3x3 convolution by F(tile x tile, 3x3). x [N,H,W,Cin], u = winograd_kernel(kernel,
    tile) [(tile+2)^2, Cin, Cout] -> [N,Ho,Wo,Cout]; Ho and Wo must be multiples of ``tile``. Large
    images run in bands of tile rows (:func:`winograd_band_rows`, set by the image size only), so
    the transformed tiles never take more than a band's memory."""
    (pt, pb), (pl, pr) = _pairs(padding, (3, 3))
    n, cin, cout = x.shape[0], x.shape[3], u.shape[-1]
    ho, wo = x.shape[1] + pt + pb - 2, x.shape[2] + pl + pr - 2
    th, tw = ho // tile, wo // tile
    # Padded to whole blocks, one more than tiles each way (its last rows and columns never read).
    x = jnp.pad(x, ((0, 0), (pt, pb + tile - 2), (pl, pr + tile - 2), (0, 0)))
    xb = x.reshape(n, th + 1, tile, tw + 1, tile, cin)
    band = winograd_band_rows(th, tw, tile, max(cin, cout))
    if band == th:
        return _winograd_tiles(xb, u, tile)

    def one_band(i, out):
        part = jax.lax.dynamic_slice_in_dim(xb, i * band, band + 1, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, _winograd_tiles(part, u, tile), i * band * tile, axis=1)

    # Every element is written by a band; tied to x, the buffer varies over x's mesh axes inside
    # shard_map, as the loop's carry must.
    out = _zeros_tied_to(x, (n, ho, wo, cout), jnp.result_type(x.dtype, u.dtype))
    return jax.lax.fori_loop(0, th // band, one_band, out)


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
        impl = resolve(self.implementation, (kh, kw), x.shape[0] * ho * wo, self.features, strides=self.strides,
                       out_hw=(ho, wo), dtype=x.dtype)
        if impl in WINOGRAD_TILES:
            # The transformed kernel is computed per call, once the input exists: tied to it, the
            # transform is neither hoisted out of a sampling loop nor scheduled at the program's
            # start, where every transformed kernel would be held at once (SD 1.5 at batch 2: 2.9 GB
            # of temporaries instead of 0.5).
            tied = kernel + _zeros_tied_to(x, (), kernel.dtype)
            y = conv_winograd(x, winograd_kernel(tied, WINOGRAD_TILES[impl]), ((pt, pb), (pl, pr)), WINOGRAD_TILES[impl])
        elif impl == "gemm":
            y = conv_gemm(x, kernel, self.strides, self.padding)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, tuple(self.strides), ((pt, pb), (pl, pr)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if bias is None else y + bias
