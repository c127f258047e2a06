"""Build the Flax Stable Diffusion modules from diffusers / transformers config dicts.

Configs are the dicts found in a diffusers folder (`unet/config.json`, `vae/config.json`,
`text_encoder/config.json`), i.e. the PyTorch models' configs. They are validated here: an option
the Flax modules cannot honour raises one `ConversionError` naming the config key.

Naming quirk (diffusers issue 2011): in both the PyTorch and the Flax UNet, `attention_head_dim`
is the NUMBER of attention heads per block (head width = block channels // attention_head_dim);
`num_attention_heads` is refused by both. The parity tests check this on an SD2-style per-block
tuple.

The UNet and the VAE are this project's own linen modules (:mod:`cfgbasin_jax.models.unet`,
:mod:`cfgbasin_jax.models.vae`) with diffusers' Flax parameter trees (``FlaxUNet2DConditionModel``,
``FlaxAutoencoderKL``), the attention implementation chosen per backend (:mod:`cfgbasin_jax.models.attention`)
and PyTorch's exact gelu. Nothing here imports diffusers.

Parameter shapes come from `jax.eval_shape` (`param_shapes`): nothing is initialised to learn them.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from cfgbasin_jax.models.errors import ConversionError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# --- UNet ------------------------------------------------------------------------------------------

# Keys copied onto the Flax UNet (ours, and diffusers' FlaxUNet2DConditionModel) as they are.
_UNET_FLAX_KEYS = (
    "sample_size",
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "block_out_channels",
    "layers_per_block",
    "attention_head_dim",
    "cross_attention_dim",
    "dropout",
    "use_linear_projection",
    "flip_sin_to_cos",
    "freq_shift",
    "transformer_layers_per_block",
    "use_memory_efficient_attention",  # Flax-only options, honoured when present
    "split_head_dim",
)

# PyTorch options the Flax UNet implements only at these values (its hard-wired behaviour).
_UNET_FIXED = {
    "num_attention_heads": (None,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu",),
    "norm_num_groups": (32,),
    "norm_eps": (1e-5,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}

# Accepted and ignored. upcast_attention (SD 2.1) only changes fp16 attention-score precision in
# PyTorch: a no-op in float32; the Flax attention computes in the module dtype.
# addition_embed_type_num_heads is unused while addition_embed_type is None (checked above).
_UNET_IGNORED = ("upcast_attention", "addition_embed_type_num_heads")

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# --- VAE -------------------------------------------------------------------------------------------

_VAE_FLAX_KEYS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
)
_VAE_FIXED = {
    "act_fn": ("silu",),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}
# force_upcast only tells PyTorch pipelines to run the VAE in float32.
_VAE_IGNORED = ("force_upcast",)

def resolve_dtype(dtype: Any) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' (or the jnp dtype itself) -> jnp.dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise ConversionError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}") from None
    if resolved.name not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return resolved


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _check_fixed(config: Mapping, fixed: Mapping, what: str) -> None:
    for key, allowed in fixed.items():
        if key in config and config[key] not in allowed:
            raise ConversionError(
                f"{what} config key {key!r} = {config[key]!r} is not supported by the Flax model "
                f"(supported: {', '.join(repr(v) for v in allowed)})"
            )


def _check_known(config: Mapping, known, what: str) -> None:
    for key in config:
        if not key.startswith("_") and key not in known:
            raise ConversionError(f"{what} config key {key!r} = {config[key]!r} is unknown to the Flax model")


def _per_block(config: Mapping, key: str, n_blocks: int, what: str) -> None:
    value = config.get(key)
    if isinstance(value, (list, tuple)):
        if len(value) != n_blocks or not all(isinstance(v, int) for v in value):
            raise ConversionError(f"{what} config key {key!r} = {value!r}: need one int per block ({n_blocks})")
    elif value is not None and not isinstance(value, int):
        raise ConversionError(f"{what} config key {key!r} = {value!r}: need an int or one int per block")


def _check_blocks(config: Mapping, what: str, down_allowed, up_allowed) -> int:
    """The down/up block types and block_out_channels: one length, each type implemented here.
    Returns the number of blocks."""
    down = tuple(config.get("down_block_types", ()))
    up = tuple(config.get("up_block_types", ()))
    channels = tuple(config.get("block_out_channels", ()))
    if not down or len(down) != len(up) or len(down) != len(channels):
        raise ConversionError(
            f"{what} config keys 'down_block_types', 'up_block_types', 'block_out_channels' need the same "
            f"non-zero length (got {len(down)}, {len(up)}, {len(channels)})"
        )
    for key, types, allowed in (("down_block_types", down, down_allowed), ("up_block_types", up, up_allowed)):
        for block_type in types:
            if block_type not in allowed:
                raise ConversionError(
                    f"{what} config key {key!r}: block type {block_type!r} has no Flax implementation "
                    f"(supported: {', '.join(allowed)})"
                )
    return len(down)


def unet_flax_kwargs(config: Mapping) -> dict:
    """Validate a diffusers UNet2DConditionModel config; return the Flax UNet's kwargs (accepted by
    both :class:`cfgbasin_jax.models.unet.UNet2DConditionModel` and diffusers' FlaxUNet2DConditionModel)."""
    what = "UNet"
    _check_known(config, set(_UNET_FLAX_KEYS) | set(_UNET_FIXED) | set(_UNET_IGNORED), what)
    _check_fixed(config, _UNET_FIXED, what)
    n_blocks = _check_blocks(config, what, _DOWN_BLOCKS, _UP_BLOCKS)
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in _MID_BLOCKS:
        raise ConversionError(
            f"{what} config key 'mid_block_type' = {config['mid_block_type']!r} has no Flax implementation"
        )
    for key in ("sample_size", "layers_per_block", "cross_attention_dim"):
        if key in config and not isinstance(config[key], int):
            raise ConversionError(f"{what} config key {key!r} = {config[key]!r}: the Flax UNet needs an int")
    _per_block(config, "attention_head_dim", n_blocks, what)
    _per_block(config, "transformer_layers_per_block", n_blocks, what)
    return {key: _as_tuple(config[key]) for key in _UNET_FLAX_KEYS if key in config}


def vae_flax_kwargs(config: Mapping) -> dict:
    """Validate a diffusers AutoencoderKL config; return the Flax VAE's kwargs (accepted by both
    :class:`cfgbasin_jax.models.vae.AutoencoderKL` and diffusers' FlaxAutoencoderKL)."""
    what = "VAE"
    _check_known(config, set(_VAE_FLAX_KEYS) | set(_VAE_FIXED) | set(_VAE_IGNORED), what)
    _check_fixed(config, _VAE_FIXED, what)
    _check_blocks(config, what, ("DownEncoderBlock2D",), ("UpDecoderBlock2D",))
    for key in ("sample_size", "layers_per_block", "latent_channels", "norm_num_groups"):
        if key in config and not isinstance(config[key], int):
            raise ConversionError(f"{what} config key {key!r} = {config[key]!r}: the Flax VAE needs an int")
    return {key: _as_tuple(config[key]) for key in _VAE_FLAX_KEYS if key in config}


def text_encoder_config(config: Mapping):
    """Validate a transformers CLIPTextModel config dict; return :class:`cfgbasin_jax.models.clip.TextConfig`."""
    from cfgbasin_jax.models.clip import text_config

    return text_config(config, "text encoder", architectures=("CLIPTextModel",))


def build_unet(config: Mapping, dtype: Any = "float32", attention: str = "auto"):
    """The UNet (linen module, :class:`cfgbasin_jax.models.unet.UNet2DConditionModel`) computing in `dtype`,
    from a diffusers UNet config. Its parameter tree is diffusers' FlaxUNet2DConditionModel's.

    attention: "auto" (per backend: chunked on CPU, cuDNN-fused on GPU, XLA on TPU) or one of
    :data:`cfgbasin_jax.models.attention.IMPLEMENTATIONS`.
    """
    from cfgbasin_jax.models.unet import UNet2DConditionModel

    return UNet2DConditionModel(**unet_flax_kwargs(config), attention=_attention(attention), dtype=resolve_dtype(dtype))


def _attention(attention: str) -> str:
    from cfgbasin_jax.models.attention import IMPLEMENTATIONS

    if attention not in IMPLEMENTATIONS:
        raise ConversionError(f"unknown attention implementation {attention!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    return attention


def build_vae(config: Mapping, dtype: Any = "float32", attention: str = "auto"):
    """The VAE (linen module, :class:`cfgbasin_jax.models.vae.AutoencoderKL`) computing in `dtype`, from a
    diffusers AutoencoderKL config. Its parameter tree is diffusers' FlaxAutoencoderKL's.

    attention: the mid-block attention implementation, as for :func:`build_unet`.
    """
    from cfgbasin_jax.models.vae import AutoencoderKL

    return AutoencoderKL(**vae_flax_kwargs(config), attention=_attention(attention), dtype=resolve_dtype(dtype))


def build_text_encoder(config_dict: Mapping, dtype: Any = "float32"):
    """The CLIP text encoder (linen module, :class:`cfgbasin_jax.models.clip.CLIPTextModel`) computing in
    `dtype`, from a transformers CLIPTextModel config. Its parameter tree is transformers'
    FlaxCLIPTextModule's."""
    from cfgbasin_jax.models.clip import CLIPTextModel

    return CLIPTextModel(config=text_encoder_config(config_dict), dtype=resolve_dtype(dtype))


BUILDERS = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder}


def build_module(kind: str, config: Mapping, dtype: Any = "float32"):
    """build_unet / build_vae / build_text_encoder by component name."""
    if kind not in BUILDERS:
        raise ConversionError(f"unknown component {kind!r}: use one of {', '.join(BUILDERS)}")
    return BUILDERS[kind](config, dtype)


def check_compatible(configs: Mapping[str, Mapping]) -> None:
    """The UNet must read the text encoder's states and the VAE's latents."""
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    cross_dim, hidden = unet.get("cross_attention_dim", 1280), text.get("hidden_size", 512)
    if cross_dim != hidden:
        raise ConversionError(
            f"UNet config key 'cross_attention_dim' = {cross_dim} does not match the text encoder's "
            f"'hidden_size' = {hidden}"
        )
    in_channels, latent = unet.get("in_channels", 4), vae.get("latent_channels", 4)
    if in_channels != latent:
        raise ConversionError(
            f"UNet config key 'in_channels' = {in_channels} does not match the VAE's 'latent_channels' = {latent}"
        )


def example_inputs(kind: str, module) -> tuple:
    """Abstract (ShapeDtypeStruct) batch-1 inputs that trace `module.__call__`.

    unet: sample (1, C, S, S), timesteps (1,) int32, encoder states (1, 1, D);
    vae: image (1, C, S, S); text_encoder: input_ids, attention_mask, position_ids (1, 8) int32.
    """
    spec = jax.ShapeDtypeStruct
    if kind == "unet":
        side = 2 ** len(module.block_out_channels)
        return (
            spec((1, module.in_channels, side, side), jnp.float32),
            spec((1,), jnp.int32),
            spec((1, 1, module.cross_attention_dim), jnp.float32),
        )
    if kind == "vae":
        side = 2 ** len(module.block_out_channels)
        return (spec((1, module.in_channels, side, side), jnp.float32),)
    if kind == "text_encoder":
        ids = spec((1, min(8, module.config.max_position_embeddings)), jnp.int32)
        return (ids, ids, ids)
    raise ConversionError(f"unknown component {kind!r}: use one of {', '.join(BUILDERS)}")


def param_shapes(module, *inputs, dtype: Any = None) -> dict:
    """Nested dict of jax.ShapeDtypeStruct: the module's "params" tree, via jax.eval_shape.

    `inputs` are (abstract) call arguments; `dtype` overrides the leaves' dtype (Flax inits float32).
    """
    init = functools.partial(module.init, jax.random.PRNGKey(0))
    shapes = jax.eval_shape(init, *inputs)["params"]
    if dtype is not None:
        target = resolve_dtype(dtype)
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, target), shapes)
    return _plain_dict(shapes)


def component_param_shapes(kind: str, module, dtype: Any = None) -> dict:
    """param_shapes with the example inputs of component `kind`."""
    return param_shapes(module, *example_inputs(kind, module), dtype=dtype)


def _plain_dict(tree):
    if isinstance(tree, Mapping):
        return {key: _plain_dict(value) for key, value in tree.items()}
    return tree
