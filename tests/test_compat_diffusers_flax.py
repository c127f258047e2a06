"""Compatibility with the classic stack: our converted param trees load into diffusers' and
transformers' own Flax models (diffusers < 0.40, transformers < 5), which compute what ours compute.

Run with ``python -m pytest -m compat`` in an environment with the ``[diffusers-flax]`` extra;
skipped elsewhere (set CFGBASIN_REQUIRE_COMPAT=1 to make a missing class an error instead, as CI does).

Measured (float32, tiny random models converted by our converter; max abs difference / max |ours|):
  UNet: diffusers' FlaxUNet2DConditionModel vs ours 4.7e-5 (sd1 and sd2). The difference is the gelu
        of GEGLU (diffusers' Flax: tanh approximation; ours and PyTorch: exact): the mean relative
        error against PyTorch is 2.0e-5 for ours, 5.1e-5 (sd1) / 4.5e-5 (sd2) for diffusers' Flax UNet.
        Bound: UNET_RTOL = 2e-4, and ours below 0.6x diffusers' Flax error against PyTorch.
  VAE:  diffusers' FlaxAutoencoderKL vs ours: encode mean / logvar 3.2e-7 to 3.8e-7, decode 1.1e-6
        (sd1) / 1.6e-6 (sd2). Bound: EXACT_RTOL = 1e-5.
  text: transformers' FlaxCLIPTextModel vs our pipeline's prompt encoding (our CLIP text encoder,
        cfgbasin_jax.models.clip): 2.6e-7 (sd1), 3.0e-7 (sd2). Bound: EXACT_RTOL.
The figures are printed by ``python -m pytest -m compat -s``.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.compat

try:
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, FlaxCLIPTextModel
except ImportError as err:  # diffusers >= 0.40 / transformers >= 5: no Flax classes
    if os.environ.get("CFGBASIN_REQUIRE_COMPAT") == "1":
        raise
    pytest.skip(f"diffusers' / transformers' Flax classes are not importable ({err})", allow_module_level=True)

from test_models import UNET_VARIANTS  # noqa: E402

import cfgbasin_jax  # noqa: E402
from cfgbasin_jax.models import builders as models  # noqa: E402
from cfgbasin_jax.models import tiny

UNET_RTOL = 2e-4
EXACT_RTOL = 1e-5
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars"]


def rel_err(theirs, ours) -> float:
    theirs, ours = np.asarray(theirs, np.float64), np.asarray(ours, np.float64)
    assert theirs.shape == ours.shape
    return float(np.max(np.abs(theirs - ours)) / np.max(np.abs(ours)))


def shapes(module, *inputs):
    return jax.tree.map(lambda s: s.shape, models.param_shapes(module, *inputs))


@pytest.fixture(scope="module")
def pipes(tiny_sd1_converted, tiny_sd2):
    """variant -> our Pipeline over a converted directory (sd1) / a diffusers folder (sd2)."""
    return {"sd1": cfgbasin_jax.load_pipeline(tiny_sd1_converted), "sd2": cfgbasin_jax.load_pipeline(tiny_sd2.path)}


def _unet_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 4, 8, 8)).astype(np.float32), np.array([10, 700], np.int32),
            rng.standard_normal((2, 5, 32)).astype(np.float32))


def _unet_out(module, params, x, t, c):
    return np.asarray(jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c).sample)(params, x, t, c))


# --- parameter trees -------------------------------------------------------------------------------------

SD_VAE = {"block_out_channels": [32, 64, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2}


@pytest.mark.parametrize("name", sorted(UNET_VARIANTS))
def test_unet_param_tree_equals_diffusers_flax(name):
    variant, overrides = UNET_VARIANTS[name]
    config = {**tiny.tiny_configs(variant)["unet"], **overrides}
    ours = models.build_unet(config)
    theirs = FlaxUNet2DConditionModel(**models.unet_flax_kwargs(config))
    assert models.component_param_shapes("unet", ours) == models.component_param_shapes("unet", theirs)


@pytest.mark.parametrize("overrides", [{}, SD_VAE], ids=["tiny", "sd_shaped"])
def test_vae_param_tree_equals_diffusers_flax(overrides):
    config = {**tiny.tiny_configs("sd1")["vae"], **overrides}
    image = jax.ShapeDtypeStruct((1, 3, 16, 16), jnp.float32)
    theirs = FlaxAutoencoderKL(**models.vae_flax_kwargs(config))
    assert shapes(models.build_vae(config), image) == shapes(theirs, image)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_text_encoder_param_tree_equals_transformers_flax(variant, pipes):
    ours = jax.tree.map(np.shape, pipes[variant].params["text_encoder"])
    module = FlaxCLIPTextModel(CLIPTextConfig.from_dict(tiny.tiny_configs(variant)["text_encoder"]), _do_init=False).module
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    assert ours == shapes(module, ids, ids, ids)


# --- outputs on our converted params ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_diffusers_flax_unet_on_our_params(variant, pipes, request):
    pipe = pipes[variant]
    config, params = pipe.components.configs["unet"], pipe.params["unet"]
    x, t, c = _unet_inputs()
    ours = _unet_out(pipe.components.unet, params, x, t, c)
    theirs = _unet_out(FlaxUNet2DConditionModel(**models.unet_flax_kwargs(config)), params, x, t, c)
    err = rel_err(theirs, ours)
    print(f"{variant} UNet diffusers Flax vs ours: {err:.1e}")
    assert err <= UNET_RTOL, f"{variant}: {err:.2e}"

    # the difference is diffusers' tanh gelu: ours is the closer one to PyTorch
    with torch.no_grad():
        tiny_sd = request.getfixturevalue(f"tiny_{variant}")
        ref = tiny_sd.unet(*(torch.from_numpy(a) for a in (x, t.astype(np.int64), c))).sample.numpy()
    mean_err = lambda out: float(np.mean(np.abs(out - ref)) / np.mean(np.abs(ref)))  # noqa: E731
    print(f"{variant} UNet mean rel err vs PyTorch: ours {mean_err(ours):.1e}, diffusers Flax {mean_err(theirs):.1e}")
    assert mean_err(ours) < 0.6 * mean_err(theirs)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_diffusers_flax_vae_on_our_params(variant, pipes):
    pipe = pipes[variant]
    params, ours = pipe.params["vae"], pipe.components.vae
    theirs = FlaxAutoencoderKL(**models.vae_flax_kwargs(pipe.components.configs["vae"]))
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)

    def outputs(module):
        dist = module.apply({"params": params}, image, method=module.encode).latent_dist
        return dist.mean, dist.logvar, module.apply({"params": params}, latents, method=module.decode).sample

    got, want = outputs(theirs), outputs(ours)
    for what, g, w in zip(("encode mean", "encode logvar", "decode"), got, want):
        err = rel_err(g, w)
        print(f"{variant} VAE {what} diffusers Flax vs ours: {err:.1e}")
        assert err <= EXACT_RTOL, f"{variant} {what}: {err:.2e}"


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_transformers_flax_clip_on_our_params(variant, pipes):
    pipe = pipes[variant]
    config = CLIPTextConfig.from_dict(pipe.components.configs["text_encoder"])
    ids = pipe.tokenize(PROMPTS)
    theirs = FlaxCLIPTextModel(config, _do_init=False)(ids, params=pipe.params["text_encoder"]).last_hidden_state
    err = rel_err(theirs, pipe.encode_prompts(PROMPTS))
    print(f"{variant} text encoder transformers Flax vs ours: {err:.1e}")
    assert err <= EXACT_RTOL, f"{variant}: {err:.2e}"
