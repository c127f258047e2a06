"""The toy model's architecture: a pixel-space SD-family model (no VAE) over the toy vocabulary,
built from the small config pieces of :mod:`cfgbasin_jax.models.tiny`.

    configs = toy_model_configs()                       # {"unet", "text_encoder", "scheduler"}
    comps = init_toy_components(seed=0, configs=configs)  # random init, what training starts from
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

from cfgbasin_jax.models import tiny
from cfgbasin_jax.models.components import Components
from cfgbasin_jax.models.tokenizer import bpe_vocabulary, load_tokenizer
from cfgbasin_jax.toy import data as toy

# (beta_start, beta_end) of the two noise schedules a from-scratch toy model may use.
TOY_BETAS = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}


@lru_cache(maxsize=1)
def toy_vocab_size() -> int:
    """Tokens of the toy tokenizer (:func:`cfgbasin_jax.toy.data.write_toy_tokenizer`)."""
    return len(bpe_vocabulary(toy.tokenizer_words())[0])


def toy_model_configs(beta_schedule: str = "scaled_linear") -> dict:
    """Configs of the pixel-space toy model: UNet (32, 64) channels, attention at 8x8, 3 RGB
    channels; a 2-layer 64-wide CLIP text encoder over the toy vocabulary; a DDIM scheduler with
    SD's noise schedule ("scaled_linear") or DDPM's ("linear", 1e-4..0.02: terminal SNR ~4e-5,
    so that at 16x16 pixels the image's mean colour cannot be read from the initial noise)."""
    unet = tiny.unet_config(sample_size=toy.SIZE, channels=3, attention=(False, True), cross_attention_dim=64,
                            attention_head_dim=4)
    text_encoder = tiny.text_encoder_config(width=64, intermediate_size=128, layers=2, heads=4,
                                            vocab_size=toy_vocab_size(), max_length=toy.MODEL_MAX_LENGTH)
    scheduler = {
        "_class_name": "DDIMScheduler",
        "beta_start": TOY_BETAS[beta_schedule][0],
        "beta_end": TOY_BETAS[beta_schedule][1],
        "beta_schedule": beta_schedule,
        "num_train_timesteps": 1000,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "trained_betas": None,
    }
    return {"unet": unet, "text_encoder": text_encoder, "scheduler": scheduler}


def init_toy_components(seed: int = 0, configs: dict | None = None, tokenizer_dir=None) -> Components:
    """Randomly initialised pixel-space toy model (:func:`cfgbasin_jax.models.tiny.random_components`:
    Flax-style initialisers on the host, seeded); the toy tokenizer unless ``tokenizer_dir``."""
    configs = configs or toy_model_configs()
    if tokenizer_dir is None:
        tokenizer = tiny.load_bpe_tokenizer(toy.tokenizer_words(), toy.MODEL_MAX_LENGTH)
    else:
        tokenizer = load_tokenizer(tokenizer_dir)
    comps = tiny.random_components(seed=seed, configs=configs, tokenizer=tokenizer)
    return dataclasses.replace(comps, source=f"init:toy:seed={seed}")
