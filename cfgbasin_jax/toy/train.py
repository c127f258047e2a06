"""Denoising-loss training of the Flax UNet (and optionally the text encoder) with optax, with the
memorization recipe of Wen et al. (ICLR 2024) as options.

    cfg = TrainConfig(data="toy_data", output_dir="runs/toy", model="toy", end=8, repeats=250, ...)
    train(cfg)                         # or: python scripts/finetune.py --data toy_data ...

Pieces (small and pure where possible):
  * :func:`read_folder`: image + caption pairs (``x.png`` + ``x.txt``) -> uint8 [N,H,W,3], captions.
  * :func:`epoch_indices`: the recipe: the first ``end`` samples (sorted file order) are the
    memorized subset, each repeated ``repeats`` times, mixed with ``non_mem_ratio * end`` other
    samples (all of them when None), one copy each. Batches are drawn from this list.
  * :func:`make_train_step`: one jitted AdamW step on a batch sharded over the local devices
    (data parallel); conditioning dropout replaces captions by the empty prompt.
  * :func:`train`: the loop, Orbax checkpoints (resume refused when the configuration differs), a
    CSV loss log (memorized vs other samples), a probe loss on fixed noise, a progress bar.

A pixel-space model has ``components.vae = None``; it is saved in the small toy format of
:func:`save_pixel_model` / :func:`load_pixel_components` (configs + tokenizer + safetensors).
A model with a VAE (a converted SD folder) trains on VAE latents and is saved with
:func:`cfgbasin_jax.models.converted.save_components`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cfgbasin_jax import schedulers
from cfgbasin_jax.models.components import (  # noqa: F401  (the pixel-model format lives in models.components)
    PIXEL_FORMAT, Components, is_pixel_model, load_pixel_components, pixel_components, save_pixel_model)
from cfgbasin_jax.models.builders import build_text_encoder, build_unet, component_param_shapes
from cfgbasin_jax.models.tokenizer import load_tokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Options that may change when a run is resumed (everything else must match the stored run).
RESUME_FREE = ("max_train_steps", "checkpointing_steps", "eval_steps", "log_steps", "progress", "output_dir", "skip_bad_files")


class TrainingError(ValueError):
    """Bad training input or a refused resume; the message names the file, folder or option."""


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run (the flags of ``scripts/finetune.py``).

    data: folder of image + caption pairs. model: "toy" (the pixel-space toy architecture, from
    scratch) or a path (converted directory or diffusers SD folder) to fine-tune.
    end / repeats / non_mem_ratio: the memorization recipe (see :func:`epoch_indices`).
    cond_dropout: fraction of captions replaced by "" (for classifier-free guidance).
    """

    data: str
    output_dir: str
    model: str = "toy"
    resolution: int | None = None
    end: int = 0
    repeats: int = 1
    non_mem_ratio: float | None = None
    max_train_steps: int = 1000
    train_batch_size: int = 32
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0
    cond_dropout: float = 0.1
    train_text_encoder: bool = False
    seed: int = 0
    checkpointing_steps: int = 500
    eval_steps: int = 250
    log_steps: int = 10
    save_dtype: str = "float16"
    toy_beta_schedule: str | None = None
    skip_bad_files: bool = False
    progress: bool = True

    def check(self) -> None:
        positive = ("max_train_steps", "train_batch_size", "checkpointing_steps", "log_steps", "repeats")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainingError(f"--{f.name} must be a finite number, got {value}")
        if self.lr_warmup_steps < 0:
            raise TrainingError(f"--lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.resolution is not None and self.resolution < 1:
            raise TrainingError(f"--resolution must be >= 1, got {self.resolution}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TrainingError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_weight_decay < 0 or self.max_grad_norm <= 0:
            raise TrainingError("--adam_weight_decay must be >= 0 and --max_grad_norm > 0, got "
                                f"{self.adam_weight_decay} and {self.max_grad_norm}")
        if self.eval_steps < 0:
            raise TrainingError(f"--eval_steps must be >= 0 (0: no probe loss), got {self.eval_steps}")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.end < 0:
            raise TrainingError(f"--end must be >= 0, got {self.end}")
        if self.non_mem_ratio is not None and self.non_mem_ratio < 0:
            raise TrainingError(f"--non_mem_ratio must be >= 0, got {self.non_mem_ratio}")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise TrainingError(f"--cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainingError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.learning_rate <= 0:
            raise TrainingError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise TrainingError(f"--lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.toy_beta_schedule not in (None, "scaled_linear", "linear"):
            raise TrainingError(f"--toy_beta_schedule must be 'scaled_linear' or 'linear', got {self.toy_beta_schedule!r}")
        if self.toy_beta_schedule is not None and self.model != "toy":
            raise TrainingError("--toy_beta_schedule applies to --model toy only (a pretrained model keeps its schedule)")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise TrainingError(f"--save_dtype must be float32, float16 or bfloat16, got {self.save_dtype!r}")

    def identity(self) -> dict:
        """The options a resumed run must share with the stored one (with a cosine schedule the
        step count shapes the learning rate, so it must match too)."""
        free = set(RESUME_FREE) - ({"max_train_steps"} if self.lr_schedule == "cosine" else set())
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in free}


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Dataset:
    """images: uint8 [N,H,W,3]; captions: N strings; names: N file stems (sorted); skipped: count."""

    images: np.ndarray
    captions: list
    names: list
    skipped: int = 0


def read_folder(folder, resolution: int | None = None, skip_bad: bool = False) -> Dataset:
    """Image + caption pairs ``STEM.png`` + ``STEM.txt`` (sorted by stem), resized to
    ``resolution`` (square, bicubic) when given, else all images must share one size.

    An image without caption, a caption without image or an unreadable image raises one
    TrainingError naming the files; with ``skip_bad`` they are skipped and counted instead.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"--data {folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = {p.stem: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    texts = {p.stem: p for p in files if p.suffix.lower() == ".txt"}
    unmatched = sorted([images[s].name for s in images.keys() - texts.keys()] + [texts[s].name for s in texts.keys() - images.keys()])
    if unmatched and not skip_bad:
        raise TrainingError(
            f"--data {folder}: {len(unmatched)} file(s) without a partner (image needs STEM.txt, caption needs "
            f"an image): {', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''} (or pass --skip_bad_files)"
        )
    stems = sorted(images.keys() & texts.keys())
    pixels, captions, names, bad = [], [], [], list(unmatched)
    for stem in stems:
        try:
            with Image.open(images[stem]) as im:
                im = im.convert("RGB")
                if resolution is not None and im.size != (resolution, resolution):
                    im = im.resize((resolution, resolution), Image.BICUBIC)
                arr = np.asarray(im, np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            if not skip_bad:
                raise TrainingError(f"--data {folder}: cannot read image {images[stem].name} ({err}) (or pass --skip_bad_files)") from None
            bad.append(images[stem].name)
            continue
        if pixels and arr.shape != pixels[0].shape:
            raise TrainingError(
                f"--data {folder}: image {images[stem].name} is {arr.shape[1]}x{arr.shape[0]} but "
                f"{names[0]} is {pixels[0].shape[1]}x{pixels[0].shape[0]}; pass --resolution"
            )
        pixels.append(arr)
        captions.append(texts[stem].read_text(encoding="utf-8").strip())
        names.append(stem)
    if not pixels:
        raise TrainingError(f"--data {folder}: no image + caption pairs found")
    return Dataset(np.stack(pixels), captions, names, skipped=len(bad))


def epoch_indices(num_samples: int, end: int, repeats: int, non_mem_ratio: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The recipe's epoch as (sample indices [M], is_memorized bool [M]): samples 0..end-1 each
    ``repeats`` times, then ``round(non_mem_ratio * end)`` samples from end on (all when None),
    once each. With end=0 it is every sample once."""
    if end > num_samples:
        raise TrainingError(f"--end {end} exceeds the {num_samples} samples of the dataset")
    rest = num_samples - end
    n_plain = rest if non_mem_ratio is None else min(rest, int(round(non_mem_ratio * end)))
    mem = np.repeat(np.arange(end), repeats)
    plain = np.arange(end, end + n_plain)
    idx = np.concatenate([mem, plain]).astype(np.int64)
    if idx.size == 0:
        raise TrainingError("the recipe selects no samples (check --end / --non_mem_ratio)")
    return idx, idx < end


def batch_indices(epoch: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Step ``step``'s batch: the seeded shuffle of epoch ``step*B // M``, sliced (wrapping into the
    next epoch's shuffle). Depends only on (seed, step): resume reproduces the stream."""
    m = epoch.size
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        ep, off = divmod(start + len(out), m)
        perm = np.random.default_rng([seed, 7, ep]).permutation(m)
        out.extend(epoch[perm[off: off + batch_size - len(out)]].tolist())
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------- models


TOY_BETAS = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}


def toy_model_configs(beta_schedule: str = "scaled_linear") -> dict:
    """Configs of the pixel-space toy model: UNet (32, 64) channels, attention at 8x8, 3 RGB
    channels; a 2-layer 64-wide CLIP text encoder over the toy vocabulary; a DDIM scheduler with
    SD's noise schedule ("scaled_linear") or DDPM's ("linear", 1e-4..0.02: terminal SNR ~4e-5,
    so that at 16x16 pixels the image's mean colour cannot be read from the initial noise)."""
    from cfgbasin_jax.toy import data as toy

    with_vocab = _toy_vocab_size()
    unet = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": toy.SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": 4,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    text_encoder = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": toy.MODEL_MAX_LENGTH,
        "vocab_size": with_vocab,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 64,
        "bos_token_id": with_vocab - 2,
        "eos_token_id": with_vocab - 1,
        "pad_token_id": with_vocab - 1,
    }
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


def _toy_vocab_size() -> int:
    import tempfile

    from cfgbasin_jax.toy import data as toy

    with tempfile.TemporaryDirectory() as tmp:
        toy.write_toy_tokenizer(tmp)
        return len(json.loads((Path(tmp) / "vocab.json").read_text(encoding="utf-8")))




def init_toy_components(seed: int = 0, configs: dict | None = None, tokenizer_dir=None) -> Components:
    """Randomly initialised pixel-space toy model (Flax-style initialisers on the host, seeded)."""
    import tempfile

    from cfgbasin_jax.models import tiny
    from cfgbasin_jax.toy import data as toy

    configs = configs or toy_model_configs()
    unet = build_unet(configs["unet"])
    text = build_text_encoder(configs["text_encoder"])
    params = {
        "unet": tiny.random_params(component_param_shapes("unet", unet), seed=[seed, 0]),
        "text_encoder": tiny.random_params(component_param_shapes("text_encoder", text), seed=[seed, 1]),
    }
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = load_tokenizer(toy.write_toy_tokenizer(tmp))
    else:
        tokenizer = load_tokenizer(tokenizer_dir)
    return pixel_components(configs, params, tokenizer, source=f"init:toy:seed={seed}")


def load_model(model: str, dtype="float32", seed: int = 0, toy_beta_schedule: str | None = None) -> Components:
    """"toy" -> a fresh toy model; a pixel-model folder; else a converted / diffusers SD folder."""
    if model == "toy":
        return init_toy_components(seed, configs=toy_model_configs(toy_beta_schedule or "scaled_linear"))
    if is_pixel_model(model):
        return load_pixel_components(model, dtype)
    from cfgbasin_jax.loading import load_components

    return load_components(model, dtype=dtype)


# ----------------------------------------------------------------------------- the step


def alphas_cumprod(scheduler_config: dict) -> np.ndarray:
    """float32 [T] from the scheduler config (as the samplers use)."""
    cfg = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000, **scheduler_config}
    return schedulers.alphas_cumprod_from_betas(schedulers.betas_from_config(cfg))


def tokenize(tokenizer, captions: Sequence[str]) -> np.ndarray:
    """int32 [N, model_max_length], padded like the pipeline."""
    out = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np")
    return out.input_ids.astype(np.int32)


def _encode_text(text_encoder, params, ids):
    pos = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
    return text_encoder.apply({"params": params}, ids, jnp.ones_like(ids), pos, deterministic=True)[0]


def make_loss_fn(components: Components, train_text_encoder: bool):
    """loss(trainable, frozen, batch, key) -> (mean loss, per-sample loss [B]).

    trainable: {"unet"} (+ "text_encoder"); frozen: the rest (+ "alphas_cumprod", "empty_ids").
    batch: {"pixels": float32 [B,3,H,W] in [-1,1], "ids": int32 [B,L], "drop": bool [B]}.
    """
    unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
    prediction = components.scheduler_config.get("prediction_type", "epsilon")
    scaling = float(components.configs["vae"].get("scaling_factor", 0.18215)) if vae is not None else 1.0
    dtype = components.dtype

    def loss_fn(trainable, frozen, batch, key):
        k_t, k_noise, k_vae = jax.random.split(key, 3)
        te_params = trainable["text_encoder"] if train_text_encoder else frozen["text_encoder"]
        ids = jnp.where(batch["drop"][:, None], frozen["empty_ids"][None, :], batch["ids"])
        hidden = _encode_text(text_encoder, te_params, ids)
        x0 = batch["pixels"]
        if vae is not None:
            dist = vae.apply({"params": frozen["vae"]}, x0.astype(dtype), method=vae.encode).latent_dist
            x0 = jnp.transpose(dist.sample(k_vae), (0, 3, 1, 2)).astype(jnp.float32) * scaling
        ab = frozen["alphas_cumprod"]
        t = jax.random.randint(k_t, (x0.shape[0],), 0, ab.shape[0])
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        a = jnp.sqrt(ab[t])[:, None, None, None]
        s = jnp.sqrt(1.0 - ab[t])[:, None, None, None]
        x_t = a * x0 + s * noise
        pred = unet.apply({"params": trainable["unet"]}, x_t.astype(dtype), t, hidden.astype(dtype)).sample.astype(jnp.float32)
        target = a * noise - s * x0 if prediction == "v_prediction" else noise
        per_sample = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
        return jnp.mean(per_sample), per_sample

    return loss_fn


def make_optimizer(cfg: TrainConfig):
    """(optimizer, lr schedule): clip_by_global_norm + AdamW, linear warm-up then constant or
    cosine decay (to 5% of the peak)."""
    warm = max(cfg.lr_warmup_steps, 0)
    if cfg.lr_schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(warm, 1), max(cfg.max_train_steps, warm + 1), end_value=cfg.learning_rate * 0.05)
    elif warm > 0:
        sched = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warm), optax.constant_schedule(cfg.learning_rate)], [warm])
    else:
        sched = optax.constant_schedule(cfg.learning_rate)
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(sched, b1=cfg.adam_beta1, b2=cfg.adam_beta2, weight_decay=cfg.adam_weight_decay),
    ), sched


def data_mesh():
    """A 1-D mesh ("data") over the local devices."""
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))


def make_train_step(loss_fn, optimizer, ema_decay: float, mesh):
    """Jitted step(state, frozen, batch, key) -> (state, loss, per_sample [B]).

    state: {"step", "params" (trainable), "opt_state", "ema"}; the batch is sharded over the mesh's
    "data" axis, params and optimizer state replicated (XLA inserts the gradient all-reduce)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))

    def step(state, frozen, batch, key):
        key = jax.random.fold_in(key, state["step"])
        (loss, per_sample), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, batch, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = state["ema"]
        if ema_decay > 0:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}, loss, per_sample

    batch_sharding = {"pixels": sharded, "ids": sharded, "drop": sharded}
    return jax.jit(step, in_shardings=(replicated, replicated, batch_sharding, replicated), out_shardings=(replicated, replicated, sharded), donate_argnums=(0,))


def make_probe(components: Components, train_text_encoder: bool, images: np.ndarray, captions: Sequence[str], timesteps=(50, 150, 250, 350, 450, 550, 650, 750, 850, 950), seed: int = 1234):
    """probe(trainable, frozen) -> float32 [N]: each image's denoising loss averaged over fixed
    timesteps with fixed noise (no dropout): a low-variance memorization gauge."""
    unet, text_encoder = components.unet, components.text_encoder
    prediction = components.scheduler_config.get("prediction_type", "epsilon")
    ids = jnp.asarray(tokenize(components.tokenizer, captions))
    x0 = jnp.asarray(to_model_pixels(images))
    ts = jnp.asarray(timesteps, jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(seed), (len(timesteps),) + x0.shape, jnp.float32)
    if components.vae is not None:
        raise TrainingError("the probe loss supports pixel-space models only")

    @jax.jit
    def probe(trainable, frozen):
        te = trainable["text_encoder"] if train_text_encoder else frozen["text_encoder"]
        hidden = _encode_text(text_encoder, te, ids)
        ab = frozen["alphas_cumprod"]

        def one(carry, tn):
            t, n = tn
            a, s = jnp.sqrt(ab[t]), jnp.sqrt(1.0 - ab[t])
            tt = jnp.full((x0.shape[0],), t)
            pred = unet.apply({"params": trainable["unet"]}, a * x0 + s * n, tt, hidden).sample
            target = a * n - s * x0 if prediction == "v_prediction" else n
            return carry, jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))

        _, losses = jax.lax.scan(one, None, (ts, noise))
        return jnp.mean(losses, axis=0)

    return probe


def to_model_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W] in [-1, 1]."""
    return np.transpose(images.astype(np.float32) / 127.5 - 1.0, (0, 3, 1, 2))


# ----------------------------------------------------------------------------- the loop


def _split_params(components: Components, train_text_encoder: bool, alphas: np.ndarray, empty_ids: np.ndarray):
    trainable = {"unet": components.params["unet"]}
    frozen = {"alphas_cumprod": jnp.asarray(alphas), "empty_ids": jnp.asarray(empty_ids)}
    if train_text_encoder:
        trainable["text_encoder"] = components.params["text_encoder"]
    else:
        frozen["text_encoder"] = components.params["text_encoder"]
    if components.vae is not None:
        frozen["vae"] = components.params["vae"]
    return trainable, frozen


def _check_resume(output_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a run stored in ``output_dir`` with another configuration; reads only."""
    stored_path = output_dir / "train_config.json"
    if not stored_path.is_file():
        return
    try:
        stored = json.loads(stored_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise TrainingError(f"{stored_path}: not valid JSON ({err}); use another --output_dir") from None
    mine = cfg.identity()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    diffs = [f"{k}: stored {stored.get(k, defaults.get(k))!r}, now {v!r}" for k, v in mine.items() if stored.get(k, defaults.get(k)) != v]
    if diffs:
        raise TrainingError(
            f"{output_dir}: refusing to resume a run with a different configuration ({'; '.join(diffs)}); "
            "use another --output_dir"
        )


def _store_config(output_dir: Path, cfg: TrainConfig) -> None:
    """Write train_config.json (the stored run's step count follows the latest --max_train_steps)."""
    from cfgbasin_jax.runtime import files as F

    F.atomic_write_text(output_dir / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))


def _checkpoint_manager(output_dir: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager((output_dir / "checkpoints").absolute(), options=options)


def _append_csv(path: Path, header: Sequence[str], row: Sequence) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow(row)


_STEP_CACHE: dict = {}
LOSS_HEADER = ("step", "loss", "loss_memorized", "loss_other", "lr", "elapsed_s")
PROBE_HEADER = ("step", "probe_memorized", "probe_other")


def train(cfg: TrainConfig, components: Components | None = None, log=print) -> dict:
    """Run (or resume) the training described by ``cfg``. Returns {"components", "steps",
    "final_loss", "output"}; writes ``output_dir/{train_config.json, loss_log.csv, probe_log.csv,
    checkpoints/, model/}``."""
    import orbax.checkpoint as ocp

    from cfgbasin_jax.runtime import files as F

    cfg.check()  # everything is checked before output_dir is written
    try:
        out = F.check_writable_dir(cfg.output_dir, "--output_dir")
    except F.FileError as err:
        raise TrainingError(str(err)) from None
    _check_resume(out, cfg)
    data = read_folder(cfg.data, cfg.resolution, cfg.skip_bad_files)
    if data.skipped:
        log(f"skipped {data.skipped} bad or unmatched file(s) in {cfg.data}")
    comps = components if components is not None else load_model(cfg.model, seed=cfg.seed, toy_beta_schedule=cfg.toy_beta_schedule)
    n_dev = jax.local_device_count()
    if cfg.train_batch_size % n_dev:
        raise TrainingError(f"--train_batch_size {cfg.train_batch_size} must be a multiple of the {n_dev} local devices")
    out.mkdir(parents=True, exist_ok=True)
    _store_config(out, cfg)
    epoch, _ = epoch_indices(len(data.captions), cfg.end, cfg.repeats, cfg.non_mem_ratio)
    pixels = to_model_pixels(data.images)
    ids = tokenize(comps.tokenizer, data.captions)
    empty = tokenize(comps.tokenizer, [""])[0]
    trainable, frozen = _split_params(comps, cfg.train_text_encoder, alphas_cumprod(comps.scheduler_config), empty)
    # fresh float32 copies: the step donates its state, the caller's components must survive
    trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)
    optimizer, lr_fn = make_optimizer(cfg)
    mesh = data_mesh()
    step_key = (id(comps.unet), id(comps.text_encoder), id(comps.vae), comps.dtype, json.dumps(cfg.identity(), sort_keys=True, default=str))
    if step_key not in _STEP_CACHE:  # one compile per model and configuration in a process (resume, tests)
        _STEP_CACHE.clear()
        _STEP_CACHE[step_key] = (make_train_step(make_loss_fn(comps, cfg.train_text_encoder), optimizer, cfg.ema_decay, mesh), comps)
    step_fn = _STEP_CACHE[step_key][0]
    state = {
        "step": jnp.asarray(0, jnp.int32),
        "params": trainable,
        "opt_state": optimizer.init(trainable),
        "ema": jax.tree.map(jnp.copy, trainable) if cfg.ema_decay > 0 else {},
    }
    manager = _checkpoint_manager(out)
    if manager.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
        log(f"resumed from {out / 'checkpoints'} at step {int(state['step'])}")
    probe = None
    if comps.vae is None and cfg.end > 0 and cfg.eval_steps > 0:
        n_other = min(64, len(data.captions) - cfg.end)
        probe_idx = np.concatenate([np.arange(cfg.end), np.arange(cfg.end, cfg.end + n_other)])
        probe = make_probe(comps, cfg.train_text_encoder, data.images[probe_idx], [data.captions[i] for i in probe_idx])
    key = jax.random.PRNGKey(cfg.seed)
    start = int(state["step"])
    t0 = time.time()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_train_steps, initial=start, desc="training", unit="step")
    loss = float("nan")
    window: list = []
    for step in range(start, cfg.max_train_steps):
        idx = batch_indices(epoch, cfg.train_batch_size, cfg.seed, step)
        drop_rng = np.random.default_rng([cfg.seed, 13, step])
        batch = {"pixels": pixels[idx], "ids": ids[idx], "drop": drop_rng.random(idx.size) < cfg.cond_dropout}
        state, loss_dev, per_sample = step_fn(state, frozen, batch, key)
        window.append((np.asarray(per_sample), idx < cfg.end))
        done = step + 1
        if done % cfg.log_steps == 0 or done == cfg.max_train_steps:
            per = np.concatenate([w[0] for w in window])
            mem = np.concatenate([w[1] for w in window])
            loss = float(per.mean())
            row = (done, loss, float(per[mem].mean()) if mem.any() else "", float(per[~mem].mean()) if (~mem).any() else "", float(lr_fn(step)), round(time.time() - t0, 2))
            _append_csv(out / "loss_log.csv", LOSS_HEADER, row)
            window = []
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}")
        if probe is not None and (done % cfg.eval_steps == 0 or done == cfg.max_train_steps):
            vals = np.asarray(probe(state["params"], frozen))
            _append_csv(out / "probe_log.csv", PROBE_HEADER, (done, float(vals[: cfg.end].mean()), float(vals[cfg.end:].mean())))
        if done % cfg.checkpointing_steps == 0 or done == cfg.max_train_steps:
            manager.save(done, args=ocp.args.StandardSave(state))
        if bar is not None:
            bar.update(1)
    manager.wait_until_finished()
    manager.close()
    if bar is not None:
        bar.close()
    model_dir = out / "model"
    trained = _save_trained(comps, state, cfg, model_dir)
    return {"components": trained, "steps": int(state["step"]), "final_loss": loss, "output": model_dir, "skipped": data.skipped}


def _save_trained(comps: Components, state: dict, cfg: TrainConfig, model_dir: Path, use_ema: bool = True) -> Components:
    """Write ``model_dir`` from a training state (the EMA when enabled and ``use_ema``); returns
    the trained components."""
    final = state["ema"] if cfg.ema_decay > 0 and use_ema else state["params"]
    params = dict(comps.params)
    params["unet"] = final["unet"]
    if cfg.train_text_encoder:
        params["text_encoder"] = final["text_encoder"]
    trained = dataclasses.replace(comps, params=params, source=str(model_dir))
    if trained.vae is None:
        save_pixel_model(trained, model_dir, cfg.save_dtype, extra={"training": dataclasses.asdict(cfg), "steps": int(state["step"])})
    else:
        from cfgbasin_jax.models.converted import save_components

        save_components(trained, model_dir, overwrite=True)
    return trained


def export_checkpoint(output_dir, step: int | None = None, dst=None, use_ema: bool = True) -> Path:
    """Write the model of a run's checkpoint (latest, or ``step``) without training or compiling:
    ``dst`` (default ``output_dir/model``). Usable while the run is still going."""
    import orbax.checkpoint as ocp

    out = Path(output_dir)
    cfg_path = out / "train_config.json"
    if not cfg_path.is_file():
        raise TrainingError(f"{cfg_path}: missing (not a training output folder)")
    cfg = TrainConfig(**json.loads(cfg_path.read_text(encoding="utf-8")))
    comps = load_model(cfg.model, seed=cfg.seed, toy_beta_schedule=cfg.toy_beta_schedule)
    empty = tokenize(comps.tokenizer, [""])[0]
    trainable, _ = _split_params(comps, cfg.train_text_encoder, alphas_cumprod(comps.scheduler_config), empty)
    optimizer, _ = make_optimizer(cfg)
    abstract = jax.eval_shape(lambda p: {
        "step": jnp.asarray(0, jnp.int32), "params": p, "opt_state": optimizer.init(p),
        "ema": p if cfg.ema_decay > 0 else {}}, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
    manager = ocp.CheckpointManager((out / "checkpoints").absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise TrainingError(f"{out / 'checkpoints'}: no checkpoint yet")
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    manager.close()
    dst = out / "model" if dst is None else Path(dst)
    _save_trained(comps, state, cfg, dst, use_ema)
    return dst


def plot_logs(output_dir, path) -> Path:
    """PNG of loss_log.csv (batch loss, memorized vs other, smoothed) and probe_log.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    loss = np.genfromtxt(out / "loss_log.csv", delimiter=",", names=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    k = max(1, len(loss) // 40)
    smooth = lambda v: np.convolve(v, np.ones(k) / k, mode="valid")  # noqa: E731
    steps = loss["step"][k - 1:]
    axes[0].plot(steps, smooth(loss["loss_memorized"]), label="memorized (duplicated) samples", color="tab:red")
    axes[0].plot(steps, smooth(loss["loss_other"]), label="other samples", color="tab:blue")
    axes[0].set_title("training batch loss (moving average)")
    probe_path = out / "probe_log.csv"
    if probe_path.is_file():
        probe = np.atleast_1d(np.genfromtxt(probe_path, delimiter=",", names=True))
        axes[1].plot(probe["step"], probe["probe_memorized"], "o-", color="tab:red", label="memorized images")
        axes[1].plot(probe["step"], probe["probe_other"], "o-", color="tab:blue", label="64 other training images")
        axes[1].set_title("probe loss (fixed noise, 10 timesteps)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- command line


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="finetune.py", description="Denoising-loss training with the memorization recipe (Wen et al.).")
    p.add_argument("--data", required=True, help="folder of STEM.png + STEM.txt pairs (sorted by STEM)")
    p.add_argument("--output_dir", required=True, help="checkpoints/, loss_log.csv, probe_log.csv, model/")
    p.add_argument("--model", default="toy", help="'toy' (pixel-space toy, from scratch), a pixel-model folder, or a converted / diffusers SD folder")
    p.add_argument("--resolution", type=int, default=None, help="resize images to this square size")
    p.add_argument("--end", type=int, default=0, help="the first END samples (sorted) form the memorized subset")
    p.add_argument("--repeats", type=int, default=1, help="copies of each memorized sample per epoch")
    p.add_argument("--non_mem_ratio", type=float, default=None, help="other samples per memorized sample (default: all the rest)")
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--train_batch_size", type=int, default=32, help="global batch (split over the local devices)")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--ema_decay", type=float, default=0.0, help="0 disables EMA; the saved model is the EMA when enabled")
    p.add_argument("--cond_dropout", type=float, default=0.1, help="fraction of captions replaced by the empty prompt")
    p.add_argument("--train_text_encoder", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--eval_steps", type=int, default=250, help="probe-loss interval (memorized vs other); 0: off")
    p.add_argument("--log_steps", type=int, default=10)
    p.add_argument("--save_dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    p.add_argument("--toy_beta_schedule", choices=("scaled_linear", "linear"), default=None,
                   help="noise schedule of a from-scratch toy model (default: SD's scaled_linear)")
    p.add_argument("--skip_bad_files", action="store_true", help="skip unmatched / unreadable files (counted) instead of failing")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--export_only", action="store_true", help="write OUTPUT_DIR/model from the latest checkpoint and exit")
    p.add_argument("--export_raw", action="store_true", help="with --export_only: the raw (not EMA) parameters")
    return p


def main(argv=None) -> int:
    import sys

    from cfgbasin_jax.runtime import files as F
    from cfgbasin_jax.models.errors import ConversionError

    args = vars(build_parser().parse_args(argv))
    args["progress"] = not args.pop("no_progress")
    export_raw = args.pop("export_raw")
    try:
        if args.pop("export_only"):
            print(f"exported {export_checkpoint(args['output_dir'], use_ema=not export_raw)}")
            return 0
        result = train(TrainConfig(**args))
    except (TrainingError, ConversionError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {F.describe(err)}", file=sys.stderr)
        return 2
    print(f"trained {result['steps']} steps, final loss {result['final_loss']:.4f}; model in {result['output']}")
    return 0
