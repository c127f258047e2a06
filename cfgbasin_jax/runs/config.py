"""One run of ``cfgbasin-generate`` as a frozen :class:`RunConfig`, validated once (:func:`from_flags`).

Every field is declared as part of the run identity or not (:func:`identity` / :func:`run_only`);
:meth:`RunConfig.identity` is derived from those declarations (config.json's "identity": what a resume
must match), and :func:`identity_fields` refuses a field without a declaration. The paper's experiments
are named presets, one function each (:func:`laion10k`, :func:`sdv1_pretrained`, :func:`memorized200`):
{setting: value} with the scripts' flag names, which are the setting names here.

Everything that can be checked without writing or touching a JAX backend is checked here: the flags,
the method's guidance (errors name the flag), the prompt set, the model folders against their
scheduler config (steps, transition timestep), the memory an image size needs, OUTDIR and the
compilation cache. A :class:`ConfigError` is one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import registry as M
from cfgbasin_jax.runs import distributed as D
from cfgbasin_jax.runs import prompts as P
from cfgbasin_jax.runtime import files as F

ENV_BASE_MODEL = "CFGBASIN_BASE_MODEL"
HUB_DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DTYPES = ("float32", "bfloat16", "float16")
SCRIPT_PIXELS = "truncate"
"""The paper scripts' uint8 conversion: the official ``(x * 255).to(torch.uint8)`` (the library rounds;
see :data:`cfgbasin_jax.pipeline.PIXEL_RULES`)."""
PLOT_MODES = ("none", "run", "images")
PROGRESS_MODES = ("none", "images", "steps")
SEED_RANGE = (0, 2**32 - 1)  # jax.random.PRNGKey keeps 32 bits: 2**32 would repeat seed 0
# The reference scripts' --scheduler names (and ours) -> cfgbasin_jax.schedulers names.
SCHEDULER_ALIASES = {
    "dpm": "dpm++2m", "dpm++2m": "dpm++2m", "dpmsolver": "dpm++2m", "dpmsolvermultistep": "dpm++2m",
    "ddim": "ddim", "euler": "euler", "pndm": "pndm", "plms": "pndm",
}
# Full-resolution activations of the VAE decoder's last stage: channels x H x W float32 per image (SD: 128).
DECODER_CHANNELS_DEFAULT = 128


class ConfigError(ValueError):
    """A setting that cannot be used (one line naming the flag)."""


# ------------------------------------------------------------------------------ the experiments


def laion10k() -> dict:
    """The paper's LAION-10k experiment (the STP script's defaults): 256 px, 10,000 prompts drawn
    from --prompt_json."""
    return {"exp": "laion10k", "img_size": 256, "end_iter": 10000,
            "outdir": "LAION_10k_DCR_with_text_100000_0_500_7_5_else_cosine_1"}


def sdv1_pretrained() -> dict:
    """The paper's pretrained SD v1 memorized prompts (the DTP / OG scripts' defaults): 512 px, the
    first 200 (the packaged sdv1_500_memorized.jsonl)."""
    return {"exp": "sdv1_pretrained", "img_size": 512, "end_iter": 200, "outdir": "output"}


def memorized200() -> dict:
    """The 200 memorized images of the fine-tuned models (the README's DTP / OG commands:
    --exp 200_memorized --end_iter 200, captions from memorized_images/), 512 px."""
    return {"exp": "200_memorized", "img_size": 512, "end_iter": 200, "outdir": "output"}


PRESETS = {"laion10k": laion10k, "sdv1_pretrained": sdv1_pretrained, "200_memorized": memorized200}


def script_defaults(method) -> dict:
    """{flag: default} of a method's paper script: its experiment preset and its guidance flags."""
    m = M.get(method)
    return {**PRESETS[m.script.preset](), **m.script.defaults}


# ------------------------------------------------------------------------------ the run config


def identity(key: str | None = None, encode=None, omit_none: bool = False):
    """A field of the run identity, recorded as ``key`` (default: its name) after ``encode``."""
    return dataclasses.field(metadata={"identity": True, "key": key, "encode": encode, "omit_none": omit_none})


def run_only(default=dataclasses.MISSING):
    """A field that may change between a run and its resume."""
    return dataclasses.field(default=default, metadata={"identity": False})


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """--gate_calibrate: the plain prompts and the false-positive rate of the threshold."""

    file: str
    prompts: tuple
    digest: str
    fpr: float

    def describe(self) -> dict:
        return {"file": self.file, "digest": self.digest, "fpr": self.fpr}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A validated run: nothing written, no JAX backend touched. Identity fields first."""

    label: str = identity(key="method")  # the method name recorded (stp with a negative scale: og-stp)
    model: Path = identity(encode=str)
    model_fingerprint: str = identity()
    unet_path: Path | None = identity(encode=_str_or_none)
    unet_fingerprint: str | None = identity()
    batch_size: int = identity()
    dtype: str = identity()
    pixels: str = identity()  # uint8 conversion: "truncate" (the official scripts') or "round"
    guidance: G.Guidance = identity(encode=G.Guidance.describe)
    scheduler: str = identity()
    num_inference_steps: int = identity()
    img_size: int = identity()
    seed: int = identity()
    exp: str = identity()
    prompt_source: str = identity()
    hook: M.Hook = identity(key="baselines", encode=M.Hook.options)
    gate_calibration: Calibration | None = identity(encode=Calibration.describe, omit_none=True)

    method: M.Method = run_only()
    outdir: Path = run_only()
    prompt_set: P.PromptSet = run_only()
    start_iter: int = run_only()
    end_iter: int = run_only()
    process: D.ProcessInfo = run_only()
    distributed_timeout: float = run_only(D.DEFAULT_TIMEOUT_S)
    compilation_cache: str | None = run_only(None)
    plot: str = run_only("run")
    progress: str = run_only("images")
    warnings: tuple = run_only(())
    argv: tuple = run_only(())
    # The Hub revision and weight variant pick the files; the identity holds what they picked: `model`
    # (a Hub snapshot's folder is named by its commit) and `model_fingerprint` (of the files read).
    revision: str | None = run_only(None)
    variant: str | None = run_only(None)

    def identity(self) -> dict:
        """What must match for a resume (derived from the field declarations). The batch size is part
        of it: XLA's kernels depend on the batch shape, so another batch size may change a pixel."""
        out = {}
        for f in identity_fields(type(self)):
            value = getattr(self, f.name)
            if value is None and f.metadata["omit_none"]:
                continue
            encode = f.metadata["encode"]
            out[f.metadata["key"] or f.name] = value if encode is None or value is None else encode(value)
        return out

    def run_info(self, gate_threshold=None) -> dict:
        """config.json's "run": what may differ between a run and its resume."""
        return {
            "argv": list(self.argv),
            "start_iter": self.start_iter,
            "end_iter": self.end_iter,
            "batch_size": self.batch_size,
            "num_prompts_in_set": len(self.prompt_set),
            "prompt_digest": self.prompt_set.digest(self.start_iter, self.end_iter),
            "num_processes": self.process.num_processes,
            **({"gate_threshold": gate_threshold} if self.guidance.gate is not None else {}),
        }

    @property
    def scale_before(self):
        return self.guidance.before

    @property
    def scale_after(self):
        return self.guidance.after


def identity_fields(cls=RunConfig) -> tuple:
    """The identity fields of ``cls``; a TypeError names any field declared neither way."""
    undeclared = [f.name for f in dataclasses.fields(cls) if "identity" not in f.metadata]
    if undeclared:
        raise TypeError(f"{cls.__name__}: declare {', '.join(undeclared)} with identity() or run_only()")
    return tuple(f for f in dataclasses.fields(cls) if f.metadata["identity"])


identity_fields()  # a field added without a declaration fails at import


# ------------------------------------------------------------------------------ model folders


def find_model_folder(name: str, revision: str | None = None, variant: str | None = None) -> Path | None:
    """``name`` as a folder: a local directory, or an "org/name" Hub id downloaded or found in the cache
    (:mod:`cfgbasin_jax.loading.hub`: its ``revision``, the ``variant``'s weights; a Hub failure is one
    ConfigError line). None when neither. The one place a model name becomes a path."""
    path = Path(name)
    if path.is_dir():
        return path.resolve()
    from cfgbasin_jax.loading import hub

    if path.exists() or not hub.is_repo_id(str(name)):
        return None
    try:
        return hub.resolve(str(name), revision=revision, variant=variant)
    except hub.HubError as err:
        raise ConfigError(str(err)) from None


def resolve_model(name: str | None, env=None, revision: str | None = None, variant: str | None = None) -> Path:
    """The base model folder (symlinks resolved): ``name``, else $CFGBASIN_BASE_MODEL, else the SD
    1.4 Hub id (a Hub id at ``revision``, with the ``variant``'s weights)."""
    env = os.environ if env is None else env
    source = "--pretrained_model_name_or_path"
    if name is None:
        name, source = (env[ENV_BASE_MODEL], f"${ENV_BASE_MODEL}") if env.get(ENV_BASE_MODEL) else (
            HUB_DEFAULT_MODEL, "the default model")
    found = find_model_folder(name, revision, variant)
    if found is None:
        raise ConfigError(f"model folder {name} ({source}) not found: pass --pretrained_model_name_or_path DIR "
                          f"(a diffusers SD folder or a converted directory) or a Hub id (org/name) or set ${ENV_BASE_MODEL}")
    return found


def resolve_unet(name: str | None, revision: str | None = None, variant: str | None = None) -> Path | None:
    """A diffusers unet/ folder (a folder with a unet/ subfolder is accepted too; a Hub id at
    ``revision``, with the ``variant``'s weights, as :func:`cfgbasin_jax.load_pipeline`)."""
    if name is None:
        return None
    path = find_model_folder(name, revision, variant)
    if path is None:
        raise ConfigError(f"--unet_path {name}: not a directory")
    for folder in (path, path / "unet"):
        if (folder / "config.json").is_file():
            return folder.resolve()
    raise ConfigError(f"--unet_path {name}: no config.json (need a diffusers unet/ folder)")


# ------------------------------------------------------------------------------ checks


def scheduler_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "").replace("-", "")
    if key not in SCHEDULER_ALIASES:
        raise ConfigError(f"--scheduler {name!r} is not supported; use DPM, DDIM, Euler or PNDM")
    return SCHEDULER_ALIASES[key]


def check_numbers(f: Mapping) -> None:
    """Flags whose range does not depend on the model."""
    for flag in ("num_inference_steps", "batch_size", "img_size"):
        if f[flag] < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {f[flag]}")
    if not SEED_RANGE[0] <= f["seed"] <= SEED_RANGE[1]:
        raise ConfigError(f"--seed {f['seed']} must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (JAX's 32-bit PRNG seed)")
    if not f["distributed_timeout"] > 0 or f["distributed_timeout"] == float("inf"):
        raise ConfigError(f"--distributed_timeout must be a finite number > 0, got {f['distributed_timeout']:g}")


def check_schedule(model: Path, scheduler: str, num_inference_steps: int, guidance: G.Guidance) -> None:
    """--scheduler, --num_inference_steps and the guidance schedule (a static transition timestep, the
    gate's steps) against ``model``'s scheduler config, as sampling would; host-side only."""
    from cfgbasin_jax import schedulers
    from cfgbasin_jax.models.components import read_scheduler_config

    config = read_scheduler_config(model / "scheduler")
    try:
        num_train = schedulers.resolve_config(scheduler, config)["num_train_timesteps"]
    except ValueError as err:
        raise ConfigError(f"--scheduler {scheduler}: {err} ({model / 'scheduler'})") from None
    if not 1 <= num_inference_steps <= num_train:
        raise ConfigError(f"--num_inference_steps {num_inference_steps} must be in [1, {num_train}] "
                          f"(the model's num_train_timesteps)")
    try:
        steps = len(schedulers.scheduler_tables(scheduler, config, num_inference_steps)[2])
    except ValueError as err:
        raise ConfigError(f"--num_inference_steps {num_inference_steps}: {err}") from None
    if guidance.rule == "static" and not 0 <= guidance.t < num_train:
        raise ConfigError(f"--guidance_change_step {guidance.t} must be in [0, {num_train - 1}] "
                          f"(a timestep of the model's {num_train})")
    if guidance.gate is not None and guidance.gate.steps >= steps:
        raise ConfigError(f"--gate_steps {guidance.gate.steps} must be < the {steps} sampling steps "
                          "(--num_inference_steps)")
    try:
        G.check_steps(guidance, steps, num_train)  # host only: no JAX backend before distributed init
    except ValueError as err:
        raise ConfigError(f"--num_inference_steps {num_inference_steps}: {err}") from None


def physical_memory() -> int:
    """Bytes of this machine's memory (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(model: Path, img_size: int, batch_size: int, memory: int | None = None) -> None:
    """Refuse an --img_size / --batch_size whose decoded batch cannot fit: the VAE decoder's last stage
    holds ``channels x img_size^2`` float32 per image at full resolution (a lower bound of the peak)."""
    from cfgbasin_jax.models.components import read_json

    memory = physical_memory() if memory is None else memory
    channels = DECODER_CHANNELS_DEFAULT
    try:
        channels = int(read_json(model / "vae" / "config.json")["block_out_channels"][0])
    except Exception:  # a converted or pixel model without that file: SD's 128
        pass
    need = batch_size * channels * img_size * img_size * 4
    if memory and need > memory:
        raise ConfigError(f"--img_size {img_size} with --batch_size {batch_size} needs at least {need / 2**30:.0f} GiB "
                          f"(the VAE decoder's full-resolution activations), more than this machine's "
                          f"{memory / 2**30:.0f} GiB")


def check_outdir(outdir, model: Path, unet: Path | None) -> Path:
    """OUTDIR must be writable, and lie outside the model folders (a run's outputs would change the
    model's fingerprint, so it could never resume)."""
    from cfgbasin_jax.runs import folder as R

    out = R.check_outdir(outdir)
    for folder, flag in ((model, "--pretrained_model_name_or_path"), (unet, "--unet_path")):
        if folder is not None and F.is_within(out, folder):
            raise ConfigError(f"--outdir {outdir}: inside the model folder {folder} ({flag}); a run there changes "
                              "the model's fingerprint and could never resume: use a folder outside it")
    return out


def check_cache_dir(path) -> str:
    """--compilation_cache: a folder that exists afterwards and takes a file (created when missing)."""
    try:
        F.check_writable_dir(path, "--compilation_cache")
        folder = Path(path).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except F.FileError as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise ConfigError(f"--compilation_cache {path}: not a usable folder ({err.strerror or err})") from None
    return str(folder)


def _calibration(m: M.Method, f: Mapping) -> Calibration | None:
    """--gate_calibrate / --gate_fpr of a gated method, checked (nothing computed)."""
    if not m.is_gated:
        return None
    if (f.get("gate_threshold") is None) == (f.get("gate_calibrate") is None):
        raise ConfigError(f"--method {m.name} needs exactly one of --gate_threshold and --gate_calibrate")
    if f.get("gate_fpr") is not None and f.get("gate_calibrate") is None:
        raise ConfigError("--gate_fpr applies only with --gate_calibrate")
    if f.get("gate_calibrate") is None:
        return None
    from cfgbasin_jax.metrics.detection import DEFAULT_FPR

    fpr = DEFAULT_FPR if f.get("gate_fpr") is None else f["gate_fpr"]
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"--gate_fpr must be in (0, 1), got {fpr:g}")
    path = Path(f["gate_calibrate"])
    try:
        prompts = P.read_prompt_file(path)
    except P.PromptError as err:
        raise ConfigError(f"--gate_calibrate: {err}") from None
    digest = P.PromptSet("calibration", str(path.resolve()), tuple(prompts), ()).digest()
    return Calibration(str(path.resolve()), tuple(prompts), digest, fpr)


def _hook(m: M.Method, f: Mapping) -> M.Hook:
    """The method's baseline hook with --prompt_augmentation and --cads on top."""
    from cfgbasin_jax.baselines import AUGMENTATIONS

    kind = f.get("prompt_augmentation")
    if kind and kind not in AUGMENTATIONS:
        raise ConfigError(f"--prompt_augmentation {kind!r} is not one of {', '.join(AUGMENTATIONS)}")
    hook = m.hook or M.NO_HOOK
    return dataclasses.replace(hook, augmentation=kind or hook.augmentation, cads=bool(f.get("cads")) or hook.cads)


def from_flags(flags: Mapping[str, Any], method=None, given=(), argv=(), env=None) -> RunConfig:
    """The validated :class:`RunConfig` of the paper scripts' ``flags`` ({flag: value}, None: the
    method's default; see :func:`script_defaults`); ``given``: the flags on the command line (a
    flag the method does not read is a warning)."""
    from cfgbasin_jax import loading

    try:
        m = M.get(method or flags["method"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    f = {**flags, **{k: v for k, v in script_defaults(m).items() if flags.get(k) is None}}
    warnings = tuple(f"--{flag} is not used by --method {m.name}" for flag in m.script.ignored() if flag in given)
    try:
        guidance = m.from_flags(f)
    except M.FlagError as err:
        raise ConfigError(str(err)) from None
    calibration = _calibration(m, f)
    check_numbers(f)
    scheduler = scheduler_name(f["scheduler"])
    hook = _hook(m, f)
    try:
        process = D.resolve(f.get("coordinator"), f.get("num_processes"), f.get("process_id"),
                            auto=bool(f.get("distributed")), env=env)
    except D.DistributedError as err:
        raise ConfigError(str(err)) from None
    prompt_set = P.load_prompt_set(f["exp"], f.get("prompt_json"), n_draw=f["end_iter"] if f["exp"] == "laion10k" else None)
    start, end = P.select_range(prompt_set, f["start_iter"], f["end_iter"])
    revision, variant = f.get("revision"), f.get("variant")
    model = resolve_model(f.get("pretrained_model_name_or_path"), env, revision, variant)
    unet = resolve_unet(f.get("unet_path"), revision, variant)
    check_schedule(model, scheduler, f["num_inference_steps"], guidance)
    check_memory(model, f["img_size"], f["batch_size"])
    outdir = check_outdir(f["outdir"], model, unet)
    cache = None
    if not f.get("no_compilation_cache"):
        if f.get("compilation_cache"):
            cache = check_cache_dir(f["compilation_cache"])
        else:
            from cfgbasin_jax.runtime.compile_cache import default_dir

            cache = default_dir()
    return RunConfig(
        label=m.recorded_name(guidance.before), model=model, model_fingerprint=loading.model_fingerprint(model, variant),
        unet_path=unet, unet_fingerprint=None if unet is None else loading.unet_fingerprint(unet, variant),
        batch_size=f["batch_size"], dtype=f["dtype"], pixels=f["pixels"], guidance=guidance, scheduler=scheduler,
        num_inference_steps=f["num_inference_steps"], img_size=f["img_size"], seed=f["seed"], exp=prompt_set.exp,
        prompt_source=prompt_set.source, hook=hook, gate_calibration=calibration, method=m, revision=revision,
        variant=variant, outdir=outdir,
        prompt_set=prompt_set, start_iter=start, end_iter=end, process=process,
        distributed_timeout=f["distributed_timeout"], compilation_cache=cache, plot=f["plot"], progress=f["progress"],
        warnings=warnings, argv=tuple(argv))
