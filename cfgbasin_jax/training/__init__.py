"""Denoising-loss training of the Flax UNet (and optionally the text encoder) with optax, with the
memorization recipe of Wen et al. (ICLR 2024) as options: the toy from scratch, or full SD.

    cfg = TrainConfig(data="toy_data", output_dir="runs/toy", model="toy", end=8, repeats=250, ...)
    train(cfg)                         # or: python scripts/finetune.py --data toy_data ...

By job: :mod:`~cfgbasin_jax.training.config` (the frozen TrainConfig, resume rules),
:mod:`~cfgbasin_jax.training.data` (the image-folder reader, epoch and batch indices),
:mod:`~cfgbasin_jax.training.step` (model, loss, optimizer, the jitted data-parallel step, probe),
:mod:`~cfgbasin_jax.training.export` (saving a trained model, exporting a checkpoint) and
:mod:`~cfgbasin_jax.training.loop` (the loop: checkpoints, CSV logs, progress). The command line
is :mod:`cfgbasin_jax.apps.finetune`.
"""

from cfgbasin_jax.training.config import RESUME_FREE, TrainConfig, TrainingError, check_resume
from cfgbasin_jax.training.data import Dataset, batch_indices, epoch_indices, read_folder, to_model_pixels, tokenize
from cfgbasin_jax.training.export import export_checkpoint, save_trained
from cfgbasin_jax.training.loop import train
from cfgbasin_jax.training.step import (StepCache, alphas_cumprod, load_model, make_loss_fn, make_optimizer, make_probe,
                                        make_train_step, split_params)

__all__ = ["RESUME_FREE", "Dataset", "StepCache", "TrainConfig", "TrainingError", "alphas_cumprod", "batch_indices",
           "check_resume", "epoch_indices", "export_checkpoint", "load_model", "make_loss_fn", "make_optimizer",
           "make_probe", "make_train_step", "read_folder", "save_trained", "split_params", "to_model_pixels", "tokenize",
           "train"]
