"""Stable Diffusion's conditional UNet as a linen module with a pluggable attention implementation.

Parameter-compatible with diffusers' ``FlaxUNet2DConditionModel``: the same module names and the
same parameter tree (``conv_in``, ``time_embedding/linear_1``, ``down_blocks_0/resnets_0/conv1``,
``.../attentions_0/transformer_blocks_0/attn1/to_q``, ...), so converted checkpoints load unchanged.

Differences from diffusers' Flax modules (each one brings the outputs closer to PyTorch's or makes
them faster, never changes the parameters):
  * attention through :func:`cfgbasin_jax.models.attention.attend`, chosen per backend (``attention``);
  * exact (erf) gelu in GEGLU, as PyTorch's GEGLU (diffusers' Flax GEGLU uses the tanh approximation);
  * no ``added_cond_kwargs`` / ControlNet residual inputs (the configs this project accepts have none).

    unet = UNet2DConditionModel(**models.unet_flax_kwargs(config), dtype=jnp.bfloat16)
    eps = unet.apply({"params": params}, sample_nchw, timesteps, encoder_hidden_states).sample
"""

from __future__ import annotations

import math

import flax
import flax.linen as nn
import jax.numpy as jnp

from cfgbasin_jax.models import attention as A
from cfgbasin_jax.models.conv import Conv2d


@flax.struct.dataclass
class UNetOutput:
    """sample: [B,C,H,W] model output (NCHW, like the input)."""

    sample: jnp.ndarray


def timestep_embedding(timesteps: jnp.ndarray, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jnp.ndarray:
    """[N] -> float32 [N, dim] sinusoidal embedding (diffusers' get_sinusoidal_embeddings)."""
    half = dim // 2
    step = math.log(1.0e4) / (half - freq_shift)
    inv = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)
    angle = timesteps[:, None] * inv[None, :]
    parts = (jnp.cos(angle), jnp.sin(angle)) if flip_sin_to_cos else (jnp.sin(angle), jnp.cos(angle))
    return jnp.concatenate(parts, axis=1)


def _conv(features: int, dtype, name: str, kernel: int = 3, stride: int = 1) -> Conv2d:
    pad = ((1, 1), (1, 1)) if kernel == 3 else "VALID"
    return Conv2d(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


def _group_norm(name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, epsilon=1e-5, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv, + (1x1-projected) input."""

    in_channels: int
    out_channels: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, deterministic=True):
        h = _conv(self.out_channels, self.dtype, "conv1")(nn.swish(_group_norm("norm1")(x)))
        temb = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.swish(temb))
        h = h + temb[:, None, None, :]
        h = nn.swish(_group_norm("norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic)
        h = _conv(self.out_channels, self.dtype, "conv2")(h)
        if self.in_channels != self.out_channels:
            x = _conv(self.out_channels, self.dtype, "conv_shortcut", kernel=1)(x)
        return h + x


class Attention(nn.Module):
    """Multi-head (self or cross) attention; heads of width ``dim_head``."""

    query_dim: int
    heads: int
    dim_head: int
    dropout: float = 0.0
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, deterministic=True):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)  # noqa: E731
        out = A.attend(split(q), split(k), split(v), self.attention)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        out = nn.Dense(self.query_dim, dtype=self.dtype, name="to_out_0")(out)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class GEGLU(nn.Module):
    """Dense to 2 x 4 dim, value * gelu(gate) with the exact (erf) gelu."""

    dim: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        value, gate = jnp.split(nn.Dense(self.dim * 8, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return nn.Dropout(self.dropout)(value * nn.gelu(gate, approximate=False), deterministic=deterministic)


class FeedForward(nn.Module):
    dim: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        x = GEGLU(self.dim, self.dropout, self.dtype, name="net_0")(x, deterministic)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward; pre-LayerNorm, residual each."""

    dim: int
    heads: int
    dim_head: int
    dropout: float = 0.0
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, deterministic=True):
        def norm(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)

        def attn(name):
            return Attention(self.dim, self.heads, self.dim_head, self.dropout, self.attention, self.dtype, name=name)

        x = attn("attn1")(norm("norm1")(x), deterministic=deterministic) + x
        x = attn("attn2")(norm("norm2")(x), context, deterministic=deterministic) + x
        x = FeedForward(self.dim, self.dropout, self.dtype, name="ff")(norm("norm3")(x), deterministic) + x
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class Transformer2D(nn.Module):
    """GroupNorm, 1x1 conv (or linear) in, ``depth`` transformer blocks over H*W tokens, out, + input."""

    channels: int
    heads: int
    depth: int = 1
    dropout: float = 0.0
    use_linear_projection: bool = False
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, deterministic=True):
        b, h, w, c = x.shape
        residual = x
        x = _group_norm("norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = _conv(c, self.dtype, "proj_in", kernel=1)(x).reshape(b, h * w, c)
        for i in range(self.depth):
            block = BasicTransformerBlock(
                c, self.heads, c // self.heads, self.dropout, self.attention, self.dtype, name=f"transformer_blocks_{i}"
            )
            x = block(x, context, deterministic)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = _conv(c, self.dtype, "proj_out", kernel=1)(x.reshape(b, h, w, c))
        return nn.Dropout(self.dropout)(x + residual, deterministic=deterministic)


class Downsample(nn.Module):
    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self.channels, self.dtype, "conv", stride=2)(x)


class Upsample(nn.Module):
    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)  # nearest
        return _conv(self.channels, self.dtype, "conv")(x)


class TimestepEmbedding(nn.Module):
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, temb):
        temb = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(temb)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(temb))


class DownBlock(nn.Module):
    """``num_layers`` resnets (each followed by a Transformer2D when ``heads``), then a stride-2 conv.
    Returns (x, the skip tensors it adds)."""

    in_channels: int
    out_channels: int
    num_layers: int
    heads: int | None = None
    depth: int = 1
    add_downsample: bool = True
    dropout: float = 0.0
    use_linear_projection: bool = False
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, deterministic=True):
        skips = []
        for j in range(self.num_layers):
            in_ch = self.in_channels if j == 0 else self.out_channels
            resnet = ResnetBlock(in_ch, self.out_channels, self.dropout, self.dtype, name=f"resnets_{j}")
            x = resnet(x, temb, deterministic)
            if self.heads is not None:
                x = Transformer2D(self.out_channels, self.heads, self.depth, self.dropout, self.use_linear_projection,
                                  self.attention, self.dtype, name=f"attentions_{j}")(x, context, deterministic)
            skips.append(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """``num_layers`` x (concat a skip, resnet, Transformer2D when ``heads``), then 2x upsampling."""

    in_channels: int
    out_channels: int
    prev_output_channel: int
    num_layers: int
    heads: int | None = None
    depth: int = 1
    add_upsample: bool = True
    dropout: float = 0.0
    use_linear_projection: bool = False
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context, deterministic=True):
        skips = list(skips)
        for j in range(self.num_layers):
            skip_ch = self.in_channels if j == self.num_layers - 1 else self.out_channels
            res_in = self.prev_output_channel if j == 0 else self.out_channels
            x = jnp.concatenate((x, skips.pop()), axis=-1)
            x = ResnetBlock(res_in + skip_ch, self.out_channels, self.dropout, self.dtype, name=f"resnets_{j}")(
                x, temb, deterministic
            )
            if self.heads is not None:
                x = Transformer2D(self.out_channels, self.heads, self.depth, self.dropout, self.use_linear_projection,
                                  self.attention, self.dtype, name=f"attentions_{j}")(x, context, deterministic)
        if self.add_upsample:
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(nn.Module):
    """resnet, Transformer2D, resnet at the lowest resolution."""

    channels: int
    heads: int
    depth: int = 1
    dropout: float = 0.0
    use_linear_projection: bool = False
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, deterministic=True):
        c = self.channels
        x = ResnetBlock(c, c, self.dropout, self.dtype, name="resnets_0")(x, temb, deterministic)
        x = Transformer2D(c, self.heads, self.depth, self.dropout, self.use_linear_projection, self.attention,
                          self.dtype, name="attentions_0")(x, context, deterministic)
        return ResnetBlock(c, c, self.dropout, self.dtype, name="resnets_1")(x, temb, deterministic)


class UNet2DConditionModel(nn.Module):
    """SD's conditional UNet (see the module docstring). Fields as diffusers' Flax UNet config;
    ``attention`` picks the attention implementation (:data:`cfgbasin_jax.models.attention.IMPLEMENTATIONS`).

    ``attention_head_dim`` is the NUMBER of heads per block (diffusers' naming quirk).
    ``use_memory_efficient_attention`` and ``split_head_dim`` are diffusers' Flax attention
    switches: accepted so configs load, no effect here (``attention`` decides; the math is equal).
    """

    sample_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | tuple = 8
    cross_attention_dim: int = 1280
    dropout: float = 0.0
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int | tuple = 1
    use_memory_efficient_attention: bool = False
    split_head_dim: bool = False
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    def _per_block(self, value) -> tuple:
        return (value,) * len(self.down_block_types) if isinstance(value, int) else tuple(value)

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, return_dict: bool = True, train: bool = False):
        """sample [B,C,H,W], timesteps [B] (or scalar), encoder_hidden_states [B,L,D] -> UNetOutput."""
        det = not train
        channels = tuple(self.block_out_channels)
        n = len(channels)
        heads = self._per_block(self.attention_head_dim)
        depths = self._per_block(self.transformer_layers_per_block)
        common = dict(dropout=self.dropout, use_linear_projection=self.use_linear_projection,
                      attention=self.attention, dtype=self.dtype)
        context = encoder_hidden_states

        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        temb = timestep_embedding(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(channels[0] * 4, self.dtype, name="time_embedding")(temb)

        x = _conv(channels[0], self.dtype, "conv_in")(jnp.transpose(sample, (0, 2, 3, 1)))
        skips = [x]
        out_ch = channels[0]
        for i, block_type in enumerate(self.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            cross = block_type == "CrossAttnDownBlock2D"
            block = DownBlock(in_ch, out_ch, self.layers_per_block, heads[i] if cross else None, depths[i],
                              add_downsample=i < n - 1, name=f"down_blocks_{i}", **common)
            x, block_skips = block(x, temb, context, det)
            skips += block_skips

        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            x = MidBlock(channels[-1], heads[-1], depths[-1], name="mid_block", **common)(x, temb, context, det)

        rev_channels, rev_heads, rev_depths = channels[::-1], heads[::-1], depths[::-1]
        out_ch = rev_channels[0]
        n_layers = self.layers_per_block + 1
        for i, block_type in enumerate(self.up_block_types):
            prev_ch, out_ch = out_ch, rev_channels[i]
            in_ch = rev_channels[min(i + 1, n - 1)]
            cross = block_type == "CrossAttnUpBlock2D"
            block_skips, skips = skips[-n_layers:], skips[:-n_layers]
            block = UpBlock(in_ch, out_ch, prev_ch, n_layers, rev_heads[i] if cross else None, rev_depths[i],
                            add_upsample=i < n - 1, name=f"up_blocks_{i}", **common)
            x = block(x, block_skips, temb, context, det)

        x = _conv(self.out_channels, self.dtype, "conv_out")(nn.silu(_group_norm("conv_norm_out")(x)))
        x = jnp.transpose(x, (0, 3, 1, 2))
        return UNetOutput(sample=x) if return_dict else (x,)
