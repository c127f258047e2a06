"""Load Stable Diffusion components for JAX: from a converted directory or a diffusers folder.

Converted directory (written by `save_components` / `cfgbasin-convert`; read without torch):

    DST/cfgbasin_jax.json                 format marker: {"format", "format_version", "dtype", "source",
                                          "fingerprint"} (see cfgbasin_jax.runs.fingerprint)
    DST/params/                           orbax checkpoint {"unet": tree, "vae": tree, "text_encoder": tree},
                                          one plain file per parameter (see cfgbasin_jax.models.checkpoint)
    DST/{unet,vae,text_encoder}/config.json   the diffusers / transformers configs
    DST/tokenizer/                        CLIP tokenizer files (tokenizer.json, vocab.json, merges.txt, ...)
    DST/scheduler/scheduler_config.json

A diffusers folder is converted in memory (safetensors need no torch; `.bin` weights import it).
A pixel-space model folder (the shipped toy; see the section at the end) loads too.
`convert(src, dst)` is load + save (the `cfgbasin-convert` command).
"""

from __future__ import annotations

import contextlib
import gc
import glob
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cfgbasin_jax.models import checkpoint
from cfgbasin_jax.convert import sd_folder
from cfgbasin_jax.convert.errors import ConversionError
from cfgbasin_jax.models.builders import (build_module, build_text_encoder, build_unet, check_compatible, component_param_shapes,
                                 resolve_dtype)
from cfgbasin_jax.models.tokenizer import save_tokenizer

__all__ = [
    "COMPONENTS",
    "Components",
    "ConversionError",
    "PIXEL_FORMAT",
    "convert",
    "is_converted",
    "is_pixel_model",
    "load_components",
    "load_pixel_components",
    "load_unet_folder",
    "check_destination",
    "remove_stale_partials",
    "pixel_components",
    "save_components",
    "save_pixel_model",
]

COMPONENTS = ("unet", "vae", "text_encoder")
FORMAT_FILE = "cfgbasin_jax.json"
FORMAT_NAME = "cfgbasin_jax.stable_diffusion"
FORMAT_VERSION = 1
PARAMS_DIR = "params"


@dataclass
class Components:
    """Everything the sampler needs. Apply with
    `unet.apply({"params": params["unet"]}, sample_nchw, timesteps, encoder_hidden_states)`.

    unet: cfgbasin_jax.models.unet.UNet2DConditionModel (linen module, dtype set; the same parameter
        tree as diffusers' FlaxUNet2DConditionModel)
    vae: cfgbasin_jax.models.vae.AutoencoderKL (linen module; diffusers' FlaxAutoencoderKL parameter tree)
    text_encoder: transformers FlaxCLIPTextModule (bare linen module)
    tokenizer: transformers' CLIP tokenizer (:func:`cfgbasin_jax.models.tokenizer.load_tokenizer`)
    params: {"unet": tree, "vae": tree, "text_encoder": tree}, jnp arrays in `dtype`
    configs: {"unet": dict, "vae": dict, "text_encoder": dict}, the diffusers / transformers configs
    scheduler_config: dict, as in scheduler/scheduler_config.json
    dtype: jnp.dtype
    source: str, the path it was loaded from
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    params: dict
    configs: dict
    scheduler_config: dict
    dtype: Any
    source: str


def is_converted(path) -> bool:
    """True when `path` is a directory written by save_components."""
    return (Path(path) / FORMAT_FILE).is_file()


def _converted_weights(folder: Path, kind: str, module, dtype, lazy: bool = False) -> dict:
    """Params of one diffusers model subfolder in `dtype`, checked from the file headers first: as
    LazyLeafs (`lazy`, read when written) or read tensor by tensor straight to the device."""
    params = sd_folder.lazy_weights(folder, kind, component_param_shapes(kind, module), dtype)
    return params if lazy else checkpoint.materialize(params)


def load_unet_folder(folder, dtype="float32") -> tuple:
    """(UNet2DConditionModel, config dict, params) from a diffusers `unet/` folder, e.g. a
    fine-tuned `checkpoint-20000/unet`."""
    dtype = resolve_dtype(dtype)
    config = sd_folder.read_model_config(Path(folder))
    module = build_module("unet", config, dtype)
    return module, config, _converted_weights(Path(folder), "unet", module, dtype)


def _check_marker(root: Path) -> None:
    marker = sd_folder.read_json(root / FORMAT_FILE)
    if marker.get("format") != FORMAT_NAME or marker.get("format_version") != FORMAT_VERSION:
        raise ConversionError(
            f"{root / FORMAT_FILE}: format {marker.get('format')!r} version {marker.get('format_version')!r} "
            f"is not {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )


def _restore_params(params_dir: Path, modules: dict, dtype, configs: dict | None = None) -> dict:
    """The params checkpoint at `params_dir`, restored into the shapes of `modules`, as `dtype`,
    each tensor straight to this process's first local device (see cfgbasin_jax.models.checkpoint).
    With the `configs` the checkpoint was written for, its own shapes are used (no module tracing)."""
    target = None if configs is None else checkpoint.stored_shapes(params_dir, configs, dtype)
    if target is None:
        target = {kind: component_param_shapes(kind, module, dtype=dtype) for kind, module in modules.items()}
    return checkpoint.restore_params(params_dir, target)


def load_components(path, dtype="float32", unet_path=None, lazy: bool = False) -> Components:
    """Components from a converted directory, a diffusers SD folder (converted in memory) or a
    pixel-space model folder (the shipped toy).

    dtype: 'float32' | 'bfloat16' | 'float16' for both params and module computation.
    unet_path: a diffusers `unet/` folder whose UNet replaces the pipeline's.
    lazy: params read from diffusers weight files stay LazyLeafs (checked, not read) until
    save_components writes them one at a time (streamed conversion).
    Raises ConversionError naming the file, key or setting at fault.
    """
    dtype = resolve_dtype(dtype)
    root = Path(path)
    if not root.is_dir():
        raise ConversionError(f"{root}: not a directory")
    if is_pixel_model(root):
        if unet_path is not None:
            raise ConversionError(f"{root}: a pixel-space model takes no unet_path (got {unet_path})")
        return load_pixel_components(root, dtype)
    converted = is_converted(root)
    swap = unet_path is not None
    if converted:
        _check_marker(root)
    else:
        sd_folder.check_sd_folder(root, tuple(s for s in sd_folder.SUBFOLDERS if not (swap and s == "unet")))
    folders = {kind: root / kind for kind in COMPONENTS}
    if swap:
        if not Path(unet_path).is_dir():
            raise ConversionError(f"unet_path {unet_path}: not a directory (need a diffusers unet/ folder)")
        folders["unet"] = Path(unet_path)
    configs = {kind: sd_folder.read_model_config(folder) for kind, folder in folders.items()}
    check_compatible(configs)
    modules = {kind: build_module(kind, configs[kind], dtype) for kind in COMPONENTS}

    if converted:
        stored_modules, stored_configs = dict(modules), dict(configs)
        if swap:  # the checkpoint holds the original UNet: restore it into its own shapes, then drop it
            stored_configs["unet"] = sd_folder.read_model_config(root / "unet")
            stored_modules["unet"] = build_module("unet", stored_configs["unet"], dtype)
        params = dict(_restore_params(root / PARAMS_DIR, stored_modules, dtype, stored_configs))
        if swap:
            params["unet"] = _converted_weights(folders["unet"], "unet", modules["unet"], dtype, lazy)
    else:
        params = {kind: _converted_weights(folders[kind], kind, modules[kind], dtype, lazy) for kind in COMPONENTS}

    return Components(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=sd_folder.load_tokenizer(root / "tokenizer"),
        params={kind: params[kind] for kind in COMPONENTS},
        configs=configs,
        scheduler_config=sd_folder.read_scheduler_config(root / "scheduler"),
        dtype=dtype,
        source=str(path),
    )


PARTIAL_TAG = ".partial-"  # .DST.partial-HOST-PID-RANDOM: a save in progress
OLD_TAG = ".old-"  # .DST.old-HOST-PID-RANDOM: a replaced DST being removed


def check_destination(dst, sources=(), overwrite: bool = False) -> Path:
    """Absolute ``dst`` after checking that a converted directory may be written there; writes
    nothing. Refused: ``dst`` equal to, inside or containing one of ``sources`` (existing paths:
    the SD folder, a --unet folder); an existing ``dst`` without ``overwrite``; with ``overwrite``,
    an existing ``dst`` that is not a converted directory (no marker file) and not empty; a parent
    that cannot be written. Raises ConversionError naming the paths."""
    from cfgbasin_jax.runs import files

    dst = Path(dst).absolute()
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        if files.is_within(dst, src):
            where = "is" if dst.resolve() == Path(src).resolve() else "lies inside"
            raise ConversionError(f"destination {dst} {where} the source {src}; choose another destination")
        if files.is_within(src, dst):
            raise ConversionError(f"destination {dst} contains the source {src}; choose another destination")
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir():
            raise ConversionError(f"{dst} exists and is not a directory")
        if not overwrite:
            raise ConversionError(f"{dst} already exists (use overwrite=True / --overwrite to replace it)")
        if not is_converted(dst) and any(dst.iterdir()):
            raise ConversionError(
                f"{dst} is not a converted directory (no {FORMAT_FILE}) and is not empty; --overwrite only "
                "replaces a directory that cfgbasin-convert wrote, so it is left alone")
    try:
        files.check_writable_dir(dst.parent, "destination")
    except files.FileError as err:
        raise ConversionError(str(err)) from None
    return dst


def _owner_tag() -> str:
    import socket

    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(owner: str) -> bool:
    """Was a partial/old folder whose name ends in ``owner`` (HOST-PID-RANDOM) left by a process
    that is gone? Only a process on this host can be checked; the names of older versions
    (RANDOM only) count as stale."""
    import socket

    host_pid = owner.rpartition("-")[0]
    host, _, pid = host_pid.rpartition("-")
    if not host:  # .DST.partial-RANDOM, written before owners were recorded
        return True
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def remove_stale_partials(dst) -> list[Path]:
    """Remove the ``.DST.partial-*`` / ``.DST.old-*`` folders that killed saves to ``dst`` left
    (gigabytes for SD). Folders of running saves are kept. Returns the removed paths."""
    dst = Path(dst).absolute()
    removed = []
    if not dst.parent.is_dir():
        return removed
    for tag in (PARTIAL_TAG, OLD_TAG):
        prefix = f".{dst.name}{tag}"
        for path in dst.parent.glob(f"{glob.escape(prefix)}*"):
            if path.is_dir() and _stale(path.name[len(prefix):]):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _note(log, message: str) -> None:
    if log is not None:
        log(message)
    else:
        import warnings

        warnings.warn(message, stacklevel=3)


def save_components(components: Components, dst, overwrite: bool = False, sources=(), log=None) -> Path:
    """Write `components` as a converted directory at `dst` (see the module docstring).

    Checks first (:func:`check_destination`, with ``components.source`` and ``sources``). Everything
    goes to a hidden sibling ``.DST.partial-HOST-PID-RANDOM`` and is renamed to `dst` at the end, so
    `dst` is never partial. On an error, KeyboardInterrupt or SIGTERM (under
    :func:`cfgbasin_jax.runs.files.terminate_raises`) the partial folder is removed once the writers
    have stopped; a partial folder of a killed save is removed by the next save to `dst`. An I/O
    error inside orbax is raised as OSError naming the folder. The marker file holds the model's
    content fingerprint (:mod:`cfgbasin_jax.runs.fingerprint`), hashed from the tensors as they are
    written. Params are written one tensor at a time (LazyLeafs are read only then; see
    :mod:`cfgbasin_jax.models.checkpoint`). ``log(message)`` gets the notes (a
    parameter with NaN/Inf values, stale folders removed); default: ``warnings.warn``.
    """
    from cfgbasin_jax.runs import files
    from cfgbasin_jax.runs import fingerprint as fp

    dst = check_destination(dst, [components.source, *sources], overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for path in remove_stale_partials(dst):
        _note(log, f"removed {path}, left by an interrupted conversion")
    tmp = dst.parent / f".{dst.name}{PARTIAL_TAG}{_owner_tag()}"
    tmp.mkdir()
    try:
        for kind in COMPONENTS:
            (tmp / kind).mkdir()
            sd_folder.write_json(tmp / kind / "config.json", components.configs[kind])
        (tmp / "scheduler").mkdir()
        sd_folder.write_json(tmp / "scheduler" / sd_folder.SCHEDULER_CONFIG, components.scheduler_config)
        save_tokenizer(components.tokenizer, tmp / "tokenizer")
        params = {kind: components.params[kind] for kind in COMPONENTS}

        hasher = fp.ParamHasher()
        _save_params(tmp / PARAMS_DIR, params, dst, {kind: components.configs[kind] for kind in COMPONENTS},
                     hasher.add)
        for key, count, size in hasher.nonfinite():
            _note(log, f"warning: parameter {key} has {count} non-finite value(s) (NaN/Inf) of {size}; "
                       "the model will produce NaN images")
        marker = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dtype": jnp.dtype(components.dtype).name,
            "source": components.source,
            fp.MARKER_KEY: hasher.fingerprint(components.configs, components.scheduler_config, tmp / "tokenizer"),
        }
        sd_folder.write_json(tmp / FORMAT_FILE, marker)
        _replace_dir(tmp, dst)
    except BaseException:
        with files.signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _save_params(directory: Path, params: dict, dst: Path, configs: dict, on_write) -> None:
    """The params checkpoint of ``params`` at ``directory``, written tensor by tensor
    (:func:`cfgbasin_jax.models.checkpoint.write_params`; ``on_write(key, array)`` sees each tensor as it
    is written). However this ends (an error, Ctrl-C, SIGTERM), the writer threads have stopped
    when it returns. An I/O error (full disk) is raised as one OSError naming ``dst``; the
    background writers' tracebacks and log records about it (some printed by C code) are dropped."""
    from cfgbasin_jax.runs import files

    with files.stderr_captured() as captured, _quiet_orbax_logs(directory):
        try:
            checkpoint.write_params(directory, params, configs=configs, on_write=on_write)
        except BaseException as err:
            with files.signals_deferred():
                gc.collect()  # futures report unread errors when collected: let that happen here
            io_error = files.as_os_error(err, dst) if isinstance(err, Exception) else None
            if io_error is not None or not isinstance(err, Exception):
                captured.drop()
            if io_error is not None and io_error is not err:
                raise io_error from None
            raise


class _DropRecordsAbout(logging.Filter):
    """Drops log records that mention ``text`` (a partial folder's unique name)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted is not ours to drop
            return True
        return self.text not in message and self.text not in str(record.exc_info or "")


@contextlib.contextmanager
def _quiet_orbax_logs(folder: Path):
    """orbax's notices (absl INFO/WARNING) are hidden during the save; records about ``folder`` (a
    failed write's traceback, asyncio's unread future errors) are dropped during the save, and for
    good when it failed (asyncio reports some only when the futures are collected)."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    drop = _DropRecordsAbout(folder.parent.name)
    absl_level = loggers[0].level
    loggers[0].setLevel(logging.ERROR)
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        loggers[0].setLevel(absl_level)
    for logger in loggers:
        logger.removeFilter(drop)


def _replace_dir(src: Path, dst: Path) -> None:
    if not dst.exists():
        os.rename(src, dst)
        return
    old = dst.parent / f".{dst.name}{OLD_TAG}{_owner_tag()}"
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def convert(src, dst, dtype="float32", unet_path=None, overwrite=False, log=None) -> Path:
    """Convert the diffusers SD folder ``src`` (optionally with the UNet folder ``unet_path`` swapped
    in) into the converted-checkpoint directory ``dst``, params stored in ``dtype``. Returns dst as a
    Path (``cfgbasin-convert``).

    Nothing is written at ``dst`` unless the whole conversion succeeds; ``dst`` may not be, contain or
    lie inside ``src`` or ``unet_path``, and ``overwrite`` replaces only a converted directory (see
    :func:`save_components`, which also describes ``log``).
    """
    sources = [src, unet_path]
    check_destination(dst, sources, overwrite)  # fail before the (slow) load; save re-checks
    # Streamed: every weight is checked from the file headers here, then read, laid out, cast and
    # written one tensor at a time by save_components (never two copies of the model in memory).
    components = load_components(src, dtype=dtype, unet_path=unet_path, lazy=True)
    return save_components(components, dst, overwrite=overwrite, sources=sources, log=log)


# ------------------------------------------------------------------------------------------------
# The pixel-space model format (the shipped toy, cfgbasin_jax/data/toy; written by training):
#     DST/model.json          {"format": "cfgbasin_jax.pixel_model", "format_version", "dtype",
#                              "configs": {"unet", "text_encoder", "scheduler"}, ...}
#     DST/params.safetensors  "unet/..." and "text_encoder/..." keys
#     DST/tokenizer/          CLIPTokenizer files
# A pixel-space model has no VAE (``Components.vae is None``): its UNet denoises RGB in [-1, 1].

PIXEL_FORMAT = "cfgbasin_jax.pixel_model"


def pixel_components(configs: dict, params: dict, tokenizer, dtype="float32", source: str = "toy") -> Components:
    """Components of a pixel-space model (``vae = None``) from configs {"unet", "text_encoder",
    "scheduler"} and params {"unet", "text_encoder"}."""
    dtype = resolve_dtype(dtype)
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float32).astype(dtype)), tree)  # noqa: E731
    return Components(
        unet=build_unet(configs["unet"], dtype),
        vae=None,
        text_encoder=build_text_encoder(configs["text_encoder"], dtype),
        tokenizer=tokenizer,
        params={"unet": cast(params["unet"]), "vae": None, "text_encoder": cast(params["text_encoder"])},
        configs={"unet": dict(configs["unet"]), "vae": None, "text_encoder": dict(configs["text_encoder"])},
        scheduler_config=dict(configs["scheduler"]),
        dtype=dtype,
        source=source,
    )


def save_pixel_model(components: Components, dst, save_dtype: str = "float16", extra: dict | None = None) -> Path:
    """Write a pixel-space model: model.json (format, configs), params.safetensors (``unet/...``,
    ``text_encoder/...`` keys in ``save_dtype``), tokenizer/."""
    from safetensors.numpy import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}[save_dtype]
    flat = {}
    for kind in ("unet", "text_encoder"):
        for key, value in traverse_util.flatten_dict(components.params[kind], sep="/").items():
            flat[f"{kind}/{key}"] = np.asarray(np.asarray(value, np.float32).astype(np_dtype))
    save_file(flat, str(dst / "params.safetensors"))
    meta = {
        "format": PIXEL_FORMAT,
        "format_version": 1,
        "dtype": save_dtype,
        "configs": {"unet": components.configs["unet"], "text_encoder": components.configs["text_encoder"], "scheduler": components.scheduler_config},
        **(extra or {}),
    }
    (dst / "model.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    save_tokenizer(components.tokenizer, dst / "tokenizer")
    return dst


def is_pixel_model(path) -> bool:
    """True when ``path`` holds a pixel-space model (model.json + params.safetensors)."""
    return (Path(path) / "model.json").is_file() and (Path(path) / "params.safetensors").is_file()


def load_pixel_components(path, dtype="float32") -> Components:
    """Components (``vae = None``) from a folder written by :func:`save_pixel_model`."""
    from safetensors.numpy import load_file

    path = Path(path)
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise ConversionError(f"{meta_path}: missing (not a pixel-space model folder)")
    meta = sd_folder.read_json(meta_path)
    if meta.get("format") != PIXEL_FORMAT:
        raise ConversionError(f"{meta_path}: format {meta.get('format')!r} is not {PIXEL_FORMAT!r}")
    weights = path / "params.safetensors"
    if not weights.is_file():
        raise ConversionError(f"missing file {weights} (the pixel model's params)")
    try:
        flat = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ConversionError(f"{weights}: cannot read ({err})") from err
    tree = traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep="/")
    return pixel_components(meta["configs"], tree, sd_folder.load_tokenizer(path / "tokenizer"), dtype=dtype, source=str(path))
