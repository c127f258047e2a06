"""``cfgbasin-generate``: the paper's generation scripts as one command (and the three wrappers in
``scripts/``). This module is the flag parser and the error reporter; the run is
:mod:`cfgbasin_jax.runs.config` (the validated :class:`RunConfig`) and :mod:`cfgbasin_jax.runs.runner`.

    cfgbasin-generate --method {cfg,stp,og-stp,dtp,og-dtp,wen,gated-...} [flags of the reference scripts]
    cfgbasin-generate --method gated-og-stp --gate_calibrate plain.txt [...]   (detect, then mitigate)
    python scripts/generate_test_dataset_stp.py ...                  (= --method stp)
    python scripts/generate_test_dataset_dtp.py ...                  (= --method dtp)
    python scripts/generate_test_dataset_opposite_guidance.py ...    (= --method og-dtp)

Methods, the flags each reads and its defaults: :mod:`cfgbasin_jax.method.registry` (``Method.script``).
  cfg     constant(guidance_scale) (--CFG_scheduling: that shape at every step)
  stp     static_transition(guidance_change_step, guidance_scale, guidance_scale_later,
          CFG_scheduling, CFG_scheduling_later); a negative guidance_scale is opposite guidance
          (recorded as og-stp)
  og-stp  the same rule with the paper's opposite-guidance defaults (-2.0 above t=650, then 7.5)
  dtp     dynamic_transition(before=guidance_scale, after=guidance_scale_later, "noise_diff");
          defaults 1.0 (conditional only) then 7.5, as the reference DTP script
  og-dtp  dynamic_transition(before=-|guidance_scale|, after=guidance_scale_later (default:
          guidance_scale), "latent_cosine", mode=--og_mode (exact: the reference's two passes),
          precision=--og_precision (official: the reference's float32 torch cosine, bit for bit))
  gated-{stp,og-stp,dtp,og-dtp}   guidance.gated(<that method, same flags>, threshold): a sample whose
          ||eps_c - eps_u|| averaged over its first --gate_steps steps exceeds the threshold follows the
          method, the others constant CFG at --guidance_scale_later. The threshold is --gate_threshold,
          or calibrated before sampling from --gate_calibrate FILE (prompts known to be plain, one per
          line or .jsonl): the (1 - --gate_fpr) quantile of their scores (metrics.detection). Each
          image's score and flag are in metadata.jsonl (gate_score, gate_flagged, gate_threshold).

Defaults follow the reference scripts: stp/og-stp/cfg the ``laion10k`` preset (--img_size 256,
--end_iter 10000, --exp laion10k from ``--prompt_json``, default ./laion_combined_captions.json, --outdir
LAION_10k_DCR_with_text_100000_0_500_7_5_else_cosine_1); dtp/og-dtp the ``sdv1_pretrained`` preset
(--img_size 512, --end_iter 200, shipped with the package, --outdir output). --scheduler DPM,
--num_inference_steps 50, --seed 42, --batch_size 1. The base model defaults to
``$CFGBASIN_BASE_MODEL`` or else "CompVis/stable-diffusion-v1-4"; a Hub id is downloaded on first use
(:mod:`cfgbasin_jax.loading.hub`; --revision and --variant as in diffusers' scripts); a local diffusers
folder or a converted directory always works.
Where a flag behaves differently from the reference script, its ``--help`` says so ("official: ...");
README.md, "Differences from the official scripts", gives the whole list.

Every flag is checked before anything is written (:func:`cfgbasin_jax.runs.config.from_flags`), and a
run writes nothing until its first images are ready. A resume must match the stored run's identity
(:meth:`RunConfig.identity`). Multi-process runs (``--coordinator``, ``--num_processes``,
``--process_id`` or JAX's environment): :mod:`cfgbasin_jax.runs.distributed`. Exit status: 0 done,
2 bad input or an I/O error (one line on stderr naming the flag or path; nothing half-written, and
nothing at all when the input is bad).
"""

from __future__ import annotations

import argparse
import signal
import sys

from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import registry as M
from cfgbasin_jax.pipeline import PIXEL_RULES
from cfgbasin_jax.runs import config as C
from cfgbasin_jax.runs import distributed as D
from cfgbasin_jax.runs import folder as R
from cfgbasin_jax.runs import prompts as P
from cfgbasin_jax.runtime import files as F

PROG = "cfgbasin-generate"
METHODS = M.names(cli_only=True)
ENV_BASE_MODEL = C.ENV_BASE_MODEL
HUB_DEFAULT_MODEL = C.HUB_DEFAULT_MODEL


CliError = C.ConfigError  # bad command-line input (one line naming the flag)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; main() turns it into exit status 2
        raise CliError(message)


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _use_json(text: str) -> bool:
    """--use_json: true is the only behaviour (read the prompt set); false is refused."""
    if not _bool(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: only true is supported (the prompt set is always read; the official scripts read "
            "it for 'False' too, since type=bool parses any non-empty text as True)")
    return True


def build_parser(prog: str = PROG, method: str | None = None) -> argparse.ArgumentParser:
    """The reference scripts' flags (same names); method-dependent defaults are None here and come
    from the method's script (:func:`cfgbasin_jax.runs.config.script_defaults`)."""
    description = (f"Generate images with --method {method} (= {PROG} --method {method}); flags and defaults of "
                   "the reference script." if method else "Generate images with the paper's guidance rules.")
    p = _Parser(prog=prog, description=description + " See the cfgbasin_jax.apps.generate module docstring.",
                allow_abbrev=False)
    if method is None:
        p.add_argument("--method", required=True, choices=METHODS, help="guidance rule")
    add = p.add_argument
    add("--use_json", type=_use_json, default=True,
        help="read the prompt set (official: type=bool, so 'False' is True too; only true is accepted here)")
    add("--pretrained_model_name_or_path", default=None,
        help=f"diffusers SD folder, converted directory or Hub id (downloaded on first use) (default: "
             f"${ENV_BASE_MODEL}, else {HUB_DEFAULT_MODEL}; official stp: the authors' /scratch checkpoint)")
    add("--unet_path", default=None,
        help="a fine-tuned diffusers unet/ folder replacing the base model's UNet (default: none; official: "
             f"{HUB_DEFAULT_MODEL}, which has no UNet config at its root; the official dtp script ignores it)")
    add("--revision", default=None,
        help="of a Hub id (--pretrained_model_name_or_path, --unet_path): a branch, tag or commit (default: main; "
             "as diffusers' scripts)")
    add("--variant", default=None,
        help="weight variant, e.g. fp16: its files (diffusion_pytorch_model.fp16.safetensors, sharded or not) are "
             "downloaded and read where a folder has them, else the plain ones (as diffusers' scripts)")
    add("--outdir", default=None,
        help="output folder (Images/, metadata.jsonl, config.json); stp LAION_10k_DCR_with_text_100000_0_500_7_5"
             "_else_cosine_1, dtp output")
    add("--guidance_change_step", type=float, default=None,
        help="STP transition timestep t: the earlier scale while the timestep > t (stp 0, og-stp 650)")
    add("--guidance_scale", type=float, default=None,
        help="scale before the transition (cfg/stp 7.5, og-stp -2.0, dtp 1.0, og-dtp 7.5 used as -|value|; "
             "official dtp: 7.5 and unused, 1.0 is hard-coded; official og: flips sign every step)")
    add("--guidance_scale_later", type=float, default=None, help="scale from the transition on (default 7.5)")
    add("--CFG_scheduling", default="static",
        help=f"shape before the transition: {', '.join(G.SHAPES)} (official dtp/og: ignored, always static)")
    add("--CFG_scheduling_later", default="static", help="shape from the transition on")
    add("--start_iter", type=int, default=0, help="first global prompt index (official dtp/og: ignored, 0)")
    add("--end_iter", type=int, default=None, help="end of the prompt index range (stp 10000, dtp 200)")
    add("--exp", default=None, choices=P.EXPERIMENTS, help="prompt set (stp: laion10k, dtp: sdv1_pretrained)")
    add("--prompt_json", default=None,
        help="the prompt set's file or folder (laion10k: ./laion_combined_captions.json; official stp: the "
             "authors' /scratch copy)")
    add("--img_size", type=int, default=None, help="image height and width (stp 256, dtp 512)")
    add("--scheduler", default="DPM",
        help="DPM (DPM-Solver++ 2M), DDIM, Euler or PNDM (official: ignored, always DPM-Solver++)")
    add("--num_inference_steps", type=int, default=50)
    add("--batch_size", type=int, default=1, help="images per compiled batch")
    add("--seed", type=int, default=42, help="noise of image i is drawn from (seed, i)")
    add("--dtype", default="float32", choices=C.DTYPES)
    add("--pixels", default=C.SCRIPT_PIXELS, choices=PIXEL_RULES,
        help="uint8 conversion of the decoded images: truncate (the official scripts' (x*255).to(uint8), default) "
             "or round (diffusers', the library default)")
    add("--og_mode", default=None, choices=G.MODES, help="og-dtp: exact (two passes, default) or causal")
    add("--og_precision", default=None, choices=G.PRECISIONS,
        help="og-dtp latent-cosine signal: stable (default, smooth float32 formula) or official (the official "
             "script's float32 1 - torch cosine_similarity, bit for bit, with its ties near convergence)")
    add("--gate_threshold", type=float, default=None,
        help="gated methods: flag a sample when its score (mean ||eps_c - eps_u|| over the first --gate_steps "
             "steps) exceeds this (>= 0); or use --gate_calibrate")
    add("--gate_calibrate", default=None, metavar="PROMPT_FILE",
        help="gated methods: set the threshold before sampling from these prompts known to be plain (one per "
             "line, or .jsonl with 'caption'), at --gate_fpr false positives")
    add("--gate_fpr", type=float, default=None, help="gated methods: false-positive rate of --gate_calibrate "
        "(default 0.01: the 99th percentile of the plain prompts' scores)")
    add("--gate_steps", type=int, default=1, help="gated methods: steps the score averages over (default 1)")
    add("--gate_pre_scale", type=float, default=None,
        help="gated methods: the scale of the first --gate_steps - 1 steps, before the flag is known "
             "(default: the CFG scale --guidance_scale_later)")
    add("--prompt_augmentation", default=None,
        help="baseline (Somepalli et al.): rand_numb_add | rand_word_add | rand_word_repeat, 4 insertions")
    add("--cads", type=_bool, nargs="?", const=True, default=False,
        help="baseline: condition-annealed sampling (tau1 500, tau2 800, s 0.1, psi 1, Gaussian noise); "
             "'--cads False' is false (official: type=bool makes it True; stp ignores it, dtp's is undefined)")
    add("--coordinator", default=None, help=f"multi-process: coordinator HOST:PORT (or ${D.ENV_COORDINATOR})")
    add("--num_processes", type=int, default=None, help=f"multi-process: process count (or ${D.ENV_NUM_PROCESSES})")
    add("--process_id", type=int, default=None, help=f"multi-process: this process (or ${D.ENV_PROCESS_ID})")
    add("--distributed", action="store_true", help="multi-process via JAX's cluster detection (SLURM, MPI, ...)")
    add("--distributed_timeout", type=float, default=D.DEFAULT_TIMEOUT_S, help="seconds to wait for all processes")
    add("--compilation_cache", default=None,
        help="persistent JAX compilation cache folder (default: $CFGBASIN_JAX_COMPILATION_CACHE, "
             "$JAX_COMPILATION_CACHE_DIR or ~/.cache/cfgbasin_jax/jax_cache; see cfgbasin_jax.runtime.compile_cache)")
    add("--no_compilation_cache", action="store_true", help="do not use a persistent compilation cache")
    add("--plot", default="run", choices=C.PLOT_MODES,
        help="noise-difference plots: run (OUTDIR/noise_diff.png), images (also OUTDIR/Plots/{i}.png) or none")
    add("--progress", default="images", choices=C.PROGRESS_MODES,
        help="tqdm bars: images, steps (also per denoising step; such executables are never stored in "
             "the persistent compilation cache) or none")
    return p


def method_defaults(method: str) -> dict:
    """{flag dest: default} of ``--method method``: the parser's, then the method's script's."""
    defaults = {a.dest: a.default for a in build_parser(PROG, method)._actions if a.dest != "help"}
    return {**defaults, **C.script_defaults(method)}


def given_flags(argv) -> set:
    """Names of the flags written on the command line (``--name`` or ``--name=value``)."""
    return {arg[2:].split("=", 1)[0] for arg in argv if isinstance(arg, str) and arg.startswith("--")}


def resolve(a: argparse.Namespace, method: str | None, argv: list, env=None) -> C.RunConfig:
    """The validated run of parsed flags ``a`` (nothing written, no JAX backend touched)."""
    return C.from_flags(vars(a), method or a.method, given_flags(argv), argv, env)


def main(argv=None, method: str | None = None, prog: str | None = None) -> int:
    """Entry point of ``cfgbasin-generate`` and the wrapper scripts (``method`` fixed there).
    Returns the exit status: 0 done, 2 bad input."""
    from cfgbasin_jax.models.errors import ConversionError
    from cfgbasin_jax.runs import runner

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or PROG
    try:
        with F.terminate_raises():
            args = build_parser(prog, method).parse_args(argv)
            return runner.run(resolve(args, method, argv))
    except (C.ConfigError, P.PromptError, R.RunError, D.DistributedError, ConversionError,
            F.FileError) as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # an I/O error: a read-only or full file system, no permission
        print(f"{prog}: error: {F.describe(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # SIGINT, or SIGTERM via terminate_raises: the lock is released
        terminated = isinstance(err, F.Terminated)
        print(f"{prog}: {'terminated' if terminated else 'interrupted'}; every finished image is kept "
              "(rerun the same command to resume)", file=sys.stderr)
        return 128 + int(signal.SIGTERM if terminated else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
