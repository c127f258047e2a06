"""The converted directory: our own on-disk format, read without torch.

    DST/cfgbasin_jax.json                 format marker: {"format", "format_version", "dtype", "source",
                                          "fingerprint"} (see cfgbasin_jax.models.fingerprint)
    DST/params/                           orbax checkpoint {"unet": tree, "vae": tree, "text_encoder": tree},
                                          one plain file per parameter (see cfgbasin_jax.models.checkpoint)
    DST/{unet,vae,text_encoder}/config.json   the diffusers / transformers configs
    DST/tokenizer/                        CLIP tokenizer files (tokenizer.json, vocab.json, merges.txt, ...)
    DST/scheduler/scheduler_config.json

:func:`save_components` writes one (``cfgbasin-convert`` streams a diffusers folder into it, see
:func:`cfgbasin_jax.convert.sd_folder.convert`); :func:`load_converted` reads one.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from pathlib import Path

import jax.numpy as jnp

from cfgbasin_jax.models import checkpoint
from cfgbasin_jax.models import fingerprint as fp
from cfgbasin_jax.models.builders import build_module, check_compatible, component_param_shapes, resolve_dtype
from cfgbasin_jax.models.components import (COMPONENTS, SCHEDULER_CONFIG, Components, load_tokenizer, read_json,
                                            read_model_config, read_scheduler_config, write_json)
from cfgbasin_jax.models.errors import ConversionError
from cfgbasin_jax.models.tokenizer import save_tokenizer
from cfgbasin_jax.runtime import files, folders

FORMAT_FILE = "cfgbasin_jax.json"
FORMAT_NAME = "cfgbasin_jax.stable_diffusion"
FORMAT_VERSION = 1
PARAMS_DIR = "params"


def is_converted(path) -> bool:
    """True when `path` is a directory written by save_components."""
    return (Path(path) / FORMAT_FILE).is_file()


def check_marker(root: Path) -> None:
    """ConversionError unless ``root``'s marker file names this format and version."""
    marker = read_json(root / FORMAT_FILE)
    if marker.get("format") != FORMAT_NAME or marker.get("format_version") != FORMAT_VERSION:
        raise ConversionError(
            f"{root / FORMAT_FILE}: format {marker.get('format')!r} version {marker.get('format_version')!r} "
            f"is not {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )


def converted_fingerprint(root) -> str:
    """The fingerprint of a converted directory: the parameter digest stored in its marker file at
    conversion, combined with its configs, scheduler config and tokenizer files as they are now (so
    editing one changes it; see :mod:`cfgbasin_jax.models.fingerprint`). A directory written before
    the parameter digest was stored: its stored fingerprint combined the same way; before
    fingerprints existed: ``files_fingerprint`` of its visible files."""
    root = Path(root)
    try:
        marker = json.loads((root / FORMAT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    stored = [marker.get(key) for key in (fp.PARAMS_KEY, fp.MARKER_KEY)] if isinstance(marker, dict) else []
    stored = next((value for value in stored if isinstance(value, str) and value), None)
    if stored is None:
        return fp.files_fingerprint(root, fp.visible_files(root))
    configs = {kind: read_model_config(root / kind) for kind in COMPONENTS}
    return fp.combine(stored, configs, read_scheduler_config(root / "scheduler"), root / "tokenizer")


def _restore_params(params_dir: Path, modules: dict, dtype, configs: dict | None = None) -> dict:
    """The params checkpoint at `params_dir`, restored into the shapes of `modules`, as `dtype`,
    each tensor straight to this process's first local device (see cfgbasin_jax.models.checkpoint).
    With the `configs` the checkpoint was written for, its own shapes are used (no module tracing)."""
    target = None if configs is None else checkpoint.stored_shapes(params_dir, configs, dtype)
    if target is None:
        target = {kind: component_param_shapes(kind, module, dtype=dtype) for kind, module in modules.items()}
    return checkpoint.restore_params(params_dir, target)


def load_converted(path, dtype="float32") -> Components:
    """Components of the converted directory ``path`` (params restored as ``dtype``, tensor by tensor
    to the first local device). Raises ConversionError naming the file or setting at fault."""
    dtype = resolve_dtype(dtype)
    root = Path(path)
    check_marker(root)
    configs = {kind: read_model_config(root / kind) for kind in COMPONENTS}
    check_compatible(configs)
    modules = {kind: build_module(kind, configs[kind], dtype) for kind in COMPONENTS}
    params = _restore_params(root / PARAMS_DIR, modules, dtype, configs)
    return Components(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=load_tokenizer(root / "tokenizer"),
        params={kind: params[kind] for kind in COMPONENTS},
        configs=configs,
        scheduler_config=read_scheduler_config(root / "scheduler"),
        dtype=dtype,
        source=str(path),
    )


def check_destination(dst, sources=(), overwrite: bool = False) -> Path:
    """Absolute ``dst`` after checking that a converted directory may be written there; writes
    nothing. Refused: ``dst`` equal to, inside or containing one of ``sources`` (existing paths:
    the SD folder, a --unet folder); an existing ``dst`` without ``overwrite``; with ``overwrite``,
    an existing ``dst`` that is not a converted directory (no marker file) and not empty; a parent
    that cannot be written (the rules of :func:`cfgbasin_jax.runtime.folders.check_output_dir`, which
    the SSCD converter shares). Raises ConversionError naming the paths."""
    try:
        return folders.check_output_dir(dst, sources, overwrite, ours=is_converted,
                                      kind=f"a converted directory (no {FORMAT_FILE})", writer="cfgbasin-convert")
    except files.FileError as err:
        raise ConversionError(str(err)) from None


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
    `dst` is never partial (:func:`cfgbasin_jax.runtime.folders.building_dir`): without ``overwrite``,
    a `dst` that another process created meanwhile is left alone (ConversionError); with it, a
    symlink at `dst` has its target replaced. On an error, KeyboardInterrupt or SIGTERM (under
    :func:`cfgbasin_jax.runtime.files.terminate_raises`) the partial folder is removed once the writers
    have stopped; a partial folder of a killed save is removed by the next save to `dst`. An I/O
    error inside orbax is raised as OSError naming the folder. The marker file holds the model's
    content fingerprint (:mod:`cfgbasin_jax.models.fingerprint`), hashed from the tensors as they are
    written. Params are written one tensor at a time (LazyLeafs are read only then; see
    :mod:`cfgbasin_jax.models.checkpoint`). ``log(message)`` gets the notes (a
    parameter with NaN/Inf values, stale folders removed); default: ``warnings.warn``.
    """
    dst = check_destination(dst, [components.source, *sources], overwrite)
    try:
        with folders.building_dir(dst, overwrite, note=lambda message: _note(log, message)) as tmp:
            _write_components(components, tmp, dst, log)
    except files.FileError as err:
        raise ConversionError(str(err)) from None
    return dst


def _write_components(components: Components, tmp: Path, dst: Path, log) -> None:
    """Every file of the converted directory into the (partial) folder ``tmp``."""
    for kind in COMPONENTS:
        (tmp / kind).mkdir()
        write_json(tmp / kind / "config.json", components.configs[kind])
    (tmp / "scheduler").mkdir()
    write_json(tmp / "scheduler" / SCHEDULER_CONFIG, components.scheduler_config)
    save_tokenizer(components.tokenizer, tmp / "tokenizer")
    params = {kind: components.params[kind] for kind in COMPONENTS}

    hasher = fp.ParamHasher()
    _save_params(tmp / PARAMS_DIR, params, dst, {kind: components.configs[kind] for kind in COMPONENTS}, hasher.add)
    for key, count, size in hasher.nonfinite():
        _note(log, f"warning: parameter {key} has {count} non-finite value(s) (NaN/Inf) of {size}; "
                   "the model will produce NaN images")
    marker = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dtype": jnp.dtype(components.dtype).name,
        "source": components.source,
        **hasher.marker_fields(components.configs, components.scheduler_config, tmp / "tokenizer"),
    }
    write_json(tmp / FORMAT_FILE, marker)


def _save_params(directory: Path, params: dict, dst: Path, configs: dict, on_write) -> None:
    """The params checkpoint of ``params`` at ``directory``, written tensor by tensor
    (:func:`cfgbasin_jax.models.checkpoint.write_params`; ``on_write(key, array)`` sees each tensor as it
    is written). However this ends (an error, Ctrl-C, SIGTERM), the writer threads have stopped
    when it returns. An I/O error (full disk) is raised as one OSError naming ``dst``; the
    background writers' tracebacks and log records about it (some printed by C code) are dropped."""
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
