"""Stable Diffusion's KL autoencoder (SD 1.x and 2.x ``AutoencoderKL``) as a linen module.

Parameter-compatible with diffusers' ``FlaxAutoencoderKL`` (diffusers < 0.40): the same module
names and parameter tree (``encoder/conv_in``, ``encoder/down_blocks_0/resnets_0/norm1``,
``encoder/mid_block/attentions_0/query``, ``decoder/up_blocks_0/upsamplers_0/conv``,
``quant_conv``, ``post_quant_conv``, ...), so converted checkpoints load unchanged. Its outputs
follow PyTorch diffusers' ``AutoencoderKL``; the mid-block self-attention (one head over all
channels) runs through :func:`cfgbasin_jax.models.attention.attend`, chosen per backend.

The call interface is also diffusers' Flax one::

    vae = AutoencoderKL(**models.vae_flax_kwargs(config), dtype=jnp.bfloat16)
    dist = vae.apply({"params": p}, image_nchw, method=vae.encode).latent_dist   # NHWC moments
    z = dist.sample(key)                                                          # [B,h,w,C]
    image = vae.apply({"params": p}, z, method=vae.decode).sample                 # [B,3,H,W]
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from cfgbasin_jax.models import attention as A
from cfgbasin_jax.models.conv import Conv2d
from cfgbasin_jax.models.unet import Upsample

NORM_EPS = 1e-6  # every GroupNorm of diffusers' VAE
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance clip (diffusers' DiagonalGaussianDistribution)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior. mean, logvar: [B,h,w,C] (NHWC), logvar clipped to LOGVAR_RANGE."""

    mean: jnp.ndarray
    logvar: jnp.ndarray

    @classmethod
    def from_moments(cls, moments: jnp.ndarray) -> "DiagonalGaussian":
        """moments [B,h,w,2C] (mean channels first, then log-variance) -> DiagonalGaussian."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jnp.ndarray:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jnp.ndarray:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jnp.ndarray:
        """mean + std * N(0, 1) noise drawn from `key` in float32 (as diffusers' Flax VAE), [B,h,w,C]."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, jnp.float32)

    def mode(self) -> jnp.ndarray:
        return self.mean


@flax.struct.dataclass
class EncoderOutput:
    """latent_dist: the posterior (DiagonalGaussian, NHWC)."""

    latent_dist: DiagonalGaussian


@flax.struct.dataclass
class DecoderOutput:
    """sample: [B,C,H,W] decoded image (NCHW)."""

    sample: jnp.ndarray


def _conv(features: int, dtype, name: str | None, kernel: int = 3, stride: int = 1, padding=((1, 1), (1, 1))) -> Conv2d:
    return Conv2d(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv, GroupNorm-SiLU-dropout-conv, + (1x1-projected) input; no time embedding."""

    in_channels: int
    out_channels: int
    groups: int = 32
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        def norm(name):
            return nn.GroupNorm(num_groups=self.groups, epsilon=NORM_EPS, name=name)

        h = _conv(self.out_channels, self.dtype, "conv1")(nn.swish(norm("norm1")(x)))
        h = nn.Dropout(self.dropout)(nn.swish(norm("norm2")(h)), deterministic)
        h = _conv(self.out_channels, self.dtype, "conv2")(h)
        if self.in_channels != self.out_channels:
            x = _conv(self.out_channels, self.dtype, "conv_shortcut", kernel=1, padding="VALID")(x)
        return h + x


class SelfAttention(nn.Module):
    """GroupNorm, single-head self-attention over the H*W positions, output projection, + input."""

    channels: int
    groups: int = 32
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = nn.GroupNorm(num_groups=self.groups, epsilon=NORM_EPS, name="group_norm")(x).reshape(b, h * w, 1, c)

        def dense(name):
            return nn.Dense(self.channels, dtype=self.dtype, name=name)

        out = A.attend(dense("query")(tokens), dense("key")(tokens), dense("value")(tokens), self.attention)
        return dense("proj_attn")(out.reshape(b, h * w, c)).reshape(b, h, w, c) + x


class Downsample(nn.Module):
    """Pad one row and column at the bottom and right, then a stride-2 3x3 conv (diffusers' VAE)."""

    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, self.dtype, "conv", stride=2, padding="VALID")(x)


class ResnetStack(nn.Module):
    """``num_layers`` resnets, then an optional 2x down- or upsampling (DownEncoderBlock2D /
    UpDecoderBlock2D)."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int = 32
    resample: str | None = None  # "down" | "up" | None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        for j in range(self.num_layers):
            in_ch = self.in_channels if j == 0 else self.out_channels
            x = ResnetBlock(in_ch, self.out_channels, self.groups, dtype=self.dtype, name=f"resnets_{j}")(x, deterministic)
        if self.resample == "down":
            x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(nn.Module):
    """resnet, self-attention, resnet at the lowest resolution."""

    channels: int
    groups: int = 32
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        c = self.channels
        x = ResnetBlock(c, c, self.groups, dtype=self.dtype, name="resnets_0")(x, deterministic)
        x = SelfAttention(c, self.groups, self.attention, self.dtype, name="attentions_0")(x)
        return ResnetBlock(c, c, self.groups, dtype=self.dtype, name="resnets_1")(x, deterministic)


def _head(x, groups: int, features: int, dtype):
    """GroupNorm, SiLU, 3x3 conv to `features` (the encoder's and decoder's last layers)."""
    x = nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, name="conv_norm_out")(x)
    return _conv(features, dtype, "conv_out")(nn.swish(x))


class Encoder(nn.Module):
    """[B,H,W,in] -> [B,H/f,W/f,2*latent] (f = 2^(blocks-1)): mean and log-variance channels."""

    in_channels: int
    latent_channels: int
    block_out_channels: tuple
    layers_per_block: int
    groups: int = 32
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        channels = tuple(self.block_out_channels)
        x = _conv(channels[0], self.dtype, "conv_in")(x)
        out_ch = channels[0]
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            resample = "down" if i < len(channels) - 1 else None
            x = ResnetStack(in_ch, out_ch, self.layers_per_block, self.groups, resample, self.dtype,
                            name=f"down_blocks_{i}")(x, deterministic)
        x = MidBlock(channels[-1], self.groups, self.attention, self.dtype, name="mid_block")(x, deterministic)
        return _head(x, self.groups, 2 * self.latent_channels, self.dtype)


class Decoder(nn.Module):
    """[B,h,w,latent] -> [B,h*f,w*f,out]."""

    out_channels: int
    block_out_channels: tuple
    layers_per_block: int
    groups: int = 32
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z, deterministic=True):
        channels = tuple(reversed(self.block_out_channels))
        x = _conv(channels[0], self.dtype, "conv_in")(z)
        x = MidBlock(channels[0], self.groups, self.attention, self.dtype, name="mid_block")(x, deterministic)
        out_ch = channels[0]
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            resample = "up" if i < len(channels) - 1 else None
            x = ResnetStack(in_ch, out_ch, self.layers_per_block + 1, self.groups, resample, self.dtype,
                            name=f"up_blocks_{i}")(x, deterministic)
        return _head(x, self.groups, self.out_channels, self.dtype)


def decoder_stages(vae: "AutoencoderKL") -> list:
    """``vae.decode`` as consecutive functions ``f(params, x) -> x`` over the VAE's whole param tree:
    NHWC latents -> post_quant_conv, conv_in and mid block; each resnet and upsampler of the up
    blocks; norm, conv_out and the NCHW transpose -> image [B,3,H,W]. The same layers as :meth:`AutoencoderKL.decode` in the same
    order; compiled one by one, one stage's temporaries are freed before the next stage runs (on
    CPU the decoder's peak memory is the largest stage's: for SD at 512x512, a resnet at full
    resolution)."""
    channels = tuple(reversed(vae.block_out_channels))
    groups, dtype = vae.norm_num_groups, vae.dtype

    def first(params, z):
        decoder = params["decoder"]
        x = _conv(vae.latent_channels, dtype, None, kernel=1, padding="VALID").apply(
            {"params": params["post_quant_conv"]}, z)
        x = _conv(channels[0], dtype, None).apply({"params": decoder["conv_in"]}, x)
        return MidBlock(channels[0], groups, vae.attention, dtype).apply({"params": decoder["mid_block"]}, x)

    def up_block(i: int, in_ch: int, out_ch: int) -> list:
        """The up block's resnets and upsampler, one stage each."""
        def stage(module, name):
            return lambda params, x: module.apply({"params": params["decoder"][f"up_blocks_{i}"][name]}, x)

        stages = [stage(ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups, dtype=dtype), f"resnets_{j}")
                  for j in range(vae.layers_per_block + 1)]
        if i < len(channels) - 1:
            stages.append(stage(Upsample(out_ch, dtype), "upsamplers_0"))
        return stages

    def last(params, x):
        decoder = params["decoder"]
        x = nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS).apply({"params": decoder["conv_norm_out"]}, x)
        x = _conv(vae.out_channels, dtype, None).apply({"params": decoder["conv_out"]}, nn.swish(x))
        return jnp.transpose(x, (0, 3, 1, 2))

    ins = (channels[0],) + channels[:-1]
    return [first, *(stage for i in range(len(channels)) for stage in up_block(i, ins[i], channels[i])), last]


class AutoencoderKL(nn.Module):
    """SD's VAE (see the module docstring). Fields as diffusers' Flax AutoencoderKL config, plus
    ``attention`` (:data:`cfgbasin_jax.models.attention.IMPLEMENTATIONS`) for the mid-block attention.

    ``down_block_types`` / ``up_block_types`` must be all DownEncoderBlock2D / UpDecoderBlock2D
    (checked by :func:`cfgbasin_jax.models.builders.vae_flax_kwargs`); ``sample_size`` and
    ``scaling_factor`` are carried for the pipeline and not used by the module.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      groups=self.norm_num_groups, attention=self.attention, dtype=self.dtype)
        self.encoder = Encoder(self.in_channels, self.latent_channels, **common)
        self.decoder = Decoder(self.out_channels, **common)
        self.quant_conv = _conv(2 * self.latent_channels, self.dtype, None, kernel=1, padding="VALID")
        self.post_quant_conv = _conv(self.latent_channels, self.dtype, None, kernel=1, padding="VALID")

    def encode(self, sample, deterministic: bool = True, return_dict: bool = True):
        """sample [B,C,H,W] (NCHW, in [-1, 1]) -> EncoderOutput(latent_dist) with NHWC moments."""
        moments = self.quant_conv(self.encoder(jnp.transpose(sample, (0, 2, 3, 1)), deterministic))
        dist = DiagonalGaussian.from_moments(moments)
        return EncoderOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, latents, deterministic: bool = True, return_dict: bool = True):
        """latents [B,h,w,C] (NHWC) -> DecoderOutput(sample [B,3,H,W]).

        As diffusers' Flax VAE, NCHW latents are accepted too: they are recognised by a last axis
        that is not ``latent_channels`` (so a width equal to it reads as NHWC; pass NHWC then).
        """
        if latents.shape[-1] != self.latent_channels:
            latents = jnp.transpose(latents, (0, 2, 3, 1))
        image = self.decoder(self.post_quant_conv(latents), deterministic)
        image = jnp.transpose(image, (0, 3, 1, 2))
        return DecoderOutput(sample=image) if return_dict else (image,)

    def __call__(self, sample, sample_posterior: bool = False, deterministic: bool = True, return_dict: bool = True):
        """Encode then decode [B,C,H,W]: the posterior's mode, or a sample (rng stream "gaussian")."""
        dist = self.encode(sample, deterministic).latent_dist
        z = dist.sample(self.make_rng("gaussian")) if sample_posterior else dist.mode()
        return self.decode(z, deterministic, return_dict)
