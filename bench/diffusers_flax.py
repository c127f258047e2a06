"""diffusers' own Flax models, the (d) anchors of the benchmark (optional).

They exist only in the classic stack: diffusers < 0.40 with Flax and transformers < 5
(``pip install -e ".[diffusers-flax]"``). cfgbasin_jax itself never imports them; where they are
missing the anchors are skipped and the report says so (:data:`SKIP_NOTE`).
"""

from __future__ import annotations

import functools
import logging

SKIP_NOTE = "skipped: needs diffusers' Flax classes (diffusers < 0.40, transformers < 5: the [diffusers-flax] extra)"

# The notices diffusers 0.39 / transformers 4.x log on every Flax module set-up.
DEPRECATION_PREFIXES = ("Flax classes are deprecated", "TensorFlow and JAX classes are deprecated")


@functools.lru_cache(maxsize=1)
def missing() -> str | None:
    """None when diffusers' Flax UNet, VAE, pipeline and transformers' Flax CLIP import; else why not."""
    try:
        from diffusers import (  # noqa: F401
            FlaxAutoencoderKL,
            FlaxDDIMScheduler,
            FlaxStableDiffusionPipeline,
            FlaxUNet2DConditionModel,
        )
        from transformers import FlaxCLIPTextModel  # noqa: F401
    except ImportError as err:  # diffusers >= 0.40 / transformers >= 5 dropped Flax; or not installed
        return f"{type(err).__name__}: {err}"
    quiet()
    return None


def available() -> bool:
    return missing() is None


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DEPRECATION_PREFIXES)


_FILTER = _DropFlaxDeprecation()


def quiet() -> None:
    """Drop exactly the Flax deprecation notices on the diffusers / transformers loggers (they log
    one per module set-up and flood the benchmark output); every other message gets through."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.get_logger("diffusers")  # configures the library root loggers and their handlers
    tlog.get_logger("transformers")
    for name in ("diffusers", "transformers"):
        root = logging.getLogger(name)
        for target in [root, *root.handlers]:
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)


def unet(config: dict, dtype="float32"):
    """diffusers' FlaxUNet2DConditionModel for a diffusers UNet config (our UNet's parameter tree)."""
    from diffusers import FlaxUNet2DConditionModel

    from cfgbasin_jax.models.builders import resolve_dtype, unet_flax_kwargs

    return FlaxUNet2DConditionModel(**unet_flax_kwargs(config), dtype=resolve_dtype(dtype))


def vae(config: dict, dtype="float32"):
    """diffusers' FlaxAutoencoderKL for a diffusers AutoencoderKL config (our VAE's parameter tree)."""
    from diffusers import FlaxAutoencoderKL

    from cfgbasin_jax.models.builders import resolve_dtype, vae_flax_kwargs

    return FlaxAutoencoderKL(**vae_flax_kwargs(config), dtype=resolve_dtype(dtype))
