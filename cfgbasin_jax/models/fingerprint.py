"""Model fingerprints: a short hash that tells two models apart, so a resumed run can refuse a
different model found at the same path.

* **Converted directory** (``cfgbasin-convert`` / :func:`cfgbasin_jax.models.converted.save_components`):
  ``"content:<hex>"``, computed once at conversion and stored in ``cfgbasin_jax.json``, so reading it
  costs one small file. It hashes what decides the images: every parameter (component, key path,
  dtype, shape, bytes; one digest per parameter, computed by the converter's writer threads from
  the bytes written to that parameter's file), the model and scheduler configs (keys starting with ``_``, such as
  ``_name_or_path``, left out) and the tokenizer's vocabulary and merges. Converting the same weights
  again, from any path, gives the same fingerprint.
* **Diffusers-format folder** (converted in memory at every load), a ``--unet_path`` folder, or a
  converted directory written before fingerprints existed: ``"files:<hex>"`` over the files the
  loader reads, each by relative path and, up to 1 MiB, by content; larger files (the weights) by
  size and modification time. Hashing gigabytes at every start would cost seconds; replacing a
  weight file (copy, download, re-save) changes its size or modification time. Convert the folder
  for a content fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

SMALL_FILE = 1 << 20  # files up to this size are hashed by content
TOKENIZER_FILES = ("vocab.json", "merges.txt")
MARKER_KEY = "fingerprint"


def _hasher():
    return hashlib.blake2b(digest_size=16)


def _public_config(config: Mapping) -> bytes:
    return json.dumps({k: v for k, v in config.items() if not str(k).startswith("_")}, sort_keys=True).encode()


def _tag(h, name: str, payload=b"") -> None:
    """Feed ``name`` and a bytes-like ``payload`` (its length first, so fields cannot run together)."""
    size = memoryview(payload).nbytes
    h.update(name.encode() + b"\0" + size.to_bytes(8, "little"))
    h.update(payload)


class ParamHasher:
    """Collects one digest per parameter (``add``, from any thread: the converter calls it from its
    writer threads with each tensor as it is written) and combines them, in key order, with the
    configs and tokenizer into ``"content:<hex>"`` (:meth:`fingerprint`). Also counts each
    parameter's NaN/Inf values (:meth:`nonfinite`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._digests: dict[str, bytes] = {}
        self._nonfinite: dict[str, tuple[int, int]] = {}

    def add(self, key: str, array) -> None:
        """``key``: "component/path/to/leaf"; ``array``: the parameter as stored (any layout)."""
        arr = np.asarray(array)
        h = _hasher()
        h.update(f"{arr.dtype.name}:{arr.shape}".encode() + b"\0")
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        bad = 0
        if arr.dtype.kind in "fcV":  # V: ml_dtypes' bfloat16
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        with self._lock:
            self._digests[key] = h.digest()
            if bad:
                self._nonfinite[key] = (bad, int(arr.size))

    def nonfinite(self) -> list[tuple[str, int, int]]:
        """[(key, count, size)] of the parameters holding NaN/Inf values, in key order."""
        return [(key, *self._nonfinite[key]) for key in sorted(self._nonfinite)]

    def fingerprint(self, configs: Mapping, scheduler_config: Mapping, tokenizer_dir) -> str:
        h = _hasher()
        for key in sorted(self._digests):
            _tag(h, key, self._digests[key])
        for kind in sorted(configs):
            _tag(h, f"config/{kind}", _public_config(configs[kind]))
        _tag(h, "scheduler", _public_config(scheduler_config))
        for name in TOKENIZER_FILES:
            path = Path(tokenizer_dir) / name
            if path.is_file():
                _tag(h, f"tokenizer/{name}", path.read_bytes())
        return "content:" + h.hexdigest()


def content_fingerprint(params: Mapping, configs: Mapping, scheduler_config: Mapping, tokenizer_dir) -> str:
    """``"content:<hex>"`` of a model in memory (see the module docstring; the converter computes
    the same value from the tensors it writes, :class:`ParamHasher`). params: {component: tree};
    configs: {component: dict}; tokenizer_dir: a saved tokenizer folder."""
    import jax

    hasher = ParamHasher()
    for kind in params:
        for path, leaf in jax.tree_util.tree_flatten_with_path(params[kind])[0]:
            hasher.add(kind + "/" + "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path), leaf)
    return hasher.fingerprint(configs, scheduler_config, tokenizer_dir)


def files_fingerprint(root, files: Iterable[Path]) -> str:
    """``"files:<hex>"`` of ``files`` (paths under ``root``; see the module docstring)."""
    root = Path(root)
    h = _hasher()
    for path in sorted({Path(p) for p in files}):
        st = path.stat()
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        if st.st_size <= SMALL_FILE:
            _tag(h, name, path.read_bytes())
        else:
            _tag(h, name, f"{st.st_size}:{st.st_mtime_ns}".encode())
    return "files:" + h.hexdigest()


def visible_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                     p.relative_to(folder).parts)]

