"""SSCD copy-detection descriptor (Pizzi et al., CVPR 2022) in Flax.

Architecture of the released models (``sscd_disc_mixup``: ResNet-50, 512-d; ``sscd_disc_large``:
ResNeXt-101 32x4d, 1024-d): a bottleneck ResNe(X)t trunk (7x7/2 stem + 3x3/2 max pool, stride on the
3x3 conv), GeM pooling (p = 3, inputs clamped at 1e-6), a linear projection, L2 normalisation.
BatchNorm is folded into the preceding convolution at conversion time (eval-mode statistics), so every
conv here carries a bias.

Layout: images are channels-last float32 [B,H,W,3], already normalised (see
:func:`cfgbasin_jax.metrics.images.sscd_pixels`). Descriptors are float32 [B,dims], unit norm.

A converted model lives in a folder: ``sscd_config.json`` (:class:`SSCDConfig`) and
``sscd_params.safetensors`` (flat ``a.b.c`` keys of the Flax params). Loading needs no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

CONFIG_NAME = "sscd_config.json"
PARAMS_NAME = "sscd_params.safetensors"
L2_EPS = 1e-12  # torch.nn.functional.normalize's eps
GEM_CLAMP = 1e-6

PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH, "default": jax.lax.Precision.DEFAULT}


class SSCDWeightsError(ValueError):
    """A converted SSCD folder that is missing or unreadable (message names the path)."""


@dataclasses.dataclass(frozen=True)
class SSCDConfig:
    """Shape of an SSCD network (all inferred from the weights by the converter).

    stage_blocks: bottleneck blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    stage_widths: inner (3x3) width per stage, e.g. (64, 128, 256, 512); (128, ..., 1024) for 32x4d.
    stage_out: output channels per stage, e.g. (256, 512, 1024, 2048).
    stem_width: stem conv channels (64). groups: 3x3 conv cardinality (1 ResNet, 32 ResNeXt).
    dims: descriptor size (512 / 1024). gem_p: GeM exponent (3.0).
    """

    stage_blocks: tuple[int, ...] = (3, 4, 6, 3)
    stage_widths: tuple[int, ...] = (64, 128, 256, 512)
    stage_out: tuple[int, ...] = (256, 512, 1024, 2048)
    stem_width: int = 64
    groups: int = 1
    dims: int = 512
    gem_p: float = 3.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SSCDConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise SSCDWeightsError(f"unknown keys in SSCD config: {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kw)


# ----------------------------------------------------------------------------- model


def _conv(features, kernel, stride, pad, groups, precision, name):
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=True,
        precision=precision,
        name=name,
    )


class Bottleneck(nn.Module):
    """1x1 -> 3x3(stride, groups) -> 1x1, BN folded, residual (+ 1x1/stride projection), ReLU."""

    width: int
    out: int
    stride: int
    groups: int
    project: bool
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        y = nn.relu(_conv(self.width, 1, 1, 0, 1, self.precision, "conv1")(x))
        y = nn.relu(_conv(self.width, 3, self.stride, 1, self.groups, self.precision, "conv2")(y))
        y = _conv(self.out, 1, 1, 0, 1, self.precision, "conv3")(y)
        shortcut = _conv(self.out, 1, self.stride, 0, 1, self.precision, "downsample")(x) if self.project else x
        return nn.relu(y + shortcut)


def gem_pool(x: jnp.ndarray, p: float) -> jnp.ndarray:
    """[B,H,W,C] -> [B,C]: (mean over H,W of clamp(x,1e-6)^p)^(1/p)."""
    x = jnp.maximum(x, GEM_CLAMP)
    return jnp.mean(x**p, axis=(1, 2)) ** (1.0 / p)


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    """[B,D] -> [B,D] / max(||row||, 1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), L2_EPS)


class SSCDNet(nn.Module):
    """The SSCD descriptor network: [B,H,W,3] normalised pixels -> [B,dims] unit descriptors."""

    config: SSCDConfig
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = nn.relu(_conv(c.stem_width, 7, 2, 3, 1, self.precision, "stem")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        in_ch = c.stem_width
        for s, (n, width, out) in enumerate(zip(c.stage_blocks, c.stage_widths, c.stage_out)):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                project = b == 0 and (stride != 1 or in_ch != out)
                x = Bottleneck(width, out, stride, c.groups, project, self.precision, name=f"stage{s}_block{b}")(x)
                in_ch = out
        x = gem_pool(x, c.gem_p)
        x = nn.Dense(c.dims, precision=self.precision, name="proj")(x)
        return l2_normalize(x)


def param_shapes(config: SSCDConfig) -> dict[str, tuple[int, ...]]:
    """The flat {"a.b.c": shape} that :class:`SSCDNet` expects (abstract evaluation, no compute)."""
    tree = jax.eval_shape(lambda: SSCDNet(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    return {k: tuple(v.shape) for k, v in flatten_params(tree["params"]).items()}


@functools.lru_cache(maxsize=8)
def descriptor_fn(config: SSCDConfig, precision: str = "highest"):
    """A jitted ``fn(params, pixels [B,H,W,3]) -> [B,dims]`` for this config (compiled per shape)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    net = SSCDNet(config, precision=PRECISIONS[precision])
    return jax.jit(lambda params, pixels: net.apply({"params": params}, pixels))


# ----------------------------------------------------------------------------- storage


def flatten_params(tree: dict) -> dict[str, np.ndarray]:
    """Nested dict -> {"a.b.c": array}."""
    return traverse_util.flatten_dict(tree, sep=".")


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """{"a.b.c": array} -> nested dict."""
    return traverse_util.unflatten_dict(flat, sep=".")


def check_params(config: SSCDConfig, params: dict) -> None:
    """Raise SSCDWeightsError unless ``params`` has exactly the names and shapes of ``config``."""
    want = param_shapes(config)
    got = {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise SSCDWeightsError(f"SSCD params do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    bad = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    if bad:
        raise SSCDWeightsError(f"SSCD param shapes do not match the config (name, got, want): {bad[:5]}")


def save_sscd(folder: str, config: SSCDConfig, params: dict) -> None:
    """Write ``folder/sscd_config.json`` and ``folder/sscd_params.safetensors``."""
    from safetensors.numpy import save_file

    check_params(config, params)
    os.makedirs(folder, exist_ok=True)
    flat = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flatten_params(params).items()}
    save_file(flat, os.path.join(folder, PARAMS_NAME), metadata={"format": "cfgbasin_jax.sscd"})
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config.to_json(), f, indent=2)


def load_sscd(folder: str) -> tuple[SSCDConfig, dict]:
    """Read a folder written by :func:`save_sscd` -> (config, params as numpy arrays)."""
    from safetensors.numpy import load_file

    cfg_path, par_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, PARAMS_NAME)
    for path in (cfg_path, par_path):
        if not os.path.isfile(path):
            raise SSCDWeightsError(
                f"{path} not found: convert the official TorchScript file first with "
                f"`cfgbasin-convert sscd sscd_disc_mixup.torchscript.pt {folder}`"
            )
    try:
        with open(cfg_path) as f:
            config = SSCDConfig.from_json(json.load(f))
        params = unflatten_params(load_file(par_path))
    except (OSError, ValueError, TypeError) as err:
        raise SSCDWeightsError(f"cannot read SSCD weights in {folder}: {err}") from None
    check_params(config, params)
    return config, params


def sscd_descriptors(config: SSCDConfig, params: dict, pixels: np.ndarray, precision: str = "highest") -> np.ndarray:
    """float32 [B,H,W,3] normalised pixels -> float32 [B,dims] unit descriptors (one call, one shape)."""
    return np.asarray(descriptor_fn(config, precision)(params, jnp.asarray(pixels, jnp.float32)))
