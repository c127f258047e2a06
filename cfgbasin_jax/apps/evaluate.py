"""``scripts/evaluate.py``: the paper's evaluation row for a folder of generated images (argument
parsing and the report file; the computation is :mod:`cfgbasin_jax.runs.evaluation`).

    python scripts/evaluate.py --gen OUTDIR --train TRAIN_DIR --sscd SSCD_DST --clip CLIP_DIR

Every flag is checked before any metric is computed, ``--out`` included (its folder must be
writable); the report is written atomically (a temporary file, then a rename). Exit status 2 with one
line on bad input or an I/O error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from cfgbasin_jax.metrics import images as I
from cfgbasin_jax.runs.evaluation import EvalError, check_report_path, evaluate, markdown_row
from cfgbasin_jax.runtime import files as F
from cfgbasin_jax.runtime.cli import OneLineParser, UsageError


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="evaluate.py",
        description="Copy similarity (SSCD), CLIP score and the paper's summary row for a generation folder.",
    )
    p.add_argument("--gen", required=True, help="generation OUTDIR (Images/ and optional metadata.jsonl)")
    p.add_argument("--train", help="folder of training images (png/jpg, searched recursively)")
    p.add_argument("--captions", help="captions by prompt index (.txt one per line, .json list, .jsonl)")
    p.add_argument("--sscd", help="converted SSCD folder (cfgbasin-convert sscd FILE DST)")
    p.add_argument("--clip", help="CLIP model folder (Flax, or PyTorch converted in memory) or Hub id, e.g. "
                   "openai/clip-vit-large-patch14 (downloaded on first use)")
    p.add_argument("--inception", help="Inception weights for FID (not available in this build)")
    p.add_argument("--metrics", help="comma list of sscd,clip (default: every metric whose inputs are given)")
    p.add_argument("--threshold", type=float, default=0.5, help="SSCD copy threshold (default 0.5)")
    p.add_argument("--sscd-preprocess", default="sscd", choices=I.SSCD_PRESETS,
                   help="sscd: short edge 288 + ImageNet norm (SSCD default); square320; dcr224: 256/crop 224, mean=std=0.5")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=8, help="image decoding threads")
    p.add_argument("--precision", default="highest", choices=("highest", "high", "default"),
                   help="matmul/conv precision on TPU/GPU (default highest = float32)")
    p.add_argument("--out", help="report path (default OUTDIR/eval.json)")
    return p


def check_args(args) -> str:
    """Every check that needs no model or image: the numbers, and that ``--out`` can be written (its
    folder is created at the end when missing) and is none of the inputs
    (:func:`cfgbasin_jax.runs.evaluation.check_report_path`). Returns the report path. Raises
    EvalError naming the flag."""
    threshold = args.threshold
    if not np.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise EvalError(f"--threshold must be a number in [-1, 1] (a cosine similarity), got {threshold}")
    for flag in ("batch_size", "workers"):
        if getattr(args, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not os.path.isdir(args.gen):
        raise EvalError(f"--gen {args.gen}: not a folder")
    out = args.out or os.path.join(args.gen, "eval.json")
    try:
        F.check_writable_file(out, "--out")
    except F.FileError as err:
        raise EvalError(str(err)) from None
    check_report_path(out, args.gen, args.train, args.captions, args.sscd, args.clip, default=args.out is None)
    return out


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    from cfgbasin_jax.loading.hub import HubError, resolve
    from cfgbasin_jax.metrics.clip_score import ClipWeightsError
    from cfgbasin_jax.models.sscd import SSCDWeightsError

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 - progress to stderr, the row to stdout
    try:
        out = check_args(args)
        clip = None if args.clip is None else resolve(args.clip)  # a folder, or a Hub id (downloaded)
        report = evaluate(
            args.gen, args.train, args.captions, args.sscd, clip,
            metrics=metrics, threshold=args.threshold, sscd_preprocess=args.sscd_preprocess,
            batch_size=args.batch_size, workers=args.workers, precision=args.precision,
            inception=args.inception, log=log,
        )
        Path(out).parent.mkdir(parents=True, exist_ok=True)  # checked writable before computing
        F.atomic_write_text(out, json.dumps(report, indent=1))
    except (EvalError, I.ImageInputError, SSCDWeightsError, ClipWeightsError, HubError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {F.describe(err)}", file=sys.stderr)
        return 2
    print(markdown_row(report))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
