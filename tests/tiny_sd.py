"""Tiny random PyTorch Stable Diffusion models and diffusers-format folders (the test oracle).

`make_tiny_sd(root, variant, weights)` builds the PyTorch UNet2DConditionModel, AutoencoderKL and
CLIPTextModel of `cfgbasin_jax.models.tiny.tiny_configs(variant)` (seeded with torch.manual_seed), writes a
complete diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
with `.safetensors` or pickled `.bin` weights, and returns both.

Every 1-D parameter (biases, norm scales and shifts) gets seeded noise on top of PyTorch's init,
so a norm weight mapped to the wrong place, or left at its init value, changes the outputs.
"""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import torch

from cfgbasin_jax.models.tiny import tiny_configs, write_tiny_tokenizer

# path: the diffusers folder; unet / vae / text_encoder: PyTorch modules (eval, float32);
# tokenizer: CLIPTokenizer; scheduler_config: dict as in scheduler/scheduler_config.json.
TinySD = namedtuple("TinySD", "path variant unet vae text_encoder tokenizer scheduler_config")

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.39.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _perturb_vectors(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim == 1:
                param.add_(scale * torch.randn_like(param))
    return module.eval()


def build_tiny_torch(variant: str = "sd1", seed: int = 0) -> tuple:
    """(unet, vae, text_encoder) PyTorch modules in eval mode, float32, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = tiny_configs(variant)
    torch.manual_seed(seed)
    unet = _perturb_vectors(UNet2DConditionModel.from_config(configs["unet"]))
    vae = _perturb_vectors(AutoencoderKL.from_config(configs["vae"]))
    text_config = CLIPTextConfig.from_dict(configs["text_encoder"])
    text_encoder = _perturb_vectors(CLIPTextModel(text_config))
    return unet, vae, text_encoder


def build_torch_vae(config: dict, seed: int = 0):
    """PyTorch AutoencoderKL of `config` (eval, float32), seeded, 1-D parameters perturbed."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _perturb_vectors(AutoencoderKL.from_config(config))


def write_sd_folder(root, variant: str, unet, vae, text_encoder, weights: str = "safetensors") -> Path:
    """Write the modules as a diffusers SD folder at `root` (created); weights 'safetensors' | 'bin'."""
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    safe = weights == "safetensors"
    configs = tiny_configs(variant)
    scheduler_class = configs["scheduler"]["_class_name"]
    (root / "model_index.json").write_text(
        json.dumps({**MODEL_INDEX, "scheduler": ["diffusers", scheduler_class]}, indent=2)
    )
    unet.save_pretrained(root / "unet", safe_serialization=safe)
    vae.save_pretrained(root / "vae", safe_serialization=safe)
    if safe:
        text_encoder.save_pretrained(root / "text_encoder")
    else:  # transformers 5 writes safetensors only: pickle by hand, with the checkpoints' `text_model.` prefix
        text_encoder.config.save_pretrained(root / "text_encoder")
        state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_encoder.state_dict().items()}
        torch.save(state, root / "text_encoder" / "pytorch_model.bin")
    write_tiny_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
    return root


def make_tiny_sd(root, variant: str = "sd1", weights: str = "safetensors", seed: int = 0) -> TinySD:
    """Build the tiny PyTorch models and write their diffusers folder at `root`."""
    from transformers import CLIPTokenizer

    unet, vae, text_encoder = build_tiny_torch(variant, seed)
    path = write_sd_folder(root, variant, unet, vae, text_encoder, weights)
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return TinySD(path, variant, unet, vae, text_encoder, tokenizer, scheduler_config)


def make_tiny_sd_folder(root, variant: str = "sd1", weights: str = "safetensors", seed: int = 0) -> Path:
    """make_tiny_sd(...).path"""
    return make_tiny_sd(root, variant, weights, seed).path
