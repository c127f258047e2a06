"""Writing a trained model: from a training state (:func:`save_trained`) or from a run's Orbax
checkpoint without training or compiling (:func:`export_checkpoint`).

A pixel-space model (``components.vae is None``) is saved in the small toy format of
:func:`cfgbasin_jax.models.components.save_pixel_model` (configs + tokenizer + safetensors); a model
with a VAE as our converted directory (:func:`cfgbasin_jax.models.converted.save_components`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from cfgbasin_jax.models.components import Components, save_pixel_model
from cfgbasin_jax.training.config import CONFIG_FILE, TrainConfig, TrainingError
from cfgbasin_jax.training.data import tokenize
from cfgbasin_jax.training.step import initial_state, load_model, make_optimizer, split_params

CHECKPOINTS = "checkpoints"
MODEL = "model"


def checkpoint_manager(output_dir, read_only: bool = False):
    """The Orbax manager of ``output_dir/checkpoints`` (the two latest steps are kept)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(read_only=True) if read_only else ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager((Path(output_dir) / CHECKPOINTS).absolute(), options=options)


def save_trained(comps: Components, state: dict, cfg: TrainConfig, model_dir: Path, use_ema: bool = True) -> Components:
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
    cfg_path = out / CONFIG_FILE
    if not cfg_path.is_file():
        raise TrainingError(f"{cfg_path}: missing (not a training output folder)")
    cfg = TrainConfig(**json.loads(cfg_path.read_text(encoding="utf-8")))
    comps = load_model(cfg.model, seed=cfg.seed, toy_beta_schedule=cfg.toy_beta_schedule)
    empty = tokenize(comps.tokenizer, [""])[0]
    trainable, _ = split_params(comps, cfg.train_text_encoder, empty)
    optimizer, _ = make_optimizer(cfg)
    abstract = jax.eval_shape(lambda p: initial_state(p, optimizer, cfg.ema_decay),
                              jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
    manager = checkpoint_manager(out, read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise TrainingError(f"{out / CHECKPOINTS}: no checkpoint yet")
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    manager.close()
    dst = out / MODEL if dst is None else Path(dst)
    save_trained(comps, state, cfg, dst, use_ema)
    return dst
