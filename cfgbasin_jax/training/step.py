"""The model a run trains, its loss, the optimizer and the jitted data-parallel train step.

  * :func:`load_model`: "toy" (a fresh toy model), a pixel-model folder, or an SD folder.
  * :func:`make_loss_fn`: the denoising loss (epsilon or v target), conditioning dropout to "".
  * :func:`make_train_step`: one jitted AdamW step on a batch sharded over the "data" mesh of
    :mod:`cfgbasin_jax.method.sharding` (params replicated; XLA inserts the gradient all-reduce).
  * :class:`StepCache`: the compiled step of one model and configuration, held by its caller.
  * :func:`make_probe`: a low-variance memorization gauge (fixed noise and timesteps).
"""

from __future__ import annotations

import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cfgbasin_jax import schedulers
from cfgbasin_jax.method import sharding as parallel
from cfgbasin_jax.models.components import Components, is_pixel_model, load_pixel_components
from cfgbasin_jax.training.config import TrainConfig, TrainingError
from cfgbasin_jax.training.data import to_model_pixels, tokenize


def load_model(model: str, dtype="float32", seed: int = 0, toy_beta_schedule: str | None = None) -> Components:
    """"toy" -> a fresh toy model; a pixel-model folder; else a converted / diffusers SD folder."""
    if model == "toy":
        from cfgbasin_jax.toy.model import init_toy_components, toy_model_configs

        return init_toy_components(seed, configs=toy_model_configs(toy_beta_schedule or "scaled_linear"))
    if is_pixel_model(model):
        return load_pixel_components(model, dtype)
    from cfgbasin_jax.loading import load_components

    return load_components(model, dtype=dtype)


def alphas_cumprod(scheduler_config: dict) -> np.ndarray:
    """float32 [T] from the scheduler config (as the samplers use)."""
    cfg = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000, **scheduler_config}
    return schedulers.alphas_cumprod_from_betas(schedulers.betas_from_config(cfg))


def split_params(components: Components, train_text_encoder: bool, empty_ids: np.ndarray) -> tuple[dict, dict]:
    """(trainable {"unet"(, "text_encoder")}, frozen: the rest + "alphas_cumprod" [T], "empty_ids" [L])."""
    trainable = {"unet": components.params["unet"]}
    frozen = {"alphas_cumprod": jnp.asarray(alphas_cumprod(components.scheduler_config)), "empty_ids": jnp.asarray(empty_ids)}
    if train_text_encoder:
        trainable["text_encoder"] = components.params["text_encoder"]
    else:
        frozen["text_encoder"] = components.params["text_encoder"]
    if components.vae is not None:
        frozen["vae"] = components.params["vae"]
    return trainable, frozen


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


def initial_state(trainable: dict, optimizer, ema_decay: float) -> dict:
    """The train state {"step", "params", "opt_state", "ema"} of float32 ``trainable`` params."""
    return {
        "step": jnp.asarray(0, jnp.int32),
        "params": trainable,
        "opt_state": optimizer.init(trainable),
        "ema": jax.tree.map(jnp.copy, trainable) if ema_decay > 0 else {},
    }


def make_train_step(loss_fn, optimizer, ema_decay: float, mesh):
    """Jitted step(state, frozen, batch, key) -> (state, loss, per_sample [B]).

    state: {"step", "params" (trainable), "opt_state", "ema"}; the batch is sharded over the mesh's
    data axis (:data:`cfgbasin_jax.method.sharding.AXIS`), params and optimizer state replicated
    (XLA inserts the gradient all-reduce). The state is donated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P(parallel.AXIS))

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


class StepCache:
    """The compiled train step of the last (model, configuration) it was asked for: at most one
    entry, owned by whoever holds the cache. Passing the same cache to several
    :func:`cfgbasin_jax.training.train` calls (a resume in the same process, the tests) compiles
    the step once; a fresh cache (the default) compiles anew. The entry keeps the components it
    was built for alive, so their ids in the key stay theirs."""

    def __init__(self):
        self._key = None
        self._entry = None  # (step fn, components)
        self.builds = 0  # steps built (a miss: a new model or configuration)

    def step(self, components: Components, cfg: TrainConfig, optimizer, mesh):
        """The jitted step of ``components`` and ``cfg`` (built by :func:`make_train_step` on a miss)."""
        key = (id(components.unet), id(components.text_encoder), id(components.vae), components.dtype,
               json.dumps(cfg.identity(), sort_keys=True, default=str), tuple(mesh.devices.flat))
        if key != self._key:
            fn = make_train_step(make_loss_fn(components, cfg.train_text_encoder), optimizer, cfg.ema_decay, mesh)
            self._key, self._entry = key, (fn, components)
            self.builds += 1
        return self._entry[0]


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
