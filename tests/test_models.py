"""Our linen UNet (cfgbasin_jax.models.unet) and attention implementations against PyTorch diffusers.

Measured (max abs err / max abs of the PyTorch UNet output, float32, batch 2, 4 input seeds):
  ours 1.7e-5 to 3.5e-5 (tiny sd1 at 32x32 latents, self-attention over 1024 tokens on the chunked
  lax.map path: 1.8e-5). Bound: UNET_RTOL = 5e-5. diffusers' FlaxUNet2DConditionModel on the same
  weights (classic stack, tests/test_compat_diffusers_flax.py) gave 4.5e-5 to 6.1e-5: its GEGLU uses
  the tanh approximation of gelu, ours the exact one, as PyTorch.
Attention alone (float32, against a float64 numpy reference): <= 1e-6 relative.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cfgbasin_jax.models import attention as A
from cfgbasin_jax.models import builders as models
from cfgbasin_jax.models import tiny
from cfgbasin_jax.convert import ConversionError
from cfgbasin_jax.convert.mapping import state_dict_to_flax
from cfgbasin_jax.convert.weights import StateDict
from cfgbasin_jax.loading import load_unet_folder
from cfgbasin_jax.models.unet import UNet2DConditionModel

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
    params = state_dict_to_flax(StateDict.from_arrays(state, "unet"), shapes)
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
    "self_4096_chunked_map": (4096, 4096, 1, 8),  # lax.map over pairs, 16 chunks of 256 queries
    "self_1024_chunked_map": (1024, 1024, 2, 8),  # lax.map over pairs, 2 chunks of 512 queries
    "self_600_unchunked_map": (600, 600, 2, 8),  # lax.map over pairs, no chunk of 64..512 divides 600: one chunk
    "cross_77_batched": (64, 77, 4, 16),  # small: batched path
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("impl", ["dense", "chunked", "xla", "fused", "auto"])
def test_attention_implementations_match_reference(impl, shape):
    q, k, v = _qkv(*SHAPES[shape])
    out = jax.jit(lambda q, k, v: A.attend(q, k, v, impl))(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, _reference_attention(q, k, v)) < 1e-5


@pytest.mark.parametrize("sq, sk, isa, chunk", [
    (4096, 4096, "avx512", 256), (4096, 77, "avx512", 512), (1024, 1024, "avx512", 512),
    (2048, 2049, "avx512", 256), (2048, 2048, "avx512", 512), (768, 768, "avx512", 256),
    (600, 600, "avx512", 600), (320, 320, "avx512", 64), (100, 4096, "avx512", 100),
    (4096, 4096, "avx2", 256),                        # levels without an entry: the default
    (4096, 4096, "amx", 1024), (4096, 77, "amx", 512), (1024, 1024, "amx", 512),
    (2048, 2049, "amx", 1024), (768, 4096, "amx", 256), (100, 4096, "amx", 100),
])
def test_query_chunk_rule(sq, sk, isa, chunk):
    """Against more than 2048 keys 256 queries (1024 on "amx"), else 512; halved down to 64 until it
    divides Sq, else Sq."""
    assert A.query_chunk(sq, sk, isa) == chunk


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


# --- CLIP text encoder (cfgbasin_jax.models.clip) against transformers' PyTorch CLIPTextModel -----------------------
#
# Measured (max abs err / max |PyTorch|, float32, transformers 5.24; 3 prompts + 2 random id rows, and a
# right-padded batch with its attention mask), last_hidden_state / pooler_output:
#   sd1 (quick_gelu) 3.6e-7 / 3.4e-7, padded 4.2e-7 / 3.1e-7; legacy eos_token_id = 2 pooling 3.4e-7;
#   sd2 (gelu)       3.8e-7 / 2.3e-7, padded 2.6e-7 / 2.4e-7.   Bound: TEXT_RTOL = 1e-4.

TEXT_RTOL = 1e-4
TEXT_PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars", ""]


def _text_inputs(tokenizer, vocab_size):
    """{"ids": int [5, 77] (3 pipeline-tokenized prompts; a random row with BOS and one EOS; a random
    row with neither, where the two pooling rules differ), "short": int [3, 12] right-padded prompts,
    "mask": their padding mask}."""
    ids = tokenizer(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    rng = np.random.default_rng(5)
    random_rows = rng.integers(0, vocab_size - 2, (2, 77))
    random_rows[0, 0], random_rows[0, 40] = vocab_size - 2, vocab_size - 1
    short = tokenizer(TEXT_PROMPTS, padding="max_length", max_length=12, truncation=True, return_tensors="np")
    return {"ids": np.concatenate([ids, random_rows]).astype(np.int64),
            "short": short.input_ids.astype(np.int64), "mask": short.attention_mask.astype(np.int64)}


@torch.no_grad()
def _torch_text(model, ids, mask=None):
    out = model(input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _our_text(config, params, ids, mask=None):
    module = models.build_text_encoder(config)
    out = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))(params, jnp.asarray(ids, jnp.int32),
                                                                       None if mask is None else jnp.asarray(mask))
    return np.asarray(out.last_hidden_state), np.asarray(out.pooler_output)


def _text_params(tiny_sd):
    from cfgbasin_jax.convert import sd_folder
    from cfgbasin_jax.models.components import read_model_config

    folder = tiny_sd.path / "text_encoder"
    config = read_model_config(folder)
    shapes = models.component_param_shapes("text_encoder", models.build_text_encoder(config))
    return config, sd_folder.convert_weights(folder, "text_encoder", shapes)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_text_encoder_matches_pytorch(variant, request):
    tiny_sd = request.getfixturevalue(f"tiny_{variant}")
    config, params = _text_params(tiny_sd)
    assert config["hidden_act"] == ("gelu" if variant == "sd2" else "quick_gelu")
    x = _text_inputs(tiny_sd.tokenizer, config["vocab_size"])
    errors = {}
    for name, ids, mask in (("full", x["ids"], None), ("padded", x["short"], x["mask"])):
        ours, ref = _our_text(config, params, ids, mask), _torch_text(tiny_sd.text_encoder, ids, mask)
        errors[f"{name} last_hidden_state"] = rel_err(ours[0], ref[0])
        errors[f"{name} pooler_output"] = rel_err(ours[1], ref[1])
    assert max(errors.values()) <= TEXT_RTOL, errors
    # the padding mask matters (else the test could not tell it is applied)
    unmasked = _our_text(config, params, x["short"])[0]
    assert rel_err(unmasked, _torch_text(tiny_sd.text_encoder, x["short"], x["mask"])[0]) > 1e-3


def test_text_encoder_legacy_eos_pooling(tiny_sd1):
    """Configs with eos_token_id = 2 (transformers < 4.31) pool at the largest id, as PyTorch does."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config, params = _text_params(tiny_sd1)
    config = {**config, "eos_token_id": 2}
    legacy = CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()
    legacy.load_state_dict(tiny_sd1.text_encoder.state_dict())
    ids = _text_inputs(tiny_sd1.tokenizer, config["vocab_size"])["ids"]
    ours, ref = _our_text(config, params, ids), _torch_text(legacy, ids)
    assert rel_err(ours[1], ref[1]) <= TEXT_RTOL
    assert not np.allclose(ours[1], _our_text(tiny_sd1.text_encoder.config.to_dict(), params, ids)[1])


def test_text_encoder_param_tree_is_transformers_flax_layout():
    """FlaxCLIPTextModule's tree, restated: old converted checkpoints restore into it unchanged."""
    config = tiny.tiny_configs("sd1")["text_encoder"]
    width, inner = config["hidden_size"], config["intermediate_size"]
    dense = lambda n_in, n_out: {"kernel": (n_in, n_out), "bias": (n_out,)}  # noqa: E731
    norm = {"scale": (width,), "bias": (width,)}
    layer = {
        "self_attn": {name: dense(width, width) for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "layer_norm1": norm, "mlp": {"fc1": dense(width, inner), "fc2": dense(inner, width)}, "layer_norm2": norm,
    }
    expected = {"text_model": {
        "embeddings": {"token_embedding": {"embedding": (config["vocab_size"], width)},
                       "position_embedding": {"embedding": (config["max_position_embeddings"], width)}},
        "encoder": {"layers": {str(i): layer for i in range(config["num_hidden_layers"])}},
        "final_layer_norm": norm,
    }}
    assert tree_shapes(models.build_text_encoder(config), "text_encoder") == expected


def test_activations_match_transformers():
    from transformers.activations import ACT2FN

    from cfgbasin_jax.models.clip import ACTIVATIONS

    x = np.linspace(-6, 6, 1201, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        ref = ACT2FN[name](torch.from_numpy(x)).numpy()
        assert np.max(np.abs(np.asarray(fn(jnp.asarray(x))) - ref)) <= 2e-6, name


@pytest.mark.parametrize(
    "key, value",
    [
        ("hidden_act", "swiglu"),
        ("model_type", "bert"),
        ("architectures", ["CLIPTextModelWithProjection"]),
        ("position_embedding_type", "relative_key"),  # not a CLIP key: refused as unknown
        ("use_attention_mask", True),
        ("num_attention_heads", 5),
        ("hidden_size", "32"),
        ("layer_norm_eps", 0),
        ("eos_token_id", [49407, 49408]),
        ("pruned_heads", {"0": [1]}),
    ],
)
def test_unsupported_text_encoder_configs_name_key_and_value(key, value):
    config = {**tiny.tiny_configs("sd1")["text_encoder"], key: value}
    with pytest.raises(ConversionError) as info:
        models.build_text_encoder(config)
    message = str(info.value)
    assert message.startswith(f"text encoder config key {key!r} = {value!r}"), message


# The keys of SD 2.1's text_encoder/config.json (written by transformers 4.25): OpenCLIP-H's text tower
# with 23 of its 24 layers, gelu, the pre-4.31 eos_token_id = 2.
SD21_TEXT_ENCODER = {
    "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu",
    "hidden_size": 1024, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1, "projection_dim": 512,
    "torch_dtype": "float32", "transformers_version": "4.25.0.dev0", "vocab_size": 49408,
}


def test_text_config_reads_what_transformers_reads():
    """Keys a config leaves out take transformers' defaults; generic keys written by transformers load."""
    from transformers import CLIPTextConfig

    from cfgbasin_jax.models.clip import TextConfig, text_config

    for overrides in ({}, {"hidden_act": "gelu", "num_hidden_layers": 23, "eos_token_id": 2, "dropout": 0.0},
                      SD21_TEXT_ENCODER):
        full = CLIPTextConfig(**overrides).to_dict()  # every key transformers writes
        ours = text_config(full)
        assert ours == text_config(overrides)
        assert all(getattr(ours, f.name) == full[f.name] for f in dataclasses.fields(TextConfig))
    assert text_config(SD21_TEXT_ENCODER).num_hidden_layers == 23
