"""Our linen UNet (cfgbasin_jax.unet) and attention implementations against PyTorch diffusers.

Measured (max abs err / max abs of the PyTorch UNet output, float32, batch 2, 4 input seeds):
  ours 1.7e-5 to 3.5e-5 (tiny sd1 at 32x32 latents, self-attention over 1024 tokens on the chunked
  lax.map path: 1.8e-5). Bound: UNET_RTOL = 5e-5. diffusers' FlaxUNet2DConditionModel on the same
  weights (classic stack, tests/test_compat_diffusers_flax.py) gave 4.5e-5 to 6.1e-5: its GEGLU uses
  the tanh approximation of gelu, ours the exact one, as PyTorch.
Attention alone (float32, against a float64 numpy reference): <= 1e-6 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cfgbasin_jax import attention as A
from cfgbasin_jax import models, tiny
from cfgbasin_jax.convert import ConversionError
from cfgbasin_jax.convert.mapping import state_dict_to_flax
from cfgbasin_jax.convert.weights import StateDict
from cfgbasin_jax.loading import load_unet_folder
from cfgbasin_jax.unet import UNet2DConditionModel

UNET_RTOL = 5e-5


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def tree_shapes(module, kind="unet"):
    return jax.tree.map(lambda s: s.shape, models.component_param_shapes(kind, module))


# --- parameter tree -------------------------------------------------------------------------------------

BENCH_SD = {  # the benchmark's SD-shaped config (bench/models.py)
    "block_out_channels": [64, 128, 128],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
}
DEEP = {"layers_per_block": 2, "transformer_layers_per_block": 2, "mid_block_type": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}


UNET_VARIANTS = {"sd1": ("sd1", {}), "sd2": ("sd2", {}), "bench_sd": ("sd1", BENCH_SD), "deep_no_mid": ("sd2", DEEP)}


@pytest.mark.parametrize("name", sorted(UNET_VARIANTS))
def test_param_tree_maps_one_to_one_onto_pytorch(name):
    """Every leaf of our tree takes one PyTorch parameter of the right shape and none is left over
    (the converter raises otherwise). Equality with diffusers' Flax tree: tests/test_compat_diffusers_flax.py."""
    from diffusers import UNet2DConditionModel as TorchUNet

    variant, overrides = UNET_VARIANTS[name]
    config = {**tiny.tiny_configs(variant)["unet"], **overrides}
    ours = models.build_unet(config)
    assert isinstance(ours, UNet2DConditionModel)
    state = {k: v.numpy() for k, v in TorchUNet.from_config(config).state_dict().items()}
    shapes = models.component_param_shapes("unet", ours)
    params = state_dict_to_flax(StateDict(state, dict.fromkeys(state, "unet"), "unet"), shapes)
    assert jax.tree.map(np.shape, params) == tree_shapes(ours) and len(jax.tree.leaves(params)) == len(state)


# --- UNet outputs against PyTorch ------------------------------------------------------------------------


def _inputs(side, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 4, side, side)).astype(np.float32), np.array([10, 700], np.int32),
            rng.standard_normal((2, 5, 32)).astype(np.float32))


@torch.no_grad()
def _torch_unet(tiny_sd, x, t, c):
    return tiny_sd.unet(torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(c)).sample.numpy()


def _apply(module, params, x, t, c):
    return np.asarray(jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c).sample)(params, x, t, c))


@pytest.fixture(scope="module")
def loaded_unets(tiny_sd1, tiny_sd2):
    """variant -> (config, params) converted from the PyTorch fixtures' unet/ folders."""
    out = {}
    for name, fixture in (("sd1", tiny_sd1), ("sd2", tiny_sd2)):
        _, config, params = load_unet_folder(fixture.path / "unet")
        out[name] = (config, params)
    return out


@pytest.mark.parametrize(
    "variant, side, impl",
    [("sd1", 32, "chunked"), ("sd1", 32, "dense"), ("sd2", 8, "chunked"), ("sd2", 8, "xla")],
)
def test_unet_matches_pytorch(variant, side, impl, loaded_unets, request):
    config, params = loaded_unets[variant]
    x, t, c = _inputs(side)
    ours = _apply(models.build_unet(config, attention=impl), params, x, t, c)
    err = rel_err(ours, _torch_unet(request.getfixturevalue(f"tiny_{variant}"), x, t, c))
    assert err <= UNET_RTOL, f"{variant} {side}x{side} {impl}: {err:.2e}"


def test_scalar_timestep_broadcasts_like_diffusers(loaded_unets):
    config, params = loaded_unets["sd1"]
    module = models.build_unet(config)
    x, _, c = _inputs(8)
    fn = jax.jit(lambda p, t: module.apply({"params": p}, x, t, c).sample)
    batch = fn(params, jnp.full((2,), 700, jnp.int32))
    for scalar in (700, jnp.int32(700), np.int64(700)):
        np.testing.assert_allclose(fn(params, scalar), batch, rtol=1e-5, atol=1e-6)


# --- attention implementations ----------------------------------------------------------------------------


def _reference_attention(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(sq, sk, heads, width, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, sq, heads, width)) * 2
    k, v = rng.standard_normal((2, sk, heads, width)) * 2, rng.standard_normal((2, sk, heads, width))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


SHAPES = {
    "self_1024_chunked_map": (1024, 1024, 2, 8),  # lax.map over pairs, 8 query chunks
    "self_600_unchunked_map": (600, 600, 2, 8),  # lax.map over pairs, 600 % 128 != 0: one chunk
    "cross_77_batched": (64, 77, 4, 16),  # small: batched path
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("impl", ["dense", "chunked", "xla", "fused", "auto"])
def test_attention_implementations_match_reference(impl, shape):
    q, k, v = _qkv(*SHAPES[shape])
    out = jax.jit(lambda q, k, v: A.attend(q, k, v, impl))(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, _reference_attention(q, k, v)) < 1e-5


def test_chunked_bfloat16_accumulates_in_float32():
    q, k, v = _qkv(1024, 1024, 2, 8, dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: A.attend(q, k, v, "chunked"))(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = _reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    assert rel_err(out.astype(jnp.float32), ref) < 2e-2


def test_chunked_gradient_matches_dense():
    q, k, v = _qkv(1024, 1024, 1, 8, seed=3)
    w = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)

    def grads(impl):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(A.attend(q, k, v, impl) * w), argnums=(0, 1, 2)))(q, k, v)

    for ours, ref in zip(grads("chunked"), grads("dense")):
        assert rel_err(ours, ref) < 1e-4


def test_auto_resolves_per_backend():
    assert A.resolve("auto", "cpu") == "chunked"
    assert A.resolve("auto", "gpu") == A.resolve("auto", "cuda") == "fused"
    assert A.resolve("auto", "tpu") == "xla"
    assert A.resolve("dense", "gpu") == "dense"
    assert A.resolve("auto") == ("chunked" if jax.default_backend() == "cpu" else A.resolve("auto", jax.default_backend()))


def test_bad_attention_choice_fails_cleanly():
    with pytest.raises(ValueError, match="'flash'"):
        A.resolve("flash")
    with pytest.raises(ConversionError, match="'flash'"):
        models.build_unet(tiny.tiny_configs("sd1")["unet"], attention="flash")
    q, k, v = _qkv(8, 8, 2, 4)
    with pytest.raises(ValueError, match="attention: need"):
        A.attend(q, k[:, :, :1], v)
