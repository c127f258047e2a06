"""Tiny Stable-Diffusion-architecture models for tests, demos and benchmarks (no torch, no network).

`tiny_configs(variant)` gives diffusers/transformers config dicts of an SD-shaped model small enough
for CPU: UNet with one cross-attention and one plain block (channels 32, 64), a two-level VAE
(downsampling factor 2), a 2-layer 32-wide CLIP text encoder and the variant's scheduler config.
  sd1: epsilon prediction, int attention_head_dim, quick_gelu, SD 1.4's PNDM scheduler config;
  sd2: v_prediction (SD 2.1's DDIM config), per-block head counts, linear projections, gelu.
`write_tiny_tokenizer(dir)` writes a small byte-level CLIP BPE vocabulary (cfgbasin_jax.models.tokenizer); `random_components`
returns randomly initialised `Components` (seeded, shapes from eval_shape, no torch).
"""

from __future__ import annotations

import copy
import math
import tempfile
from functools import lru_cache
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfgbasin_jax.models.components import COMPONENTS, Components, pixel_components
from cfgbasin_jax.models.builders import build_module, check_compatible, component_param_shapes, resolve_dtype
from cfgbasin_jax.models.tokenizer import bpe_vocabulary, load_tokenizer, write_bpe_tokenizer

VARIANTS = ("sd1", "sd2")
MODEL_MAX_LENGTH = 77

# Words whose BPE merges the tiny vocabulary contains (everything else falls back to bytes).
_WORDS = (
    "a an the of in on at with and by is to photo picture image painting portrait drawing cat dog "
    "horse bird astronaut man woman person riding sitting standing city night sky starry sunset beach "
    "mountain forest river tree flower house car red blue green white black oil style van gogh high "
    "quality detailed landscape mars moon"
).split()

SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@lru_cache(maxsize=1)
def tiny_vocab_size() -> int:
    """Number of tokens of the tiny tokenizer (= the tiny text encoder's vocab_size)."""
    return len(bpe_vocabulary(_WORDS)[0])


def write_tiny_tokenizer(directory) -> None:
    """Write the tiny CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json; model_max_length 77) so that `load_tokenizer(directory)` works offline."""
    write_bpe_tokenizer(directory, _WORDS, MODEL_MAX_LENGTH)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}: use one of {', '.join(VARIANTS)}")


def unet_config(sample_size: int, channels: int, attention: Sequence[bool], cross_attention_dim: int,
                attention_head_dim, block_out_channels: Sequence[int] = (32, 64), **options) -> dict:
    """A small ``UNet2DConditionModel`` config dict: one resnet per level, level i with cross-attention
    when ``attention[i]`` (the up path mirrors the down path), ``channels`` in and out (4: latents,
    3: RGB pixels); ``options`` are further diffusers keys (norm_num_groups, use_linear_projection, ...)."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": channels,
        "out_channels": channels,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [block.replace("Down", "Up") for block in reversed(down)],
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": attention_head_dim,
        **options,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def text_encoder_config(width: int, intermediate_size: int, layers: int, heads: int, vocab_size: int,
                        max_length: int = MODEL_MAX_LENGTH, hidden_act: str = "quick_gelu") -> dict:
    """A small ``CLIPTextModel`` config dict (transformers format): projection width = ``width``;
    BOS and EOS/padding are the vocabulary's last two tokens (as :func:`bpe_vocabulary` lays it out)."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": width,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": max_length,
        "vocab_size": vocab_size,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": width,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def tiny_configs(variant: str = "sd1") -> dict:
    """{"unet", "vae", "text_encoder", "scheduler"} config dicts (diffusers / transformers format)."""
    _check_variant(variant)
    sd2 = variant == "sd2"
    vocab_size = tiny_vocab_size()
    unet = unet_config(sample_size=8, channels=4, attention=(True, False), cross_attention_dim=32,
                       # Head COUNTS (diffusers' naming quirk): sd1 4 heads everywhere; sd2 2 then 4 heads (width 16).
                       attention_head_dim=[2, 4] if sd2 else 4,
                       norm_num_groups=32, use_linear_projection=sd2, upcast_attention=sd2)
    vae = {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 16,
        "scaling_factor": 0.18215,
    }
    text_encoder = text_encoder_config(width=32, intermediate_size=37, layers=2, heads=4, vocab_size=vocab_size,
                                       hidden_act="gelu" if sd2 else "quick_gelu")
    scheduler = copy.deepcopy(SD2_SCHEDULER if sd2 else SD1_SCHEDULER)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def load_bpe_tokenizer(words: Sequence[str], model_max_length: int = MODEL_MAX_LENGTH):
    """A CLIP BPE tokenizer of ``words`` (:func:`write_bpe_tokenizer`), written to a temporary
    directory and loaded from there."""
    with tempfile.TemporaryDirectory(prefix="cfgbasin_tiny_tok_") as tmp:
        write_bpe_tokenizer(tmp, words, model_max_length)
        return load_tokenizer(tmp)


def load_tiny_tokenizer():
    """The tiny CLIP tokenizer (:func:`load_bpe_tokenizer` of the tiny vocabulary)."""
    return load_bpe_tokenizer(_WORDS, MODEL_MAX_LENGTH)


def random_params(shapes, seed=0, dtype="float32") -> dict:
    """Random params for a tree of ShapeDtypeStruct leaves named like Flax's (no init trace).

    kernel: lecun-normal (N(0, 1/fan_in), fan_in = prod(shape[:-1])); bias: 0; scale: 1;
    embedding: N(0, 0.02^2). The families Flax's own initialisers use, drawn on the host with
    numpy (seeded) straight from the eval_shape tree: nothing is traced or compiled.
    """
    dtype = resolve_dtype(dtype)
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    values = []
    for path, spec in leaves:
        name = path[-1].key
        if name == "kernel":
            fan_in = max(1, math.prod(spec.shape[:-1]))
            value = rng.standard_normal(spec.shape) / math.sqrt(fan_in)
        elif name == "embedding":
            value = 0.02 * rng.standard_normal(spec.shape)
        elif name == "scale":
            value = np.ones(spec.shape)
        elif name == "bias":
            value = np.zeros(spec.shape)
        else:
            raise ValueError(f"no random init rule for parameter {jax.tree_util.keystr(path)}")
        values.append(jnp.asarray(value.astype(np.float32).astype(dtype)))
    return jax.tree_util.tree_unflatten(treedef, values)


def random_components(variant: str = "sd1", seed: int = 0, dtype="float32", configs: dict | None = None,
                      tokenizer=None) -> Components:
    """Tiny SD components with random params (`random_params`, seeded), no torch. `configs` (the
    same keys as tiny_configs) builds another architecture, e.g. SD 1.5's; without a "vae" it is a
    pixel-space model (`vae = None`, as `pixel_components`). `tokenizer`: default the tiny one.
    Component i of those present (in COMPONENTS order) draws from seed [seed, i]."""
    configs = tiny_configs(variant) if configs is None else configs
    dtype = resolve_dtype(dtype)
    kinds = [kind for kind in COMPONENTS if configs.get(kind) is not None]
    tokenizer = load_tiny_tokenizer() if tokenizer is None else tokenizer
    source = f"random:{variant}:seed={seed}"
    model_configs = {kind: configs[kind] for kind in kinds}
    if "vae" in kinds:
        check_compatible(model_configs)
    modules = {kind: build_module(kind, model_configs[kind], dtype) for kind in kinds}
    params = {
        kind: random_params(component_param_shapes(kind, modules[kind]), seed=[seed, index], dtype=dtype)
        for index, kind in enumerate(kinds)
    }
    if "vae" not in kinds:
        return pixel_components(configs, params, tokenizer, dtype, source=source)
    return Components(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=tokenizer,
        params=params,
        configs=model_configs,
        scheduler_config=configs["scheduler"],
        dtype=dtype,
        source=source,
    )
