"""Full-size Stable Diffusion models with random weights, built offline and cached on disk.

    sd15  SD 1.5's architecture: UNet (320, 640, 1280, 1280), 8 heads, 859.5M parameters; VAE
          (128, 256, 512, 512); CLIP ViT-L/14 text encoder (12 layers, 768 wide, quick-gelu);
          512x512 images (64x64 latents); 4.1 GB of float32 safetensors.
    sd21  SD 2.1's architecture: UNet with per-block heads (5, 10, 20, 20), linear projections,
          1024-wide cross-attention, v-prediction; OpenCLIP-H text encoder (23 layers, 1024 wide,
          gelu); 768x768 images (96x96 latents).

The weights are PyTorch's default initialisation (seeded), one component at a time, written as
a diffusers folder (safetensors, streamed tensor by tensor so building never holds more than one
component). The tokenizer is the tiny test tokenizer (any token ids below the vocabulary size do).

The cache lives under ``--cache-dir``, else ``$CFGBASIN_BENCH_CACHE``, else
``$XDG_CACHE_HOME/cfgbasin_jax/bench`` (``~/.cache/...``); a folder is reused when its stored
configs equal the requested ones.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

from bench.models import DDIM_SCHEDULER

SEED = 0

_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}


def _sd21() -> dict:
    unet = {**_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
            "use_linear_projection": True, "upcast_attention": True}
    text = {**_CLIP_L, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
            "num_hidden_layers": 23, "projection_dim": 512}
    scheduler = {**DDIM_SCHEDULER, "prediction_type": "v_prediction"}
    return {"unet": unet, "vae": {**_VAE, "sample_size": 768}, "text_encoder": text, "scheduler": scheduler}


CONFIGS = {
    "sd15": {"unet": _UNET, "vae": _VAE, "text_encoder": _CLIP_L,
             "scheduler": dict(DDIM_SCHEDULER)},
    "sd21": _sd21(),
}
DESCRIPTIONS = {
    "sd15": "SD 1.5 architecture (UNet 859.5M, VAE, CLIP-L), random weights, 64x64 latents (512x512)",
    "sd21": "SD 2.1 architecture (UNet 865.9M, VAE, OpenCLIP-H), random weights, 96x96 latents (768x768)",
}
LATENT = {"sd15": 64, "sd21": 96}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
_MARKER = "bench_model.json"


def configs(name: str) -> dict:
    """{"unet", "vae", "text_encoder", "scheduler"} config dicts of a full-size model (copies)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown full-size config {name!r}: use one of {', '.join(CONFIGS)}")
    from cfgbasin_jax.models.tiny import tiny_vocab_size

    out = copy.deepcopy(CONFIGS[name])
    eos = tiny_vocab_size() - 1  # the tiny tokenizer's ids (its bos is eos - 1)
    out["text_encoder"].update(bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)
    return out


def default_cache_dir() -> Path:
    """$CFGBASIN_BENCH_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/cfgbasin_jax/bench."""
    if os.environ.get("CFGBASIN_BENCH_CACHE"):
        return Path(os.environ["CFGBASIN_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cfgbasin_jax" / "bench"


# ------------------------------------------------------------------------------ safetensors, streamed

_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}


def write_safetensors(path: Path, shapes: dict, tensor_fn) -> Path:
    """Write a safetensors file tensor by tensor: ``shapes`` {key: (shape, numpy dtype)} fixes the
    header; ``tensor_fn(key)`` returns each array when its turn comes (only one is held at a time)."""
    header, offset = {}, 0
    for key in sorted(shapes):
        shape, dtype = shapes[key]
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _ST_DTYPES[np.dtype(dtype).name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key in sorted(shapes):
            array = np.ascontiguousarray(tensor_fn(key))
            if tuple(array.shape) != tuple(shapes[key][0]) or array.dtype != np.dtype(shapes[key][1]):
                raise ValueError(f"{path}: tensor {key!r} is {array.dtype}{array.shape}, header says {shapes[key]}")
            f.write(memoryview(array).cast("B"))
    return path


def _torch_module(kind: str, config: dict):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED + ("unet", "vae", "text_encoder").index(kind))
    if kind == "unet":
        return UNet2DConditionModel.from_config(config).eval()
    if kind == "vae":
        return AutoencoderKL.from_config(config).eval()
    return CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()


def _write_component(folder: Path, kind: str, config: dict) -> int:
    """Build one PyTorch component (random init), write config.json + weights; returns its bytes."""
    module = _torch_module(kind, copy.deepcopy(config))  # transformers adds keys to the dict it is given
    state = {k: v.detach() for k, v in module.state_dict().items()}
    del module
    folder.mkdir(parents=True)
    stored = {k: v for k, v in config.items() if k != "attn_implementation"}  # set by some transformers
    if kind == "text_encoder":
        stored.update(torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(stored, indent=2))
    shapes = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()}
    write_safetensors(folder / WEIGHT_FILES[kind], shapes, lambda k: state[k].contiguous().numpy())
    return sum(v.numel() * v.element_size() for v in state.values())


def ensure_model(name: str, cache_dir: Path | None = None, log=print) -> Path:
    """The diffusers folder of full-size model ``name`` under the cache, built when absent (minutes,
    one component in memory at a time). Reused when its stored configs equal :func:`configs`."""
    from cfgbasin_jax.models.tiny import write_tiny_tokenizer

    wanted = configs(name)
    root = Path(cache_dir or default_cache_dir()) / name
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("configs") == wanted:
        return root
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        sizes = {}
        for kind in ("unet", "vae", "text_encoder"):
            log(f"building the {name} {kind} (random weights) in {tmp}")
            sizes[kind] = _write_component(tmp / kind, kind, wanted[kind])
        write_tiny_tokenizer(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(wanted["scheduler"], indent=2))
        index = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
                 "requires_safety_checker": False, "safety_checker": [None, None],
                 "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / _MARKER).write_text(json.dumps({"configs": wanted, "seed": SEED, "bytes": sizes}, indent=2))
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def weight_files(folder: Path) -> list:
    """The weight files of a diffusers SD folder (every component's *.safetensors)."""
    return sorted(p for kind in ("unet", "vae", "text_encoder") for p in (Path(folder) / kind).glob("*.safetensors"))


def weight_bytes(files: Iterable[Path]) -> int:
    return sum(Path(p).stat().st_size for p in files)


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:] or ["sd15"]:
        print(ensure_model(arg))
