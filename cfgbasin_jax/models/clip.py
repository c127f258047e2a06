"""CLIP as flax.linen modules, with the parameter trees of transformers' (removed) Flax CLIP.

* :class:`CLIPTextModel`: the text encoder of Stable Diffusion. Its params are those of transformers'
  bare `FlaxCLIPTextModule`: ``{"text_model": {"embeddings", "encoder": {"layers": {"0", ...}},
  "final_layer_norm"}}``. SD 1.x uses OpenAI's CLIP-L (quick_gelu, 12 layers); SD 2.x uses OpenCLIP-H's
  text tower (gelu). diffusers' SD2 config has 23 of its 24 layers, so that the last hidden state is
  the penultimate layer's output. Both `StableDiffusionPipeline` versions (without `clip_skip`) read
  ``last_hidden_state``: the last layer's output after `final_layer_norm`. That is output 0 here.
* :class:`CLIPModel`: image and text towers, projections and logit scale. Its params are those of
  transformers' `FlaxCLIPModule` (`FlaxCLIPModel.params`). The CLIP score uses it.

The computation follows transformers' PyTorch `CLIPTextModel` / `CLIPModel`: pre-LayerNorm blocks,
causal self-attention in the text tower (plus an optional padding mask on the keys), attention scores
and softmax in float32, and the EOS-token pooling rule (``eos_token_id == 2``, as in old configs: the
argmax of the ids).

Configs are transformers' config dicts, validated by :func:`text_config` / :func:`clip_config`. A key
or value that would change the computation and is not implemented raises one
:class:`~cfgbasin_jax.models.errors.ConversionError` naming the key and value.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfgbasin_jax.models.errors import ConversionError

# transformers' hidden_act names -> the function (as transformers' ACT2FN computes them).
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """What the text tower's computation depends on (hashable: modules are static jit arguments)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """What the image tower's computation depends on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    hidden_act: str
    layer_norm_eps: float


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    text: TextConfig
    vision: VisionConfig
    projection_dim: int
    logit_scale_init_value: float


# transformers' defaults for keys a config dict leaves out (CLIPTextConfig / CLIPVisionConfig /
# CLIPConfig, identical in 4.57 and 5.x).
TEXT_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "eos_token_id": 49407,
}
VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 32, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
CLIP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}

# Keys that leave inference unchanged: training-only settings, ids the model does not read, and the
# generic keys transformers (4.x and 5.x) writes into every config.
_IGNORED_MODEL_KEYS = frozenset(
    {"attention_dropout", "dropout", "initializer_range", "initializer_factor", "projection_dim",
     "bos_token_id", "pad_token_id"}
)
_GENERIC_KEYS = frozenset(
    {"_name_or_path", "add_cross_attention", "architectures", "bad_words_ids", "begin_suppress_tokens",
     "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty",
     "do_sample", "dtype", "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
     "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "gradient_checkpointing", "id2label",
     "is_decoder", "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length", "model_type",
     "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions",
     "output_hidden_states", "output_scores", "prefix", "problem_type", "remove_invalid_values",
     "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
     "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings",
     "tokenizer_class", "top_k", "top_p", "torch_dtype", "torchscript", "transformers_version", "typical_p",
     "use_bfloat16", "use_cache"}
)
# Keys accepted only at these values: anything else would change the model.
_FIXED = {
    "pruned_heads": ({},),
    # diffusers' pipelines pass the tokenizer's padding mask to the text encoder when this is true;
    # ours (like SD's) never does.
    "use_attention_mask": (None, False),
}
_TEXT_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings")
_VISION_INT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size", "num_channels")


def _fail(what: str, key: str, value, need: str):
    raise ConversionError(f"{what} config key {key!r} = {value!r} is not supported: {need}")


def _check_known(config: Mapping, known, what: str) -> None:
    for key, value in config.items():
        if not (key.startswith("_") or key in known):
            raise ConversionError(f"{what} config key {key!r} = {value!r} is unknown to our CLIP implementation")


def _check_fixed(config: Mapping, what: str) -> None:
    for key, allowed in _FIXED.items():
        if key in config and config[key] not in allowed:
            _fail(what, key, config[key], f"need one of {', '.join(repr(v) for v in allowed)}")


def _positive_int(config: Mapping, key: str, what: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(what, key, value, "need a positive int")
    return value


def _check_common(config: Mapping, what: str, model_type: str, architectures: tuple | None,
                  int_keys: tuple, model_keys) -> dict:
    """The checks shared by the towers; returns `config` over its defaults."""
    if not isinstance(config, Mapping):
        raise ConversionError(f"{what} config is a {type(config).__name__}, not a JSON object")
    known = (*model_keys, *_IGNORED_MODEL_KEYS, *_GENERIC_KEYS, *_FIXED)
    _check_known(config, known, what)
    if config.get("model_type", model_type) != model_type:
        _fail(what, "model_type", config["model_type"], f"need {model_type!r}")
    if architectures is not None and config.get("architectures") not in (None, [], list(architectures)):
        _fail(what, "architectures", config["architectures"], f"need {list(architectures)!r}")
    _check_fixed(config, what)
    for key in int_keys:
        _positive_int(config, key, what)
    if config["hidden_size"] % config["num_attention_heads"]:
        _fail(what, "num_attention_heads", config["num_attention_heads"],
              f"need a divisor of hidden_size = {config['hidden_size']}")
    if config["hidden_act"] not in ACTIVATIONS:
        _fail(what, "hidden_act", config["hidden_act"], f"need one of {', '.join(ACTIVATIONS)}")
    eps = config["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        _fail(what, "layer_norm_eps", eps, "need a positive number")
    return config


def text_config(config: Mapping, what: str = "text encoder", architectures=("CLIPTextModel",)) -> TextConfig:
    """Validate a transformers CLIPTextConfig dict (missing keys take transformers' defaults)."""
    merged = _check_common({**TEXT_DEFAULTS, **config}, what, "clip_text_model", architectures,
                           _TEXT_INT_KEYS, TEXT_DEFAULTS)
    eos = merged["eos_token_id"]
    if isinstance(eos, bool) or not isinstance(eos, int):
        _fail(what, "eos_token_id", eos, "need one int (the pooled output reads the EOS token)")
    return TextConfig(**{field.name: merged[field.name] for field in dataclasses.fields(TextConfig)})


def vision_config(config: Mapping, what: str = "CLIP vision", architectures=None) -> VisionConfig:
    """Validate a transformers CLIPVisionConfig dict (missing keys take transformers' defaults)."""
    merged = _check_common({**VISION_DEFAULTS, **config}, what, "clip_vision_model", architectures,
                           _VISION_INT_KEYS, (*VISION_DEFAULTS, "eos_token_id"))  # transformers 4 writes eos
    return VisionConfig(**{field.name: merged[field.name] for field in dataclasses.fields(VisionConfig)})


def clip_config(config: Mapping, what: str = "CLIP") -> ClipConfig:
    """Validate a transformers CLIPConfig dict (config.json of a CLIPModel folder).

    Legacy `text_config_dict` / `vision_config_dict` override `text_config` / `vision_config` as in
    transformers (their missing keys take the defaults).
    """
    towers_keys = ("text_config", "vision_config", "text_config_dict", "vision_config_dict")
    _check_known(config, (*towers_keys, *CLIP_DEFAULTS, *_GENERIC_KEYS, *_IGNORED_MODEL_KEYS, *_FIXED,
                          "eos_token_id"), what)
    _check_fixed(config, what)
    if config.get("model_type", "clip") != "clip":
        _fail(what, "model_type", config["model_type"], "need 'clip'")
    if config.get("architectures") not in (None, [], ["CLIPModel"]):
        _fail(what, "architectures", config["architectures"], "need ['CLIPModel']")
    towers = {}
    for tower, defaults in (("text", TEXT_DEFAULTS), ("vision", VISION_DEFAULTS)):
        sub = dict(config.get(f"{tower}_config") or {})
        legacy = config.get(f"{tower}_config_dict")
        if legacy:
            sub.update({**defaults, **legacy})
        towers[tower] = sub
    merged = {**CLIP_DEFAULTS, **config}
    scale = merged["logit_scale_init_value"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        _fail(what, "logit_scale_init_value", scale, "need a number")
    return ClipConfig(
        text=text_config(towers["text"], f"{what} text_config", architectures=None),
        vision=vision_config(towers["vision"], f"{what} vision_config"),
        projection_dim=_positive_int(merged, "projection_dim", what),
        logit_scale_init_value=float(scale),
    )


# ----------------------------------------------------------------------------- layers


class TextOutput(NamedTuple):
    """The text tower's outputs (a tuple: `out[0]` is the last hidden state, as in transformers)."""

    last_hidden_state: jax.Array  # [B, L, D], after final_layer_norm
    pooler_output: jax.Array  # [B, D], last_hidden_state at each row's EOS token


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch computes it.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class Attention(nn.Module):
    """Multi-head self-attention: [B, L, D] -> [B, L, D]. `mask` bool [B or 1, 1, L, L], True = attend."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        width = x.shape[-1]
        head = width // self.num_heads

        def project(name):
            out = nn.Dense(width, dtype=self.dtype, name=name)(x)
            return out.reshape(*x.shape[:-1], self.num_heads, head)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head**-0.5
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape[:-1] + (width,))
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out)


class EncoderLayer(nn.Module):
    """x + attn(LN1 x); then + fc2(act(fc1(LN2 x)))."""

    num_heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        attention = Attention(self.num_heads, self.dtype, name="self_attn")
        x = x + attention(_layer_norm(self.eps, self.dtype, "layer_norm1")(x), mask)
        mlp = _MLP(x.shape[-1], self.intermediate_size, self.hidden_act, self.dtype, name="mlp")
        return x + mlp(_layer_norm(self.eps, self.dtype, "layer_norm2")(x))


class _MLP(nn.Module):
    width: int
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.width, dtype=self.dtype, name="fc2")(x)


class _Layers(nn.Module):
    """The layer stack; params named "0", "1", ... (transformers' Flax layout `encoder/layers/N`)."""

    config: TextConfig | VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        for index in range(c.num_hidden_layers):
            layer = EncoderLayer(c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps,
                                 self.dtype, name=str(index))
            x = layer(x, mask)
        return x


class Encoder(nn.Module):
    config: TextConfig | VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        return _Layers(self.config, self.dtype, name="layers")(x, mask)


class TextEmbeddings(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, position_ids):
        c = self.config
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="position_embedding")
        return tokens(input_ids.astype(jnp.int32)) + positions(position_ids.astype(jnp.int32))


class TextTransformer(nn.Module):
    """Token ids int [B, L] -> TextOutput (last_hidden_state [B, L, D] after final_layer_norm, pooled [B, D])."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        c = self.config
        length = input_ids.shape[-1]
        if length > c.max_position_embeddings:
            raise ValueError(f"CLIP text: {length} tokens, max_position_embeddings is {c.max_position_embeddings}")
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        x = TextEmbeddings(c, self.dtype, name="embeddings")(input_ids, position_ids)
        x = Encoder(c, self.dtype, name="encoder")(x, mask)
        x = _layer_norm(c.layer_norm_eps, self.dtype, "final_layer_norm")(x)
        if c.eos_token_id == 2:  # configs from before transformers 4.31: EOS has the largest id
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            eos_index = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        return TextOutput(x, x[jnp.arange(x.shape[0]), eos_index])


class CLIPTextModel(nn.Module):
    """SD's text encoder; params as transformers' FlaxCLIPTextModule ({"text_model": ...}).

    __call__(input_ids int [B, L], attention_mask [B, L] (1 = token, None = all), position_ids [B, L]
    (None = 0..L-1), deterministic (no dropout either way)) -> TextOutput(last_hidden_state [B, L, D],
    pooler_output [B, D]).
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True):
        return TextTransformer(self.config, self.dtype, name="text_model")(input_ids, attention_mask, position_ids)


class VisionEmbeddings(nn.Module):
    """Pixels [B, H, W, C] -> [B, 1 + patches, D]: class token, then non-overlapping patches
    (row-major), plus learned position embeddings."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        c = self.config
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                          name="patch_embedding")(pixels.astype(self.dtype))
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (batch, 1, c.hidden_size)), patches], axis=1)
        positions = nn.Embed(x.shape[1], c.hidden_size, dtype=self.dtype, name="position_embedding")
        return x + positions(jnp.arange(x.shape[1]))[None]


class VisionTransformer(nn.Module):
    """Pixels float [B, H, W, C] (NHWC, H = W = image_size) -> pooled [B, D] (the class token after
    post_layernorm)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        c = self.config
        if pixels.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"CLIP vision: pixels of shape {pixels.shape[1:]}, the model needs "
                             f"{(c.image_size, c.image_size, c.num_channels)} (NHWC)")
        x = VisionEmbeddings(c, self.dtype, name="embeddings")(pixels)
        x = _layer_norm(c.layer_norm_eps, self.dtype, "pre_layrnorm")(x)  # transformers' spelling
        x = Encoder(c, self.dtype, name="encoder")(x)
        return _layer_norm(c.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
    """Image and text towers with projections; params as transformers' FlaxCLIPModule.

    Call with `apply(..., method="image_features" | "text_features")`; __call__ gives both.
    """

    config: ClipConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        self.text_model = TextTransformer(c.text, self.dtype)
        self.vision_model = VisionTransformer(c.vision, self.dtype)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), ())

    def image_features(self, pixels):
        """Pixels [B, H, W, C] (NHWC, CLIP-normalised) -> [B, P] projected image embeddings (not unit)."""
        return self.visual_projection(self.vision_model(pixels))

    def text_features(self, input_ids, attention_mask=None):
        """Token ids [B, L] (+ padding mask) -> [B, P] projected text embeddings (not unit)."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def __call__(self, input_ids, pixels, attention_mask=None):
        """-> (logits_per_image [B_img, B_text], unit image embeddings, unit text embeddings)."""
        image = self.image_features(pixels)
        text = self.text_features(input_ids, attention_mask)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        return image @ text.T * jnp.exp(self.logit_scale), image, text
