"""Serialized executables: a new process loads the compiled sampler from disk and skips tracing,
lowering and compiling (JAX's persistent compilation cache skips only the compiling).

    fn = Executables.wrap(jax.jit(f), name="sampler", static={"skip_halves": True, ...})
    fn(*args)        # first call per input signature: load <dir>/<key>.jaxexe, else compile and write it

An entry's key hashes everything that shapes the program: the ``static`` description the caller
gives (the model's configs and dtype, the sampler's static options), the inputs' tree structure,
shapes, dtypes, weak types and shardings (the scheduler kind and the detector structure are part of
the tree), the jax and jaxlib versions, the backend, its platform version and device kinds, and the
code version (a hash of this package's source files). The entry also stores its key's description,
compared on load: an entry that cannot be read, does not match, fails to load or fails its first
run (checked: the call waits for the result) is rebuilt and overwritten, never used. A program that cannot be serialized (host callbacks, e.g. the progress
bar) runs as a plain jit.

Where: ``$CFGBASIN_JAX_EXECUTABLE_CACHE`` (a directory; ``0`` / ``off``: no cache), else
``$XDG_CACHE_HOME/cfgbasin_jax/executables``. Entries are written atomically; a process only loads
what it could have compiled itself (same versions, backend and devices), since loading runs code.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

from cfgbasin_jax.runtime import files
from cfgbasin_jax.runtime.cache_dirs import env_dir

ENV = "CFGBASIN_JAX_EXECUTABLE_CACHE"
SUFFIX = ".jaxexe"
FORMAT = 1
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_CODE_VERSION: list = []


def cache_dir() -> Path | None:
    return env_dir(ENV, "executables")


def code_version() -> str:
    """A hash of the package's .py files (names and bytes), computed once per process."""
    if not _CODE_VERSION:
        h = hashlib.sha256()
        for path in sorted(PACKAGE_ROOT.rglob("*.py")):
            h.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes())
        _CODE_VERSION.append(h.hexdigest()[:16])
    return _CODE_VERSION[0]


def platform_description() -> dict:
    """What a compiled executable depends on outside the program: versions, backend, devices."""
    import jax
    import jaxlib

    devices = jax.devices()
    return {"format": FORMAT, "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "platform_version": str(devices[0].client.platform_version),
            "device_kinds": sorted({d.device_kind for d in devices}), "device_count": len(devices),
            "code": code_version()}


def signature(args) -> tuple:
    """The inputs' tree structure and, per leaf, shape, dtype, weak type and sharding (hashable)."""
    import jax
    import numpy as np

    leaves, tree = jax.tree.flatten(args)
    out = []
    for leaf in leaves:
        aval = getattr(leaf, "aval", None)
        sharding = getattr(leaf, "sharding", None)
        out.append((tuple(np.shape(leaf)), str(getattr(leaf, "dtype", type(leaf).__name__)),
                    bool(getattr(aval, "weak_type", False)), "" if sharding is None else repr(sharding)))
    return str(tree), tuple(out)


class Executables:
    """A jitted function whose compiled executables are kept in memory per input signature and on
    disk across processes (see the module docstring). ``hits`` / ``writes`` / ``rebuilds`` count
    disk entries loaded, written, and found stale or broken."""

    def __init__(self, jitted, name: str, static: dict, directory: Path | None):
        self.jitted, self.name, self.static, self.directory = jitted, name, static, directory
        self._compiled: dict = {}
        self.hits = self.writes = self.rebuilds = 0

    @classmethod
    def wrap(cls, jitted, name: str, static: dict):
        """``jitted`` itself when the cache is off, else an Executables over it."""
        directory = cache_dir()
        return jitted if directory is None else cls(jitted, name, static, directory)

    def __getattr__(self, name):  # lower, trace, eval_shape, ...: the jitted function's
        if name == "jitted":
            raise AttributeError(name)
        return getattr(self.jitted, name)

    def _cache_size(self) -> int:
        """Executables held (compiled or loaded), like jax's jitted ``_cache_size``."""
        return len(self._compiled)

    def describe(self, sig: tuple) -> str:
        """The key's description (JSON text) for the input signature ``sig``."""
        return json.dumps({"name": self.name, "static": self.static, "platform": platform_description(),
                           "inputs": sig}, sort_keys=True, default=str)

    def path_for(self, description: str) -> Path:
        return self.directory / f"{self.name}-{hashlib.sha256(description.encode()).hexdigest()[:32]}{SUFFIX}"

    def __call__(self, *args):
        sig = signature(args)
        fn = self._compiled.get(sig)
        if fn is not None:
            return fn(*args)
        description = self.describe(sig)
        path = self.path_for(description)
        loaded = self._load(path, description) if path.is_file() else None
        if loaded is not None:
            import jax

            try:  # the first run of a loaded executable is checked: a failure rebuilds it
                out = jax.block_until_ready(loaded(*args))
                self.hits += 1
                self._compiled[sig] = loaded
                return out
            except Exception:
                pass
        if path.is_file():
            self.rebuilds += 1
        compiled = self._compiled[sig] = self.jitted.lower(*args).compile()
        self._write(path, description, compiled)
        return compiled(*args)

    @staticmethod
    def _load(path: Path, description: str):
        """The executable of the entry ``path``, or None when it is unreadable, another key's, or
        fails to load."""
        from jax.experimental import serialize_executable as se

        try:
            entry = pickle.loads(path.read_bytes())
            if not isinstance(entry, dict) or entry.get("description") != description:
                return None
            return se.deserialize_and_load(entry["payload"], entry["in_tree"], entry["out_tree"])
        except Exception:  # a damaged or incompatible entry: rebuilt by the caller
            return None

    def _write(self, path: Path, description: str, compiled) -> None:
        from jax.experimental import serialize_executable as se

        try:
            payload, in_tree, out_tree = se.serialize(compiled)
            data = pickle.dumps({"description": description, "payload": payload, "in_tree": in_tree,
                                 "out_tree": out_tree})
        except Exception:  # not serializable (host callbacks, constants): compiled in memory only
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write_bytes(path, data)
            self.writes += 1
        except OSError:  # an unwritable cache costs the next process a compile, nothing more
            pass
