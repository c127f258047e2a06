"""The benchmark models: one SD-architecture model per size, the same weights on both sides.

The PyTorch UNet, VAE and CLIP text encoder are built with seeded random weights, written as a
diffusers folder (safetensors) and loaded into JAX by this project's converter
(:func:`cfgbasin_jax.load_pipeline`), so every runner samples the same model.

Sizes:
  tiny  the tiny test config (:func:`cfgbasin_jax.models.tiny.tiny_configs` "sd1": UNet (32, 64), cross-attention
        at full resolution, 4 heads, 0.79M parameters) at its native 8x8 latents (16x16 images).
  sd    an SD-shaped UNet scaled to this machine: (64, 128, 128), one layer per block, cross-attention
        blocks at 32x32 and 16x16 plus the mid block, 8 heads (width 8 at 32x32), 5.8M parameters,
        32x32 latents (64x64 images through the tiny VAE).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np

DDIM_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "trained_betas": None,
}


@dataclasses.dataclass(frozen=True)
class Size:
    """A benchmark model size: UNet config overrides on the tiny sd1 config, latent side, steps, batch."""

    name: str
    unet_overrides: dict
    latent: int
    steps: int
    batch: int
    description: str


SIZES = {
    "tiny": Size("tiny", {}, latent=8, steps=50, batch=8,
                 description="tiny test config: UNet (32, 64), attention at 8x8, 8x8 latents"),
    "sd": Size(
        "sd",
        {
            "block_out_channels": [64, 128, 128],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 8,
            "sample_size": 32,
        },
        latent=32,
        steps=10,
        batch=4,
        description="SD-shaped: UNet (64, 128, 128), cross-attention at 32x32 and 16x16, 8 heads, 32x32 latents",
    ),
}


def configs_for(size: Size) -> dict:
    """{"unet", "vae", "text_encoder", "scheduler"} diffusers / transformers config dicts."""
    from cfgbasin_jax.models.tiny import tiny_configs

    configs = copy.deepcopy(tiny_configs("sd1"))
    configs["unet"].update(copy.deepcopy(size.unet_overrides))
    configs["scheduler"] = dict(DDIM_SCHEDULER)
    return configs


@dataclasses.dataclass
class BenchModels:
    """One size's models. torch_*: PyTorch modules (eval, on ``torch_device``); pipe: our Pipeline
    loaded from ``folder`` by the converter; unet_params_m: UNet parameters in millions;
    parity: max |ours - torch| / max |torch| of one UNet call."""

    size: Size
    folder: Path
    configs: dict
    torch_unet: object
    torch_vae: object
    torch_text: object
    tokenizer: object
    torch_device: str
    pipe: object
    unet_params_m: float
    parity: float


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_torch_modules(configs: dict, seed: int = 0):
    """(unet, vae, text_encoder) PyTorch modules with seeded random weights, eval mode, float32."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs["unet"]).eval()
    vae = AutoencoderKL.from_config(configs["vae"]).eval()
    text = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])).eval()
    return unet, vae, text


def write_folder(root: Path, configs: dict, unet, vae, text) -> Path:
    """A diffusers SD folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from cfgbasin_jax.models.tiny import write_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    write_tiny_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
    return root


def unet_parity(pipe, torch_unet, latent: int, device: str) -> float:
    """max |ours - torch| / max |torch| of one batch-2 UNet call on random inputs."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    cross = pipe.components.configs["unet"]["cross_attention_dim"]
    x = rng.standard_normal((2, 4, latent, latent)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    c = rng.standard_normal((2, 77, cross)).astype(np.float32)
    ours = np.asarray(jax.jit(pipe.unet_fn)(pipe.params["unet"], jnp.asarray(x), jnp.asarray(t), jnp.asarray(c)),
                      np.float32)
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(x).to(device), torch.from_numpy(t).long().to(device),
                         torch.from_numpy(c).to(device)).sample.cpu().numpy()
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def build(size: Size, workdir: Path, dtype: str = "float32", seed: int = 0) -> BenchModels:
    """Build ``size``'s PyTorch models, write their folder under ``workdir``, convert and load them."""
    from transformers import CLIPTokenizer

    import cfgbasin_jax

    configs = configs_for(size)
    unet, vae, text = build_torch_modules(configs, seed)
    folder = write_folder(Path(workdir) / f"sd_{size.name}", configs, unet, vae, text)
    device = torch_device()
    unet, vae, text = unet.to(device), vae.to(device), text.to(device)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    pipe = cfgbasin_jax.load_pipeline(folder, dtype=dtype)
    return BenchModels(
        size=size,
        folder=folder,
        configs=configs,
        torch_unet=unet,
        torch_vae=vae,
        torch_text=text,
        tokenizer=tokenizer,
        torch_device=device,
        pipe=pipe,
        unet_params_m=sum(p.numel() for p in unet.parameters()) / 1e6,
        parity=unet_parity(pipe, unet, size.latent, device),
    )
