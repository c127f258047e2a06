"""``cfgbasin-generate``: the paper's generation scripts as one command (and the three wrappers in
``scripts/``).

    cfgbasin-generate --method {cfg,stp,og-stp,dtp,og-dtp} [flags of the reference scripts]
    cfgbasin-generate --method gated-og-stp --gate_calibrate plain.txt [...]   (detect, then mitigate)
    python scripts/generate_test_dataset_stp.py ...                  (= --method stp)
    python scripts/generate_test_dataset_dtp.py ...                  (= --method dtp)
    python scripts/generate_test_dataset_opposite_guidance.py ...    (= --method og-dtp)

Methods (see :mod:`cfgbasin_jax.method.guidance`):
  cfg     constant(guidance_scale)
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

Defaults follow the reference scripts: stp/og-stp/cfg: --img_size 256, --end_iter 10000, --exp
laion10k (``--prompt_json``, default ./laion_combined_captions.json), --outdir
LAION_10k_DCR_with_text_100000_0_500_7_5_else_cosine_1; dtp/og-dtp: --img_size 512, --end_iter 200,
--exp sdv1_pretrained (shipped with the package), --outdir output. --scheduler DPM,
--num_inference_steps 50, --seed 42, --batch_size 1. The base model defaults to
``$CFGBASIN_BASE_MODEL`` or else "CompVis/stable-diffusion-v1-4" looked up in the local Hugging Face
cache only (never downloaded); a local diffusers folder or a converted directory always works.
Where a flag behaves differently from the reference script, its ``--help`` says so ("official: ...");
README.md, "Differences from the official scripts", gives the whole list.

Outputs, resume, the configuration check and the one-run-per-OUTDIR lock: :mod:`cfgbasin_jax.runs.folder`.
Every flag is checked before anything is written, against the model's own scheduler config too (the
transition timestep, the step count). A resume must match the stored run's identity, which includes
the model's fingerprint (:mod:`cfgbasin_jax.models.fingerprint`), the seed and the batch size. Multi-process
runs (``--coordinator``, ``--num_processes``, ``--process_id`` or JAX's environment):
:mod:`cfgbasin_jax.runs.distributed`. Exit status: 0 done, 2 bad input or an I/O error (one line on
stderr naming the flag or path; nothing half-written, and nothing at all when the input is bad).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

from cfgbasin_jax.runs import distributed as D
from cfgbasin_jax.runtime import files as F
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import registry as M
from cfgbasin_jax.runs import prompts as P
from cfgbasin_jax.runs import folder as R

PROG = "cfgbasin-generate"
METHODS = M.names(cli_only=True)  # cfg, stp, og-stp, dtp, og-dtp, wen (the registry's spellings)
STATIC_METHODS = ("cfg", "stp", "og-stp", "wen")
ENV_BASE_MODEL = "CFGBASIN_BASE_MODEL"
HUB_DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DTYPES = ("float32", "bfloat16", "float16")
PLOT_MODES = ("none", "run", "images")
PROGRESS_MODES = ("none", "images", "steps")
OG_MODES = ("exact", "causal")
OG_PRECISIONS = G.PRECISIONS
SEED_RANGE = (0, 2**32 - 1)  # jax.random.PRNGKey keeps 32 bits: 2**32 would repeat seed 0

# The reference scripts' --scheduler names (and ours) -> cfgbasin_jax.schedulers names.
SCHEDULER_ALIASES = {
    "dpm": "dpm++2m", "dpm++2m": "dpm++2m", "dpmsolver": "dpm++2m", "dpmsolvermultistep": "dpm++2m",
    "ddim": "ddim", "euler": "euler", "pndm": "pndm", "plms": "pndm",
}

# The reference scripts' defaults; the methods' paper defaults come from the registry.
_PAPER = {name: M.get(name).defaults for name in ("cfg", "og-stp", "dtp", "og-dtp")}
_STP_DEFAULTS = dict(guidance_scale=_PAPER["cfg"]["scale"], guidance_scale_later=_PAPER["cfg"]["scale"],
                     guidance_change_step=0.0, end_iter=10000, img_size=256, exp="laion10k",
                     outdir="LAION_10k_DCR_with_text_100000_0_500_7_5_else_cosine_1")
_DTP_DEFAULTS = dict(guidance_scale=_PAPER["dtp"]["before"], guidance_scale_later=_PAPER["dtp"]["scale"],
                     guidance_change_step=None, end_iter=200, img_size=512, exp="sdv1_pretrained", outdir="output")
GATE_FLAGS = ("gate_threshold", "gate_calibrate", "gate_fpr", "gate_steps", "gate_pre_scale")
GATED_PREFIX = "gated-"
METHOD_DEFAULTS = {
    "cfg": {**_STP_DEFAULTS, "guidance_scale_later": None},
    "wen": {**_STP_DEFAULTS, "guidance_scale_later": None},
    "stp": _STP_DEFAULTS,
    "og-stp": {**_STP_DEFAULTS, "guidance_scale": _PAPER["og-stp"]["before"],
               "guidance_change_step": float(_PAPER["og-stp"]["t"])},
    "dtp": _DTP_DEFAULTS,
    "og-dtp": {**_DTP_DEFAULTS, "guidance_scale": abs(_PAPER["og-dtp"]["before"]), "guidance_scale_later": None},
}
# Flags a method does not use (a warning when given).
UNUSED_FLAGS = {
    "cfg": ("guidance_scale_later", "guidance_change_step", "CFG_scheduling_later", "og_mode", "og_precision"),
    "wen": ("guidance_scale_later", "guidance_change_step", "CFG_scheduling_later", "og_mode", "og_precision"),
    "stp": ("og_mode", "og_precision"), "og-stp": ("og_mode", "og_precision"),
    "dtp": ("guidance_change_step", "og_mode", "og_precision"),
    "og-dtp": ("guidance_change_step",),
}


def base_method(method: str) -> str:
    """The method a gated method mitigates with (``gated-og-stp`` -> ``og-stp``); others unchanged."""
    return method[len(GATED_PREFIX):] if method.startswith(GATED_PREFIX) else method


for _name in tuple(METHOD_DEFAULTS):  # gated-X: X's defaults and flags, plus the gate's flags
    if GATED_PREFIX + _name in METHODS:
        METHOD_DEFAULTS[GATED_PREFIX + _name] = METHOD_DEFAULTS[_name]
        UNUSED_FLAGS[GATED_PREFIX + _name] = UNUSED_FLAGS[_name]
    UNUSED_FLAGS[_name] += GATE_FLAGS

log = logging.getLogger("cfgbasin_jax.generate")


class CliError(ValueError):
    """Bad command-line input (one line)."""


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


def default_compilation_cache() -> str | None:
    """The library's default (:func:`cfgbasin_jax.runtime.compile_cache.default_dir`)."""
    from cfgbasin_jax.runtime.compile_cache import default_dir

    return default_dir()


def build_parser(prog: str = PROG, method: str | None = None) -> argparse.ArgumentParser:
    """The reference scripts' flags (same names); method-dependent defaults are None here and
    filled in by :func:`resolve` (see :data:`METHOD_DEFAULTS`)."""
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
    add("--dtype", default="float32", choices=DTYPES)
    add("--og_mode", default=None, choices=OG_MODES, help="og-dtp: exact (two passes, default) or causal")
    add("--og_precision", default=None, choices=OG_PRECISIONS,
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
    add("--plot", default="run", choices=PLOT_MODES,
        help="noise-difference plots: run (OUTDIR/noise_diff.png), images (also OUTDIR/Plots/{i}.png) or none")
    add("--progress", default="images", choices=PROGRESS_MODES,
        help="tqdm bars: images, steps (also per denoising step; such executables are never stored in "
             "the persistent compilation cache) or none")
    return p


def method_defaults(method: str) -> dict:
    """{flag dest: default} of ``--method method`` after :func:`resolve` fills the method-dependent
    ones (:data:`METHOD_DEFAULTS`)."""
    parser = build_parser(PROG, method)
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    defaults.update(METHOD_DEFAULTS[method])
    return defaults


# ------------------------------------------------------------------------------------------ settings


@dataclasses.dataclass
class Settings:
    """A validated run description (nothing written, no JAX backend touched yet)."""

    method: str
    label: str  # the method recorded in metadata (stp with a negative scale -> og-stp)
    model: Path
    unet_path: Path | None
    model_fingerprint: str
    unet_fingerprint: str | None
    outdir: Path
    guidance: G.Guidance
    scale_before: float
    scale_after: float
    scheduler: str
    num_inference_steps: int
    img_size: int
    seed: int
    dtype: str
    batch_size: int
    prompt_set: P.PromptSet
    start: int
    end: int
    process: D.ProcessInfo
    distributed_timeout: float
    compilation_cache: str | None
    plot: str
    progress: str
    baselines: dict
    resume: bool
    warnings: list
    argv: list
    gate_calibration: dict | None = None  # {"file", "prompts", "digest", "fpr"}: calibrate before sampling
    gate_threshold: float | None = None  # the threshold in use (given, or calibrated)

    def sampling_guidance(self) -> G.Guidance:
        """The schedule sampled: ``guidance`` with the calibrated threshold, if any."""
        if self.guidance.gate is not None and self.guidance.gate.threshold is None and self.gate_threshold is not None:
            return G.with_threshold(self.guidance, self.gate_threshold)
        return self.guidance

    def identity(self) -> dict:
        """What must match for a resume (paths absolute). The batch size is part of it: XLA's
        kernels depend on the batch shape, so another batch size may change a pixel by one level."""
        return {
            "method": self.label,
            "model": str(self.model),
            "model_fingerprint": self.model_fingerprint,
            "unet_path": None if self.unet_path is None else str(self.unet_path),
            "unet_fingerprint": self.unet_fingerprint,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "guidance": self.guidance.describe(),
            "scheduler": self.scheduler,
            "num_inference_steps": self.num_inference_steps,
            "img_size": self.img_size,
            "seed": self.seed,
            "exp": self.prompt_set.exp,
            "prompt_source": self.prompt_set.source,
            "baselines": self.baselines,
            **({"gate_calibration": {k: v for k, v in self.gate_calibration.items() if k != "prompts"}}
               if self.gate_calibration else {}),
        }

    def run_info(self) -> dict:
        return {
            "argv": self.argv,
            "start_iter": self.start,
            "end_iter": self.end,
            "batch_size": self.batch_size,
            "num_prompts_in_set": len(self.prompt_set),
            "prompt_digest": self.prompt_set.digest(self.start, self.end),
            "num_processes": self.process.num_processes,
            **({"gate_threshold": self.gate_threshold} if self.guidance.gate is not None else {}),
        }


def _resolve_hub_id(name: str) -> Path | None:
    """An "org/name" Hub id, downloaded or found in the cache (:mod:`cfgbasin_jax.loading.hub`); None
    for anything else. A Hub failure is one CliError line."""
    from cfgbasin_jax.loading import hub

    if not hub.is_repo_id(name):
        return None
    try:
        return hub.resolve(name)
    except hub.HubError as err:
        raise CliError(str(err)) from None


def resolve_model(name: str | None, env=None) -> Path:
    """The base model folder (symlinks resolved): ``name``, else $CFGBASIN_BASE_MODEL, else the SD
    1.4 hub id (local cache only)."""
    env = os.environ if env is None else env
    source = "--pretrained_model_name_or_path"
    if name is None:
        name, source = (env[ENV_BASE_MODEL], f"${ENV_BASE_MODEL}") if env.get(ENV_BASE_MODEL) else (
            HUB_DEFAULT_MODEL, "the default model")
    path = Path(name)
    if path.is_dir():
        return path.resolve()
    cached = None if path.exists() else _resolve_hub_id(str(name))
    if cached is not None:
        return cached
    raise CliError(f"model folder {name} ({source}) not found: pass --pretrained_model_name_or_path DIR "
                   f"(a diffusers SD folder or a converted directory) or a Hub id (org/name) or set ${ENV_BASE_MODEL}")


def resolve_unet(name: str | None) -> Path | None:
    """A diffusers unet/ folder (a folder with a unet/ subfolder is accepted too)."""
    if name is None:
        return None
    path = Path(name)
    if not path.is_dir():
        cached = None if path.exists() else _resolve_hub_id(str(name))
        if cached is None:
            raise CliError(f"--unet_path {name}: not a directory")
        path = cached
    if (path / "config.json").is_file():
        return path.resolve()
    if (path / "unet" / "config.json").is_file():
        return (path / "unet").resolve()
    raise CliError(f"--unet_path {name}: no config.json (need a diffusers unet/ folder)")


def _scheduler_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "").replace("-", "")
    key = {"dpm++2m": "dpm++2m"}.get(key, key)
    if key not in SCHEDULER_ALIASES:
        raise CliError(f"--scheduler {name!r} is not supported; use DPM, DDIM, Euler or PNDM")
    return SCHEDULER_ALIASES[key]


def _build_guidance(method: str, a) -> tuple[G.Guidance, float, float]:
    """(schedule, scale before, scale after) of ``--method method`` from the flags."""
    if method.startswith(GATED_PREFIX):
        return _build_gated(method, a)
    for flag in ("CFG_scheduling", "CFG_scheduling_later"):
        if getattr(a, flag) not in G.SHAPES:
            raise CliError(f"--{flag} {getattr(a, flag)!r} is not one of {', '.join(G.SHAPES)}")
    try:
        if method in ("cfg", "wen"):  # wen: Wen et al.'s embedding optimisation, then ordinary CFG
            g = G.constant(a.guidance_scale)
            if a.CFG_scheduling != "static":
                g = G.static_transition(0, a.guidance_scale, a.guidance_scale, a.CFG_scheduling, a.CFG_scheduling)
            return g, a.guidance_scale, a.guidance_scale
        if method in ("stp", "og-stp"):
            t = a.guidance_change_step
            if not (math.isfinite(t) and 0 <= t < 1000):
                raise CliError(f"--guidance_change_step {t:g} is outside [0, 1000)")
            # timesteps are whole numbers, so "t > step" and "t <= step" hold exactly as for floor(step)
            g = G.static_transition(math.floor(t), a.guidance_scale, a.guidance_scale_later, a.CFG_scheduling,
                                    a.CFG_scheduling_later)
            return g, a.guidance_scale, a.guidance_scale_later
        if method == "dtp":
            g = G.dynamic_transition(a.guidance_scale, a.guidance_scale_later, signal="noise_diff",
                                     shape_before=a.CFG_scheduling, shape_after=a.CFG_scheduling_later)
            return g, a.guidance_scale, a.guidance_scale_later
        before = -abs(a.guidance_scale)
        after = a.guidance_scale_later if a.guidance_scale_later is not None else abs(a.guidance_scale)
        g = G.dynamic_transition(before, after, signal="latent_cosine", mode=a.og_mode or "exact",
                                 shape_before=a.CFG_scheduling, shape_after=a.CFG_scheduling_later,
                                 precision=a.og_precision or "stable")
        return g, before, after
    except CliError:
        raise
    except ValueError as err:
        raise CliError(str(err)) from None


def _build_gated(method: str, a) -> tuple[G.Guidance, float, float]:
    """gated-X: X's schedule under a gate (threshold None while --gate_calibrate is pending)."""
    g, before, after = _build_guidance(base_method(method), a)
    if (a.gate_threshold is None) == (a.gate_calibrate is None):
        raise CliError(f"--method {method} needs exactly one of --gate_threshold and --gate_calibrate")
    if a.gate_fpr is not None and a.gate_calibrate is None:
        raise CliError("--gate_fpr applies only with --gate_calibrate")
    checks = {"gate_threshold": {"threshold": a.gate_threshold}, "gate_steps": {"steps": a.gate_steps},
              "gate_pre_scale": {"pre_scale": a.gate_pre_scale}}
    for flag, kwargs in checks.items():  # one flag at a time, so the error names it
        try:
            G.gated(g, **{"threshold": None, **kwargs})
        except ValueError as err:
            raise CliError(f"--{flag}: {err}") from None
    return G.gated(g, a.gate_threshold, steps=a.gate_steps, pre_scale=a.gate_pre_scale), before, after


def _gate_calibration(method: str, a) -> dict | None:
    """The prompts of --gate_calibrate and the false-positive rate, checked (nothing computed)."""
    if a.gate_calibrate is None or not method.startswith(GATED_PREFIX):
        return None
    from cfgbasin_jax.metrics.detection import DEFAULT_FPR

    fpr = DEFAULT_FPR if a.gate_fpr is None else a.gate_fpr
    if not 0.0 < fpr < 1.0:
        raise CliError(f"--gate_fpr must be in (0, 1), got {fpr:g}")
    path = Path(a.gate_calibrate)
    try:
        prompts = P.read_prompt_file(path)
    except P.PromptError as err:
        raise CliError(f"--gate_calibrate: {err}") from None
    digest = P.PromptSet("calibration", str(path.resolve()), tuple(prompts), ()).digest()
    return {"file": str(path.resolve()), "prompts": prompts, "digest": digest, "fpr": fpr}


def _baselines(a) -> dict:
    """The baseline options (see :func:`cfgbasin_jax.baselines.generate_options`), checked early."""
    if not a.prompt_augmentation and not a.cads:
        return {}
    from cfgbasin_jax import baselines

    if a.prompt_augmentation and a.prompt_augmentation not in baselines.AUGMENTATIONS:
        raise CliError(f"--prompt_augmentation {a.prompt_augmentation!r} is not one of "
                       f"{', '.join(baselines.AUGMENTATIONS)}")
    return {"prompt_augmentation": a.prompt_augmentation, "cads": bool(a.cads)}


def given_flags(argv) -> set:
    """Names of the flags written on the command line (``--name`` or ``--name=value``)."""
    return {arg[2:].split("=", 1)[0] for arg in argv if isinstance(arg, str) and arg.startswith("--")}


def _check_numbers(a) -> None:
    """Flags whose range does not depend on the model."""
    for flag in ("num_inference_steps", "batch_size", "img_size"):
        if getattr(a, flag) < 1:
            raise CliError(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    if not SEED_RANGE[0] <= a.seed <= SEED_RANGE[1]:
        raise CliError(f"--seed {a.seed} must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (JAX's 32-bit PRNG seed)")
    if not a.distributed_timeout > 0 or a.distributed_timeout == float("inf"):
        raise CliError(f"--distributed_timeout must be a finite number > 0, got {a.distributed_timeout:g}")


def check_schedule(model: Path, scheduler: str, num_inference_steps: int, guidance: G.Guidance) -> None:
    """Check --scheduler, --num_inference_steps and the guidance schedule (a static transition
    timestep included) against ``model``'s scheduler config, as sampling would; host-side only."""
    from cfgbasin_jax import schedulers
    from cfgbasin_jax.models.components import read_scheduler_config

    config = read_scheduler_config(model / "scheduler")
    try:
        num_train = schedulers.resolve_config(scheduler, config)["num_train_timesteps"]
    except ValueError as err:
        raise CliError(f"--scheduler {scheduler}: {err} ({model / 'scheduler'})") from None
    if not 1 <= num_inference_steps <= num_train:
        raise CliError(f"--num_inference_steps {num_inference_steps} must be in [1, {num_train}] "
                       f"(the model's num_train_timesteps)")
    try:
        timesteps = schedulers.scheduler_tables(scheduler, config, num_inference_steps)[2]
    except ValueError as err:
        raise CliError(f"--num_inference_steps {num_inference_steps}: {err}") from None
    if guidance.rule == "static" and not 0 <= guidance.t < num_train:
        raise CliError(f"--guidance_change_step {guidance.t} must be in [0, {num_train - 1}] "
                       f"(a timestep of the model's {num_train})")
    if guidance.gate is not None and guidance.gate.steps >= len(timesteps):
        raise CliError(f"--gate_steps {guidance.gate.steps} must be < the {len(timesteps)} sampling steps "
                       "(--num_inference_steps)")
    try:
        G.check_steps(guidance, len(timesteps), num_train)  # host only: no JAX backend before distributed init
    except ValueError as err:
        raise CliError(str(err)) from None


def resolve(a: argparse.Namespace, method: str | None, argv: list, env=None) -> Settings:
    """Validate everything that can be checked without writing or touching a JAX backend."""
    from cfgbasin_jax import loading as FP

    method = method or a.method
    if method not in METHODS:
        raise CliError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    given = given_flags(argv)
    warnings = [f"--{flag} is not used by --method {method}" for flag in UNUSED_FLAGS[method] if flag in given]
    for key, value in METHOD_DEFAULTS[method].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    guidance, before, after = _build_guidance(method, a)
    base = base_method(method)
    label = "og-stp" if base in ("stp", "og-stp") and before < 0 else ("stp" if base == "og-stp" else base)
    label = method[: len(method) - len(base)] + label  # gated-stp with a negative scale -> gated-og-stp
    gate_calibration = _gate_calibration(method, a)
    _check_numbers(a)
    if guidance.rule == "dynamic" and a.num_inference_steps < 3:
        raise CliError(f"--num_inference_steps {a.num_inference_steps}: a dynamic transition needs at least 3 steps")
    scheduler = _scheduler_name(a.scheduler)
    baselines = _baselines(a)
    try:
        process = D.resolve(a.coordinator, a.num_processes, a.process_id, auto=a.distributed, env=env)
    except D.DistributedError as err:
        raise CliError(str(err)) from None
    prompt_set = P.load_prompt_set(a.exp, a.prompt_json, n_draw=a.end_iter if a.exp == "laion10k" else None)
    start, end = P.select_range(prompt_set, a.start_iter, a.end_iter)
    model = resolve_model(a.pretrained_model_name_or_path, env)
    unet = resolve_unet(a.unet_path)
    check_schedule(model, scheduler, a.num_inference_steps, guidance)
    outdir = R.check_outdir(a.outdir)
    if a.compilation_cache and not a.no_compilation_cache:
        F.check_writable_dir(a.compilation_cache, "--compilation_cache")
    cache = None if a.no_compilation_cache else (a.compilation_cache or default_compilation_cache())
    settings = Settings(
        method=method, label=label, model=model, unet_path=unet, model_fingerprint=FP.model_fingerprint(model),
        unet_fingerprint=None if unet is None else FP.unet_fingerprint(unet), outdir=outdir, guidance=guidance,
        scale_before=before, scale_after=after, scheduler=scheduler, num_inference_steps=a.num_inference_steps,
        img_size=a.img_size, seed=a.seed, dtype=a.dtype, batch_size=a.batch_size, prompt_set=prompt_set,
        start=start, end=end, process=process, distributed_timeout=a.distributed_timeout, compilation_cache=cache,
        plot=a.plot, progress=a.progress, baselines=baselines, resume=False, warnings=warnings, argv=list(argv),
        gate_calibration=gate_calibration, gate_threshold=a.gate_threshold,
    )
    settings.resume = R.check_config(outdir, settings.identity())
    return settings


# --------------------------------------------------------------------------------------- execution

_PIPELINES: dict = {}


def cached_pipeline(model: Path, unet_path: Path | None, dtype: str, fingerprint=None):
    """One loaded Pipeline per (model, unet, dtype) per process, so repeated in-process runs reuse
    its compiled samplers. A ``fingerprint`` other than the cached pipeline's (another model now
    at the same path) loads it again."""
    import cfgbasin_jax

    key = (str(model), None if unet_path is None else str(unet_path), dtype)
    if key in _PIPELINES and fingerprint is not None and _PIPELINES[key][0] != fingerprint:
        del _PIPELINES[key]
    if key not in _PIPELINES:
        if len(_PIPELINES) >= 2:
            _PIPELINES.pop(next(iter(_PIPELINES)))
        # The command configures the compilation cache itself (--compilation_cache / --no_compilation_cache).
        _PIPELINES[key] = (fingerprint, cfgbasin_jax.load_pipeline(model, dtype=dtype, unet_path=unet_path,
                                                                   compilation_cache=False))
    return _PIPELINES[key][1]


class _LogFile(logging.FileHandler):
    """run.log: a record that cannot be written (full disk) is dropped without the logging module's
    traceback; the run's own writes report the error."""

    def handleError(self, record):
        pass


def _log_handler(handler: logging.Handler, process: D.ProcessInfo) -> logging.Handler:
    handler.setFormatter(logging.Formatter(f"%(asctime)s [p{process.process_id}] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def _log_teardown(handlers: list) -> None:
    for h in handlers:
        log.removeHandler(h)
        h.close()


def transition_tag(method: str, index: int, t: int) -> int | None:
    """What the image name carries: dtp the transition timestep, og-dtp the step index."""
    if method == "dtp":
        return int(t)
    if method == "og-dtp":
        return int(index)
    return None


def _generate_kwargs(s: Settings) -> dict:
    """Pipeline.generate arguments of every batch (its default devices are this process's local
    devices, never another process's)."""
    return dict(guidance=s.sampling_guidance(), num_inference_steps=s.num_inference_steps, seed=s.seed, height=s.img_size,
                width=s.img_size, scheduler=s.scheduler, progress=s.progress == "steps")


def _records(s: Settings, batch: list[int], prompts: list[str], res, n_tokens: dict, max_len: int) -> list[dict]:
    out = []
    for k, i in enumerate(batch):
        index, t = int(res.transition_index[k]), int(res.transition_t[k])
        rec = {
            "index": i,
            "prompt": s.prompt_set.prompts[i],
            "file": R.image_file(i, transition_tag(base_method(s.method), index, t)),
            "seed": s.seed,
            "method": s.label,
            "guidance_scale": s.scale_before,
            "guidance_scale_later": s.scale_after,
            "guidance": s.guidance.describe(),
            "transition_index": index,
            "transition_t": t,
            "noise_diff": res.noise_diff[k],
            "nonfinite": bool(res.nonfinite[k]),
            "unet_evals": res.unet_evals / len(prompts),  # this image's share of its batch's UNet work
            "n_tokens": n_tokens[i],
            "truncated": n_tokens[i] > max_len,
            "source": s.prompt_set.extras[i],
        }
        if base_method(s.method) == "og-dtp":
            rec["latent_cosine"] = res.latent_cosine[k]
        if res.gate_score is not None:
            rec.update(gate_score=float(res.gate_score[k]), gate_flagged=bool(res.gate_flagged[k]),
                       gate_threshold=s.gate_threshold)
        if prompts[k] != rec["prompt"]:
            rec["prompt_used"] = prompts[k]
        out.append(rec)
    return out


def execute(s: Settings) -> int:
    """Run a validated :class:`Settings`: start processes, load, generate what is missing, merge."""
    from cfgbasin_jax.runtime import compile_cache
    from cfgbasin_jax.runtime.compile_cache import CompileStats

    old_cache = compile_cache.configure(s.compilation_cache)
    handlers = [_log_handler(logging.StreamHandler(sys.stderr), s.process)]
    lock = None
    try:
        try:  # first: a peer that never comes ends this process (watchdog) with nothing written
            s.process = D.initialize(s.process, s.distributed_timeout)
        except D.DistributedError as err:
            raise CliError(str(err)) from None
        lock = lock_outdir(s)
        with CompileStats() as stats:
            return _execute(s, stats, handlers)
    finally:
        _log_teardown(handlers)
        compile_cache.restore(old_cache)
        if lock is not None:
            lock.release()


def lock_outdir(s: Settings) -> R.RunLock:
    """Take OUTDIR's run lock (see :mod:`cfgbasin_jax.runs.folder`), then check the stored configuration
    again: another run may have written it since :func:`resolve` looked."""
    lock = R.RunLock(s.outdir, s.process.process_id).acquire()
    try:
        if lock.stale_owner:
            log.warning("warning: took over the lock of a run that is gone (%s)", F.describe_owner(lock.stale_owner))
        s.resume = R.check_config(s.outdir, s.identity())
    except BaseException:
        lock.release()
        raise
    return lock


def _execute(s: Settings, stats, handlers: list) -> int:
    from cfgbasin_jax.models.errors import ConversionError

    t_load = time.perf_counter()
    try:
        pipe = cached_pipeline(s.model, s.unet_path, s.dtype, (s.model_fingerprint, s.unet_fingerprint))
        pipe.latent_hw(s.img_size, s.img_size)
    except ConversionError as err:
        raise CliError(f"cannot load the model: {err}") from None
    except ValueError as err:
        raise CliError(f"--img_size {s.img_size}: {err}") from None
    load_s = time.perf_counter() - t_load
    if s.gate_calibration is not None:
        calibrate_gate(s, pipe)
    prompts = list(s.prompt_set.prompts)
    extra_kwargs = {}
    if s.baselines:
        import importlib

        baselines = importlib.import_module("cfgbasin_jax.baselines")
        prompts, extra_kwargs = baselines.generate_options(
            prompts, list(range(len(prompts))), seed=s.seed, tokenizer=pipe.tokenizer, **s.baselines)

    # From here on OUTDIR is written.
    try:
        return _write_run(s, stats, handlers, pipe, prompts, extra_kwargs, load_s)
    except OSError as err:
        raise R.RunError(f"{F.describe(err)}; every finished image is kept: fix this and rerun the same "
                         "command to resume") from None


def calibrate_gate(s: Settings, pipe) -> None:
    """Set ``s.gate_threshold`` from the --gate_calibrate prompts (sampled as the run samples: same
    seed, steps, size, scheduler and batch size; sample indices 0..N-1)."""
    from cfgbasin_jax.pipeline import calibrate_threshold

    cal = s.gate_calibration
    t0 = time.perf_counter()
    kwargs = {**_generate_kwargs(s), "progress": False, "batch_size": s.batch_size}
    kwargs.pop("guidance")
    s.gate_threshold = calibrate_threshold(pipe, cal["prompts"], s.guidance, cal["fpr"], **kwargs)
    log.info("gate threshold %.4f: the %g quantile of %d plain prompts' scores (%s), %.1f s", s.gate_threshold,
             1 - cal["fpr"], len(cal["prompts"]), cal["file"], time.perf_counter() - t0)


def _write_run(s: Settings, stats, handlers: list, pipe, prompts: list, extra_kwargs: dict,
               load_s: float) -> int:
    """Generate the missing images of the run into OUTDIR (the part of a run that writes)."""
    from tqdm.auto import tqdm

    pid, nproc = s.process.process_id, s.process.num_processes
    R.make_dirs(s.outdir, plots=s.plot == "images")
    log_file = s.outdir / R.log_name(pid, nproc)
    handlers.append(_log_handler(_LogFile(log_file, encoding="utf-8"), s.process))
    if s.process.is_main:
        R.write_config(s.outdir, s.identity(), s.run_info(), pid)
    R.clean_temp_files(s.outdir, pid)
    log.info("%s: %s, %s; prompts %s [%d, %d) of %d; model %s%s; %s", s.label, s.guidance.describe(), s.scheduler,
             s.prompt_set.exp, s.start, s.end, len(s.prompt_set), s.model,
             f" + unet {s.unet_path}" if s.unet_path else "", "resuming" if s.resume else "new run")
    for w in s.warnings:
        log.warning("warning: %s", w)
    import jax

    log.info("model loaded in %.1f s; process %d of %d; %d local device(s)", load_s, pid, nproc,
             len(jax.local_devices()))

    done = R.completed(s.outdir, R.read_records(s.outdir))
    R.check_prompts(done, s.prompt_set.prompts, s.outdir)
    mine = D.share(D.batch_grid(s.start, s.end, s.batch_size), s.batch_size, pid, nproc)
    todo = [(b, [i for i in b if i not in done]) for b in mine]
    todo = [(b, missing) for b, missing in todo if missing]
    n_todo = sum(len(m) for _, m in todo)
    n_mine = sum(len(b) for b in mine)
    log.info("%d of this process's %d images already done; %d to generate in %d batch(es) of %d",
             n_mine - n_todo, n_mine, n_todo, len(todo), s.batch_size)

    wanted = sorted({i for b, _ in todo for i in b})
    counts = dict(zip(wanted, P.token_counts(pipe.tokenizer, [prompts[i] for i in wanted]))) if wanted else {}
    max_len = int(pipe.tokenizer.model_max_length)
    n_trunc = sum(1 for v in counts.values() if v > max_len)
    if n_trunc:
        log.info("%d prompt(s) longer than %d tokens are truncated as SD's CLIP tokenizer does", n_trunc, max_len)

    kwargs = {**_generate_kwargs(s), **extra_kwargs}
    stats.reset()  # report the sampling compiles only
    n_new = n_nonfinite = 0
    t_run = time.perf_counter()
    writer = R.MetadataWriter(s.outdir, R.metadata_name(pid, nproc))
    try:
        bar = tqdm(total=n_todo, unit="img", desc=s.label, disable=s.progress == "none")
        for k, (batch, missing) in enumerate(todo):
            padded = batch + [batch[-1]] * (s.batch_size - len(batch))
            batch_prompts = [prompts[i] for i in padded]
            t0 = time.perf_counter()
            if s.method == "wen":
                from cfgbasin_jax import baselines

                res, _ = baselines.wen_generate(pipe, batch_prompts, sample_indices=padded, **kwargs)
            else:
                res = pipe.generate(batch_prompts, sample_indices=padded, **kwargs)
            recs = _records(s, batch, batch_prompts, res, counts, max_len)
            new = [r for r in recs if r["index"] in set(missing)]
            for r in new:
                R.write_png(s.outdir, r["file"], res.images[batch.index(r["index"])], pid)
            writer.append(new)
            n_new += len(new)
            n_nonfinite += sum(r["nonfinite"] for r in new)
            bar.update(len(new))
            if k == 0:
                log.info("first batch %.1f s: %s", time.perf_counter() - t0, stats.summary(s.compilation_cache))
        bar.close()
    finally:
        writer.close()
    run_s = time.perf_counter() - t_run
    if n_nonfinite:
        log.warning("warning: %d image(s) had non-finite latents (metadata 'nonfinite')", n_nonfinite)

    D.barrier("cfgbasin_generate_done", s.process)
    if s.process.is_main:
        records = R.merge_metadata(s.outdir, pid)
        in_range = [r for r in records if s.start <= r["index"] < s.end]
        if s.plot != "none" and in_range:
            from cfgbasin_jax.apps import plots

            plots.plot_run(in_range, s.outdir / "noise_diff.png", title=f"{s.label}: noise difference, "
                           f"{len(in_range)} image(s); o = transition")
            if s.plot == "images":
                for r in in_range:
                    plots.plot_image(r, s.outdir / R.PLOTS_DIR / f"{r['index']}.png")
        log.info("metadata.jsonl: %d image(s) in %s", len(records), s.outdir)
    rate = f", {n_new / run_s:.2f} img/s" if n_new and run_s > 0 else ""
    log.info("done: %d new image(s) in %.1f s%s; %s; sampler compilations %d", n_new, run_s, rate,
             stats.summary(s.compilation_cache), pipe.compile_count())
    return 0


def main(argv=None, method: str | None = None, prog: str | None = None) -> int:
    """Entry point of ``cfgbasin-generate`` and the wrapper scripts (``method`` fixed there).
    Returns the exit status: 0 done, 2 bad input."""
    from cfgbasin_jax.models.errors import ConversionError

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or PROG
    try:
        with F.terminate_raises():
            args = build_parser(prog, method).parse_args(argv)
            settings = resolve(args, method, argv)
            return execute(settings)
    except (CliError, P.PromptError, R.RunError, D.DistributedError, ConversionError, F.FileError) as err:
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
