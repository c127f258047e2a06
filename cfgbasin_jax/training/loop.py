"""The training loop: :func:`train` runs (or resumes) a :class:`~cfgbasin_jax.training.config.TrainConfig`.

Writes ``output_dir/{train_config.json, loss_log.csv, probe_log.csv, checkpoints/, model/}``; the
folder is locked while a run writes it (:class:`cfgbasin_jax.runtime.files.LockFile`), and a
resume with another configuration is refused before anything is written.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfgbasin_jax.method import sharding as parallel
from cfgbasin_jax.models.components import Components
from cfgbasin_jax.runtime import files as F
from cfgbasin_jax.training.config import TrainConfig, TrainingError, check_resume, store_config
from cfgbasin_jax.training.data import batch_indices, epoch_indices, read_folder, to_model_pixels, tokenize
from cfgbasin_jax.training.export import CHECKPOINTS, MODEL, checkpoint_manager, save_trained
from cfgbasin_jax.training.step import StepCache, initial_state, load_model, make_optimizer, make_probe, split_params

LOSS_HEADER = ("step", "loss", "loss_memorized", "loss_other", "lr", "elapsed_s")
PROBE_HEADER = ("step", "probe_memorized", "probe_other")
LOCK_FILE = ".train.lock"


def _append_csv(path: Path, header: Sequence[str], row: Sequence) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow(row)


def train(cfg: TrainConfig, components: Components | None = None, log=print, steps: StepCache | None = None) -> dict:
    """Run (or resume) the training described by ``cfg``. Returns {"components", "steps",
    "final_loss", "output", "skipped"}. ``components``: the model to train (default: the one
    ``cfg.model`` names). ``steps``: a :class:`StepCache` to share the compiled step between calls
    (default: a fresh one)."""
    cfg.check()  # everything is checked before output_dir is written
    try:
        out = F.check_writable_dir(cfg.output_dir, "--output_dir")
    except F.FileError as err:
        raise TrainingError(str(err)) from None
    check_resume(out, cfg)
    data = read_folder(cfg.data, cfg.resolution, cfg.skip_bad_files)
    if data.skipped:
        log(f"skipped {data.skipped} bad or unmatched file(s) in {cfg.data}")
    comps = components if components is not None else load_model(cfg.model, seed=cfg.seed, toy_beta_schedule=cfg.toy_beta_schedule)
    devices = parallel.resolve_devices()
    if cfg.train_batch_size % len(devices):
        raise TrainingError(f"--train_batch_size {cfg.train_batch_size} must be a multiple of the {len(devices)} local devices")
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = F.LockFile(out / LOCK_FILE, "training run").acquire()
    except F.FileError as err:
        raise TrainingError(str(err)) from None
    try:
        return _run(cfg, comps, data, out, log, steps or StepCache(), parallel.data_mesh(devices))
    finally:
        lock.release()


def _run(cfg: TrainConfig, comps: Components, data, out: Path, log, steps: StepCache, mesh) -> dict:
    import orbax.checkpoint as ocp

    store_config(out, cfg)
    epoch, _ = epoch_indices(len(data.captions), cfg.end, cfg.repeats, cfg.non_mem_ratio)
    pixels = to_model_pixels(data.images)
    ids = tokenize(comps.tokenizer, data.captions)
    empty = tokenize(comps.tokenizer, [""])[0]
    trainable, frozen = split_params(comps, cfg.train_text_encoder, empty)
    # fresh float32 copies: the step donates its state, the caller's components must survive
    trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)
    optimizer, lr_fn = make_optimizer(cfg)
    step_fn = steps.step(comps, cfg, optimizer, mesh)
    state = initial_state(trainable, optimizer, cfg.ema_decay)
    manager = checkpoint_manager(out)
    if manager.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
        log(f"resumed from {out / CHECKPOINTS} at step {int(state['step'])}")
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
    model_dir = out / MODEL
    trained = save_trained(comps, state, cfg, model_dir)
    return {"components": trained, "steps": int(state["step"]), "final_loss": loss, "output": model_dir, "skipped": data.skipped}
