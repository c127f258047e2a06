"""The conversion cache: a diffusers folder (or Hub snapshot) is converted once, and later loads read
the converted directory (params restored tensor by tensor, memory-mapped files).

    $XDG_CACHE_HOME/cfgbasin_jax/converted/<key>/    a converted directory (cfgbasin_jax.models.converted)
    $XDG_CACHE_HOME/cfgbasin_jax/converted/.<key>.lock

``key`` hashes the source's fingerprint (:func:`cfgbasin_jax.loading.model_fingerprint`: the files the
loader reads, by content up to 1 MiB and by size, sampled content and modification time above), a swapped-in UNet's
fingerprint, the dtype and the converted format's version: a changed source, dtype or format gets a
new entry. Several processes (or hosts sharing the file system) loading the same source for the
first time convert it once: the first takes the lock (:class:`cfgbasin_jax.runtime.files.LockFile`)
and converts into a hidden partial folder renamed at the end; the others wait for the lock and read.

``CFGBASIN_JAX_CONVERSION_CACHE``: another directory, or ``0`` (``off``) to convert in memory at every
load, as before. ``cfgbasin-convert --cache-info`` / ``--cache-clear`` report and empty the cache.
An unwritable cache falls back to converting in memory.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from cfgbasin_jax.convert import sd_folder
from cfgbasin_jax.models.builders import resolve_dtype
from cfgbasin_jax.models.components import Components, is_pixel_model
from cfgbasin_jax.models.converted import FORMAT_VERSION, is_converted, load_converted
from cfgbasin_jax.runtime import files
from cfgbasin_jax.runtime.cache_dirs import conversion_cache_dir

POLL_S = 0.2


def cache_key(path, dtype, unet_path=None, variant: str | None = None) -> str:
    """The cache entry's name for a diffusers folder ``path`` (+ ``unet_path``) loaded as ``dtype``
    (its fingerprints are of the files ``variant`` reads)."""
    parts = [sd_folder.folder_fingerprint(path, mtimes=True, variant=variant),
             None if unet_path is None else sd_folder.unet_fingerprint(unet_path, mtimes=True, variant=variant),
             resolve_dtype(dtype).name, FORMAT_VERSION]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def wait_lock(path: Path, what: str, log=None) -> files.LockFile:
    """Take the LockFile ``path``, waiting while another process holds it (``log`` hears once)."""
    told = False
    while True:
        try:
            return files.LockFile(path, what).acquire()
        except files.FileError as err:
            if not told and log is not None:
                log(f"waiting: {err}")
                told = True
            time.sleep(POLL_S)


def cached_entry(path, dtype="float32", unet_path=None, log=None, variant: str | None = None) -> Path | None:
    """The converted directory of the diffusers folder ``path`` in the cache, converting it first if
    absent (once across processes); None when the cache is off, ``path`` is not a diffusers folder,
    or the cache cannot be written (``log`` hears why)."""
    folder = conversion_cache_dir()
    root = Path(path)
    if folder is None or not root.is_dir() or is_converted(root) or is_pixel_model(root):
        return None
    entry = folder / cache_key(root, dtype, unet_path, variant)
    if is_converted(entry):
        return entry
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = wait_lock(folder / f".{entry.name}.lock", "conversion of this model", log)
    except OSError as err:
        _say(log, f"conversion cache unusable ({files.describe(err)}); converting in memory")
        return None
    try:
        if not is_converted(entry):  # another process may have converted it while we waited
            _say(log, f"converting {root} into the cache {entry} (once)")
            sd_folder.convert(root, entry, dtype=dtype, unet_path=unet_path, log=log, variant=variant)
    except OSError as err:
        _say(log, f"conversion cache unusable ({files.describe(err)}); converting in memory")
        return None
    finally:
        lock.release()
    return entry


def _say(log, message: str) -> None:
    if log is not None:
        log(message)


def load_cached(path, dtype="float32", unet_path=None, log=None, variant: str | None = None) -> Components:
    """:func:`cfgbasin_jax.loading.load_components`, through the conversion cache for a diffusers folder
    (see the module docstring); ``source`` stays ``path``."""
    from cfgbasin_jax.loading import load_components

    entry = cached_entry(path, dtype, unet_path, log, variant)
    if entry is None:
        return load_components(path, dtype=dtype, unet_path=unet_path, variant=variant)
    components = load_converted(entry, dtype)
    components.source = str(path)
    return components
