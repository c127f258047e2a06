"""The fine-tuning command line (``scripts/finetune.py``): flags -> :class:`~cfgbasin_jax.training.TrainConfig`
-> :func:`~cfgbasin_jax.training.train`, or ``--export_only``. Bad input: one ``error:`` line, exit 2."""

from __future__ import annotations

import argparse
import sys

from cfgbasin_jax.models.errors import ConversionError
from cfgbasin_jax.runtime import files as F
from cfgbasin_jax.training import TrainConfig, TrainingError, export_checkpoint, train


def build_parser() -> argparse.ArgumentParser:
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


if __name__ == "__main__":
    raise SystemExit(main())
