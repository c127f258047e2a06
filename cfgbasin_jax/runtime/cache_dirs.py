"""Where cfgbasin_jax keeps its caches: ``$XDG_CACHE_HOME/cfgbasin_jax`` (``~/.cache/cfgbasin_jax``).

    jax_cache/      JAX's persistent compilation cache (:mod:`cfgbasin_jax.runtime.compile_cache`)
    converted/      converted models, one per source fingerprint, dtype and format version
                    (:mod:`cfgbasin_jax.loading.cache`)
    executables/    serialized samplers (:mod:`cfgbasin_jax.runtime.executables`)
    hub/            which files of a Hub snapshot make a complete model (:mod:`cfgbasin_jax.loading.hub`)

Downloads themselves live in the Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``,
``~/.cache/huggingface/hub``), shared with diffusers and transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

OFF = ("0", "off", "false", "no", "none")


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/cfgbasin_jax``, else ``~/.cache/cfgbasin_jax`` (read at each call)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cfgbasin_jax"


def env_dir(name: str, default_sub: str) -> Path | None:
    """The directory the environment variable ``name`` names; None when it says off (0, off, false,
    no, none); ``cache_root() / default_sub`` when unset or empty."""
    value = os.environ.get(name, "").strip()
    if value.lower() in OFF:
        return None
    return Path(value) if value else cache_root() / default_sub


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it, read from the environment at each call
    (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "huggingface" / "hub"


CONVERSION_ENV = "CFGBASIN_JAX_CONVERSION_CACHE"


def conversion_cache_dir() -> Path | None:
    """The conversion cache: ``$CFGBASIN_JAX_CONVERSION_CACHE`` (a directory; ``0`` / ``off``: no cache),
    else ``cache_root()/converted``."""
    return env_dir(CONVERSION_ENV, "converted")


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size
    return total


def entries(folder: Path | None) -> list[Path]:
    """The cache entries (visible directories) of ``folder``, sorted; [] if none or off."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
