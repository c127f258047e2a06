"""JAX's persistent compilation cache, turned on when asked: by ``load_pipeline`` (by default) and
the command lines; a bare ``Pipeline(components)`` leaves JAX's global configuration alone.

A second process sampling the same shapes loads the compiled sampler, text encoder and VAE from
disk instead of compiling them again (every executable: JAX's
``jax_persistent_cache_min_compile_time_secs``, 1 s by default, is set to 0 with the directory).

Where (when asked for):
  1. ``load_pipeline(..., compilation_cache=PATH)`` / ``Pipeline(..., compilation_cache=PATH)``;
  2. else a directory already configured in JAX (``JAX_COMPILATION_CACHE_DIR`` or
     ``jax.config.update("jax_compilation_cache_dir", ...)``) is kept;
  3. else ``$CFGBASIN_JAX_COMPILATION_CACHE``;
  4. else ``$XDG_CACHE_HOME/cfgbasin_jax/jax_cache`` (``~/.cache/cfgbasin_jax/jax_cache``).

:class:`CompileStats` counts compile time and cache hits while active (the CLI's log, the benchmark).

Opting out: ``compilation_cache=False`` (the ``Pipeline`` default), or ``CFGBASIN_JAX_COMPILATION_CACHE=0``
(also ``off``, ``false``, ``no``, ``none``) in the environment.
"""

from __future__ import annotations

import os

ENV = "CFGBASIN_JAX_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no", "none")


def default_dir() -> str | None:
    """The default cache directory (None when opted out through the environment)."""
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in OFF:
        return None
    if value:
        return value
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cfgbasin_jax", "jax_cache")


MIN_COMPILE_TIME_S = 0.0  # cache every executable: the decoder's stages compile in under JAX's default 1 s


def configure(cache_dir: str | None) -> tuple:
    """Point JAX's persistent compilation cache at `cache_dir` (None: leave it as it is), caching
    executables whatever their compile time (:data:`MIN_COMPILE_TIME_S`); returns the previous
    settings, for :func:`restore` (the CLI puts them back after a run)."""
    import jax

    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    if cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", os.fspath(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    return previous


def restore(previous: tuple) -> None:
    """Put back the settings :func:`configure` returned (no cache included)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


def enable(cache=None) -> str | None:
    """Turn the persistent compilation cache on; returns the directory in use (None: off).

    cache: None or True (keep a directory JAX already has, else :func:`default_dir`), a
    directory (used as given), or False (leave JAX's setting as it is; returns the directory JAX
    already has, if any).
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if cache is False:
        return current
    if cache is None or cache is True:
        if current:
            return current
        cache = default_dir()
        if cache is None:
            return None
    configure(cache)
    return os.fspath(cache)


class CompileStats:
    """JAX compile time and persistent-cache hits/misses while active (jax.monitoring listeners).
    misses = executables written to the cache; programs compiled in under
    ``jax_persistent_cache_min_compile_time_secs`` are neither."""

    DURATIONS = {
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
        "/jax/core/compile/backend_compile_duration": "backend_s",
    }

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.trace_s = self.lower_s = self.backend_s = 0.0
        self.hits = self.misses = 0

    def _event(self, name, **_):
        if name == "/jax/compilation_cache/cache_hits":
            self.hits += 1
        elif name == "/jax/compilation_cache/cache_misses":
            self.misses += 1

    def _duration(self, name, secs, **_):
        attr = self.DURATIONS.get(name)
        if attr:
            setattr(self, attr, getattr(self, attr) + float(secs))

    @property
    def compile_s(self) -> float:
        return self.trace_s + self.lower_s + self.backend_s

    def __enter__(self):
        import jax.monitoring as m

        m.register_event_listener(self._event)
        m.register_event_duration_secs_listener(self._duration)
        return self

    def __exit__(self, *exc):
        import jax.monitoring as m

        m.unregister_event_listener(self._event)
        m.unregister_event_duration_listener(self._duration)

    def summary(self, cache_dir: str | None) -> str:
        if cache_dir is None:
            cache = "persistent cache off"
        elif self.hits or self.misses:
            cache = f"persistent cache {'HIT' if self.hits else 'miss'} ({self.hits} hit(s), {self.misses} written) in {cache_dir}"
        else:
            cache = f"persistent cache unused ({cache_dir})"
        return f"compile {self.compile_s:.1f} s (backend {self.backend_s:.1f} s); {cache}"
