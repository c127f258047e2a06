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


WINOGRAD_CASES = [  # 3x3, stride 1; output sizes multiples of 4 (both tiles) or of 2 only
    (3, 1, ((1, 1), (1, 1)), (8, 8)),
    (3, 1, "SAME", (4, 12)),
    (3, 1, "VALID", (10, 6)),
    (3, 1, ((0, 2), (2, 0)), (6, 8)),
]


def _fits(implementation, kernel, stride, padding, hw) -> bool:
    """The Winograd conditions restated: 3x3, stride 1, output sides multiples of the tile."""
    tile = {"winograd": 2, "winograd4": 4}.get(implementation)
    if tile is None:
        return True
    pads = ((1, 1), (1, 1)) if padding == "SAME" else ((0, 0), (0, 0)) if padding == "VALID" else padding
    out = [n + p0 + p1 - kernel + 1 for n, (p0, p1) in zip(hw, pads)]
    return kernel == 3 and stride == 1 and all(o % tile == 0 for o in out)


@pytest.mark.parametrize("implementation", ["xla", "gemm", "auto", "winograd", "winograd4"])
@pytest.mark.parametrize("kernel, stride, padding, hw", CASES + WINOGRAD_CASES)
def test_conv2d_is_flax_conv(implementation, kernel, stride, padding, hw):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *hw, 6)).astype(np.float32))
    ref = nn.Conv(5, (kernel, kernel), strides=(stride, stride), padding=padding)
    ours = C.Conv2d(5, (kernel, kernel), strides=(stride, stride), padding=padding, implementation=implementation)
    if not _fits(implementation, kernel, stride, padding, hw):
        with pytest.raises(ValueError, match=f"convolution implementation '{implementation}' needs a 3x3 kernel"):
            ours.init(jax.random.PRNGKey(1), x)
        return
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
    for impl in ("xla", "gemm", "winograd", "winograd4"):
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


@pytest.mark.parametrize("batch, hw, channels, strides, dtype, backend, expected", [
    (2, (64, 64), 320, (1, 1), jnp.float32, "cpu", "winograd4"),   # SD 1.5's 64x64: 4096 pixels
    (1, (32, 32), 640, (1, 1), jnp.float32, "cpu", "winograd4"),   # 1024 pixels: the 4x4 tile's limit
    (4, (16, 16), 1280, (1, 1), jnp.float32, "cpu", "winograd"),   # 256 pixels (1024 rows): per image
    (1, (32, 31), 640, (1, 1), jnp.float32, "cpu", "xla"),         # odd width
    (3, (10, 34), 640, (1, 1), jnp.float32, "cpu", "winograd"),    # 340 pixels
    (1, (16, 16), 1280, (1, 1), jnp.float32, "cpu", "winograd"),   # 256 pixels: the 2x2 tile's limit
    (1, (16, 14), 1280, (1, 1), jnp.float32, "cpu", "gemm"),       # 224 pixels: the product
    (2, (8, 8), 1280, (1, 1), jnp.float32, "cpu", "gemm"),         # 64 pixels
    (8, (8, 8), 1280, (1, 1), jnp.float32, "cpu", "gemm"),         # 64 pixels, 512 rows: not by batch
    (1, (12, 16), 320, (1, 1), jnp.float32, "cpu", "xla"),         # 192 pixels, few channels
    (2, (64, 62), 320, (1, 1), jnp.float32, "cpu", "winograd"),    # 62 is even, not a multiple of 4
    (2, (63, 64), 320, (1, 1), jnp.float32, "cpu", "xla"),         # odd: no tile fits
    (2, (32, 32), 640, (2, 2), jnp.float32, "cpu", "xla"),         # a strided (downsampling) conv
    (2, (64, 64), 320, (1, 1), jnp.bfloat16, "cpu", "xla"),        # Winograd in float32 only
    (2, (64, 64), 320, (1, 1), jnp.float32, "gpu", "xla"),
])
def test_auto_winograd_choice(batch, hw, channels, strides, dtype, backend, expected):
    rows = batch * hw[0] * hw[1]
    got = C.resolve("auto", (3, 3), rows, channels, backend=backend, isa="amx", strides=strides, out_hw=hw, dtype=dtype)
    assert got == expected


def test_auto_winograd_can_be_switched_off(monkeypatch):
    assert C.resolve("auto", (3, 3), 2 * 64 * 64, 320, backend="cpu", out_hw=(64, 64)) == "winograd4"
    monkeypatch.setattr(C, "AUTO_WINOGRAD", False)
    assert C.resolve("auto", (3, 3), 2 * 64 * 64, 320, backend="cpu", out_hw=(64, 64)) == "xla"


def test_auto_choice_does_not_depend_on_the_batch():
    """Same seed, same image at any batch size: one image's convolutions take one algorithm."""
    for hw in [(8, 8), (16, 16), (32, 32), (64, 64), (12, 20)]:
        for channels in (320, 640, 1280):
            picks = {C.resolve("auto", (3, 3), n * hw[0] * hw[1], channels, backend="cpu", isa="amx", out_hw=hw)
                     for n in (1, 2, 3, 8)}
            assert len(picks) == 1 or not picks & set(C.WINOGRAD_TILES), (hw, channels, picks)


def test_auto_never_winograd_without_output_size():
    assert C.resolve("auto", (3, 3), 2 * 64 * 64, 320, backend="cpu") == "xla"


def _conv_nhwc_float64(x, kernel):
    """A direct 'SAME' 3x3 convolution in float64 numpy: the sum over the nine shifted windows."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1] - 2, x.shape[2] - 2
    return sum(x[:, i : i + h, j : j + w, :] @ np.asarray(kernel, np.float64)[i, j] for i in range(3) for j in range(3))


@pytest.mark.parametrize("tile, bound", [(2, 2e-6), (4, 3e-5)])
def test_winograd_error_at_sd_scale(tile, bound):
    """Against a float64 restatement at SD-like widths (256 channels): the documented error sizes
    (about 1e-6 of the output's largest value for the 2x2 tile, 2e-5 for the 4x4 one)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 16, 16, 256)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, 256, 32)) / np.sqrt(9 * 256)).astype(np.float32)
    want = _conv_nhwc_float64(x, kernel)
    got = np.asarray(C.conv_winograd(jnp.asarray(x), C.winograd_kernel(jnp.asarray(kernel), tile), "SAME", tile))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < bound
    assert err > 1e-9  # float32 arithmetic, not the float64 reference


def test_winograd_kernel_interpolates_the_filter():
    """G g G^T restated: row/column r of the 2x2 tile's G evaluates the 3-tap filter at 0, 1, -1
    (the middle two halved) and takes its last tap at infinity."""
    g = np.arange(9.0).reshape(3, 3)
    points = [lambda f: f[0], lambda f: (f[0] + f[1] + f[2]) / 2, lambda f: (f[0] - f[1] + f[2]) / 2, lambda f: f[2]]
    want = np.array([[pc(np.array([pr(g[:, j]) for j in range(3)])) for pc in points] for pr in points])
    got = np.asarray(C.winograd_kernel(jnp.asarray(g.reshape(3, 3, 1, 1)), 2)).reshape(4, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6)


class _Stack(nn.Module):
    """Six 3x3 Winograd convolutions (4x4 tile) in a row."""

    @nn.compact
    def __call__(self, x):
        for i in range(6):
            x = C.Conv2d(x.shape[-1], (3, 3), padding="SAME", implementation="winograd4", name=f"c{i}")(x)
        return x


def test_transformed_kernels_are_not_all_held_at_once():
    """Each transformed kernel [36,256,256] (9.4 MB) lives next to its convolution: the program's
    temporaries stay under two of them, not the six the transforms would take if XLA ran them all
    first (they depend on the weights only) or hoisted them out of a loop."""
    x = jnp.zeros((1, 8, 8, 256), jnp.float32)
    m = _Stack()
    params = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
    one = 36 * 256 * 256 * 4

    def loop(p, x):
        return jax.lax.scan(lambda c, _: (m.apply(p, c), None), x, None, length=3)[0]

    for fn in (m.apply, loop):
        temp = jax.jit(fn).lower(params, x).compile().memory_analysis().temp_size_in_bytes
        assert temp < 2 * one, (fn, temp / one)


@pytest.mark.parametrize("tile, hw", [(2, (12, 10)), (4, (24, 8)), (4, (20, 12))])
def test_winograd_in_bands_is_flax_conv(tile, hw, monkeypatch):
    """Large images run in bands of tile rows: same convolution (bands of 2-3 of the 5-6 tile rows here)."""
    th, tw = hw[0] // tile, hw[1] // tile
    monkeypatch.setattr(C, "WINOGRAD_BAND_ELEMENTS", (tile + 2) ** 2 * tw * 6 * 3)  # 3 tile rows of 6 channels
    band = C.winograd_band_rows(th, tw, tile, 6)
    assert band < th and th % band == 0 and band == max(r for r in (1, 2, 3) if th % r == 0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *hw, 6)).astype(np.float32))
    ref = nn.Conv(5, (3, 3), padding="SAME")
    p = ref.init(jax.random.PRNGKey(1), x)
    ours = C.Conv2d(5, (3, 3), padding="SAME", implementation="winograd4" if tile == 4 else "winograd")
    want, got = ref.apply(p, x), ours.apply(p, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_winograd_bands_bound_the_temporaries(monkeypatch):
    """A 128x128 image in bands of 4 tile rows holds under 2 inputs' worth of temporaries (the padded
    input and one band's tiles); whole, the transformed tiles alone are 2.25 inputs."""
    x = jnp.zeros((1, 128, 128, 32), jnp.float32)
    m = C.Conv2d(32, (3, 3), padding="SAME", implementation="winograd4")
    params = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)

    def temp():
        return jax.jit(m.apply).lower(params, x).compile().memory_analysis().temp_size_in_bytes / x.nbytes

    monkeypatch.setattr(C, "WINOGRAD_BAND_ELEMENTS", 36 * 32 * 32 * 4)
    assert C.winograd_band_rows(32, 32, 4, 32) == 4
    assert temp() < 2
    monkeypatch.setattr(C, "WINOGRAD_BAND_ELEMENTS", 1 << 30)
    assert temp() > 4


def test_winograd_bands_inside_shard_map(monkeypatch):
    """The sampler runs the model under shard_map: the bands' loop carries a value that varies over
    the mesh axis like the input (a constant initial buffer fails to trace there)."""
    from jax.sharding import Mesh, PartitionSpec as P

    monkeypatch.setattr(C, "WINOGRAD_BAND_ELEMENTS", 36 * 2 * 6)  # 1 tile row per band
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 6)).astype(np.float32))
    m = C.Conv2d(5, (3, 3), padding="SAME", implementation="winograd4")
    p = m.init(jax.random.PRNGKey(1), x)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    sharded = jax.shard_map(m.apply, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    np.testing.assert_allclose(np.asarray(jax.jit(sharded)(p, x)), np.asarray(m.apply(p, x)), rtol=1e-6, atol=1e-6)


def test_sd_shapes_band_by_image_size():
    """SD 1.5's UNet convolutions run whole; its VAE decoder's from 128x128 in bands (64 MB per image)."""
    assert C.winograd_band_rows(16, 16, 4, 960) == 16  # 64x64 latents, the widest input (640 + 320 skip)
    assert C.winograd_band_rows(8, 8, 4, 1920) == 8  # 32x32, 1280 + 640
    assert C.winograd_band_rows(24, 24, 4, 960) == 12  # SD 2.1's 96x96: two bands
    assert C.winograd_band_rows(128, 128, 4, 128) == 16  # the decoder at 512x512
    assert C.winograd_band_rows(64, 64, 4, 512) == 8  # 256x256, 512 channels in
    assert C.winograd_band_rows(32, 32, 4, 512) == 16  # 128x128 x 512: two bands
    assert C.winograd_band_rows(16, 16, 4, 512) == 16  # 64x64 x 512: whole


def test_winograd_keeps_samples_independent():
    """A non-finite sample does not reach the others (the tie to the input is exactly zero)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    m = C.Conv2d(3, (3, 3), padding="SAME", implementation="winograd")
    p = m.init(jax.random.PRNGKey(0), jnp.asarray(x))
    clean = np.asarray(m.apply(p, jnp.asarray(x)))
    x[0] = np.nan
    got = np.asarray(m.apply(p, jnp.asarray(x)))
    assert np.isnan(got[0]).all()
    np.testing.assert_array_equal(got[1], clean[1])


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
