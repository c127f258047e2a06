"""The options of a training run (:class:`TrainConfig`, frozen) and the rules for resuming one.

A run's folder holds ``train_config.json``; a resume must share every option except
:data:`RESUME_FREE` (and, with a cosine schedule, the step count, which shapes the learning rate).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from cfgbasin_jax.runs.folder import identity_diff
from cfgbasin_jax.runtime import files as F

CONFIG_FILE = "train_config.json"
# Options that may change when a run is resumed (everything else must match the stored run).
RESUME_FREE = ("max_train_steps", "checkpointing_steps", "eval_steps", "log_steps", "progress", "output_dir", "skip_bad_files")


class TrainingError(ValueError):
    """Bad training input or a refused resume; the message names the file, folder or option."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run (the flags of ``scripts/finetune.py``).

    data: folder of image + caption pairs. model: "toy" (the pixel-space toy architecture, from
    scratch) or a path (converted directory or diffusers SD folder) to fine-tune.
    end / repeats / non_mem_ratio: the memorization recipe (see :func:`cfgbasin_jax.training.data.epoch_indices`).
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
        """One TrainingError naming the first bad option (``--NAME``); reads and writes nothing."""
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


def check_resume(output_dir, cfg: TrainConfig) -> None:
    """Refuse to resume a run stored in ``output_dir`` with another identity; reads only. Options
    missing from an older stored file count as their defaults."""
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise TrainingError(f"{path}: not valid JSON ({err}); use another --output_dir") from None
    if not isinstance(stored, dict):
        raise TrainingError(f"{path}: not a training configuration (no JSON object); use another --output_dir")
    mine = cfg.identity()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    diffs = identity_diff({k: stored.get(k, defaults.get(k)) for k in mine}, mine)
    if diffs:
        raise TrainingError(
            f"{output_dir}: refusing to resume a run with a different configuration ({'; '.join(diffs)}); "
            "use another --output_dir"
        )


def store_config(output_dir, cfg: TrainConfig) -> None:
    """Write train_config.json atomically (the stored run's step count follows the latest --max_train_steps)."""
    F.atomic_write_text(Path(output_dir) / CONFIG_FILE, json.dumps(dataclasses.asdict(cfg), indent=2))
