"""Our VAE (cfgbasin_jax.models.vae) against PyTorch diffusers' AutoencoderKL on tiny random models.

The PyTorch model is saved as a diffusers vae/ folder (safetensors) and converted by our converter,
so the check covers the parameter mapping too. Measured (float32, max abs err / max |reference|, CPU;
printed by `python -m pytest tests/test_vae.py -s -k matches`):
  sd1 tiny: encode mean 9.2e-7, logvar 1.0e-6, decode 2.3e-6 (8x8 latents) and 2.3e-6 (32x32 latents,
  1024-token mid-block attention on the chunked path); sd2 tiny: 1.0e-6, 9.5e-7, 2.2e-6;
  SD-shaped (4 levels, 2 resnets per level, 16 groups): 1.2e-6, 1.6e-6, 4.3e-6.
Bound: RTOL = 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_sd import build_torch_vae

from cfgbasin_jax.models import builders as models
from cfgbasin_jax.models import tiny
from cfgbasin_jax.convert import ConversionError, sd_folder
from cfgbasin_jax.models.components import read_model_config
from cfgbasin_jax.models.vae import AutoencoderKL, DiagonalGaussian, decoder_stages

RTOL = 1e-4

SD_SHAPED = {  # SD's VAE layout (4 levels, 2 resnets each, factor 8) at small widths
    **tiny.tiny_configs("sd2")["vae"],
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "sample_size": 32,
}
CONFIGS = {"sd1": tiny.tiny_configs("sd1")["vae"], "sd2": tiny.tiny_configs("sd2")["vae"], "sd_shaped": SD_SHAPED}
SEEDS = {"sd1": 0, "sd2": 2, "sd_shaped": 5}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """name -> (PyTorch AutoencoderKL, our module, converted params)."""
    out = {}
    for name, config in CONFIGS.items():
        torch_vae = build_torch_vae(config, SEEDS[name])
        folder = tmp_path_factory.mktemp(f"vae_{name}") / "vae"
        torch_vae.save_pretrained(folder, safe_serialization=True)
        ours = models.build_vae(read_model_config(folder))
        params = sd_folder.convert_weights(folder, "vae", models.component_param_shapes("vae", ours))
        out[name] = (torch_vae, ours, jax.tree.map(jnp.asarray, params))
    return out


def _image(config, seed=0):
    side = 2 ** len(config["block_out_channels"]) * 2
    return np.random.default_rng(seed).uniform(-1, 1, (2, 3, side, side)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_matches_pytorch(name, vaes):
    torch_vae, ours, params = vaes[name]
    image = _image(CONFIGS[name])
    with torch.no_grad():
        ref = torch_vae.encode(torch.from_numpy(image)).latent_dist
    dist = jax.jit(lambda p, x: ours.apply({"params": p}, x, method=ours.encode).latent_dist)(params, image)
    assert isinstance(dist, DiagonalGaussian)
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    for what, got, want in (("mean", dist.mean, ref.mean), ("logvar", dist.logvar, ref.logvar), ("std", dist.std, ref.std)):
        err = rel_err(nchw(got), want.numpy())
        print(f"{name} encode {what}: {err:.1e}")
        assert err <= RTOL, f"{name} {what}: {err:.2e}"


@pytest.mark.parametrize("name, latent_side", [("sd1", 8), ("sd2", 8), ("sd_shaped", 4), ("sd1", 32)])
def test_decode_matches_pytorch(name, latent_side, vaes):
    torch_vae, ours, params = vaes[name]
    z = np.random.default_rng(1).standard_normal((2, 4, latent_side, latent_side)).astype(np.float32)
    with torch.no_grad():
        ref = torch_vae.decode(torch.from_numpy(z)).sample.numpy()
    nhwc = np.transpose(z, (0, 2, 3, 1))
    got = jax.jit(lambda p, z: ours.apply({"params": p}, z, method=ours.decode).sample)(params, nhwc)
    err = rel_err(got, ref)
    print(f"{name} decode {latent_side}x{latent_side}: {err:.1e}")
    assert err <= RTOL, f"{name} decode at {latent_side}x{latent_side}: {err:.2e}"
    staged = nhwc  # the pipeline's decode: the same layers compiled stage by stage
    for stage in decoder_stages(ours):
        staged = jax.jit(stage)(params, staged)
    assert rel_err(staged, ref) <= RTOL, f"{name} staged decode at {latent_side}x{latent_side}"


def test_nchw_latents_and_posterior_sampling(vaes):
    _, ours, params = vaes["sd1"]
    z = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    decode = jax.jit(lambda p, z: ours.apply({"params": p}, z, method=ours.decode).sample)
    np.testing.assert_array_equal(decode(params, z), decode(params, np.transpose(z, (0, 2, 3, 1))))
    dist = DiagonalGaussian.from_moments(jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 99.0)], -1))
    assert float(dist.logvar.max()) == 20.0  # clipped as in diffusers
    draws = dist.sample(jax.random.PRNGKey(0))
    assert draws.shape == (1, 2, 2, 4) and float(jnp.abs(draws).max()) > 1.0
    assert np.array_equal(dist.mode(), dist.mean)
    full = ours.apply({"params": params}, _image(CONFIGS["sd1"]), sample_posterior=True, rngs={"gaussian": jax.random.PRNGKey(0)})
    assert full.sample.shape == (2, 3, 8, 8)


def test_param_tree_is_diffusers_flax_layout():
    """The leaf paths diffusers' FlaxAutoencoderKL has (its module names, spelled out here)."""
    shapes = models.component_param_shapes("vae", models.build_vae(CONFIGS["sd1"]))
    paths = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    for path in (
        "encoder/conv_in/kernel", "encoder/down_blocks_0/resnets_0/norm1/scale",
        "encoder/down_blocks_0/downsamplers_0/conv/kernel", "encoder/down_blocks_1/resnets_0/conv_shortcut/kernel",
        "encoder/mid_block/attentions_0/query/kernel", "encoder/mid_block/attentions_0/proj_attn/bias",
        "encoder/mid_block/attentions_0/group_norm/bias", "encoder/mid_block/resnets_1/conv2/bias",
        "encoder/conv_norm_out/scale", "encoder/conv_out/kernel", "quant_conv/kernel", "post_quant_conv/bias",
        "decoder/up_blocks_0/resnets_1/conv1/kernel", "decoder/up_blocks_0/upsamplers_0/conv/kernel",
        "decoder/up_blocks_1/resnets_0/conv_shortcut/kernel", "decoder/conv_out/bias",
    ):
        assert path in paths, path
    assert not any("upsamplers" in p for p in paths if p.startswith("decoder/up_blocks_1/"))
    assert "decoder/up_blocks_0/resnets_2/conv1/kernel" not in paths  # layers_per_block + 1 = 2 resnets
    assert shapes["quant_conv"]["kernel"].shape == (1, 1, 8, 8)


@pytest.mark.parametrize(
    "key, value",
    [
        ("act_fn", "gelu"),
        ("mid_block_add_attention", False),
        ("use_quant_conv", False),
        ("shift_factor", 0.1159),
        ("latents_mean", [0.0] * 4),
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("norm_type", "spatial"),
        ("layers_per_block", 1.5),
    ],
)
def test_unsupported_vae_options_name_the_key_and_value(key, value):
    with pytest.raises(ConversionError) as info:
        models.build_vae({**CONFIGS["sd1"], key: value})
    message = str(info.value)
    assert message.count("\n") == 0 and repr(key) in message
    shown = value[-1] if key == "down_block_types" else value
    assert repr(shown) in message, message


def test_ignored_options_and_attention_choice():
    vae = models.build_vae({**CONFIGS["sd1"], "force_upcast": False, "_class_name": "AutoencoderKL"}, attention="dense")
    assert isinstance(vae, AutoencoderKL) and vae.attention == "dense"
    with pytest.raises(ConversionError, match="'flash'"):
        models.build_vae(CONFIGS["sd1"], attention="flash")
