"""Model fingerprints: a short hash that tells two models apart, so a resumed run can refuse a
different model found at the same path. Exactly what each kind detects:

* **Converted directory** (``cfgbasin-convert`` / :func:`cfgbasin_jax.models.converted.save_components`):
  ``"content:<hex>"`` over two parts. (1) The parameters: every parameter's component, key path,
  dtype, shape and bytes, hashed once at conversion by the converter's writer threads from the bytes
  written and stored in ``cfgbasin_jax.json`` (``params_fingerprint``), so reading it costs one small
  file. (2) What the loader reads besides: the model configs, the scheduler config (keys starting
  with ``_``, such as ``_name_or_path``, left out) and the tokenizer's vocabulary and merges, hashed
  from the files as they are NOW (:func:`cfgbasin_jax.models.converted.converted_fingerprint`), so an
  edit of ``scheduler/scheduler_config.json`` (e.g. ``prediction_type``) or of a config changes the
  fingerprint. Converting the same weights again, from any path, gives the same fingerprint.
  Not detected: an edit of the ``params/`` files themselves after conversion (not re-hashed).
* **Diffusers-format folder** (converted in memory at every load), a ``--unet_path`` folder, or a
  converted directory written before fingerprints existed: ``"files:<hex>"`` over the files the
  loader reads, each by relative path and size, and
    - up to 1 MiB (configs, tokenizer files, tiny weights): by their whole content;
    - a larger ``.safetensors`` file: its whole header (every tensor's name, dtype, shape and byte
      offsets) and, of every tensor, the first and the last 4 KiB of its data (about 10 MB read for
      Stable Diffusion's ~1,100 tensors, never the gigabytes);
    - any other larger file (``.bin`` pickles): its first and last 64 KiB and 64 blocks of 4 KiB
      spread evenly between.
  Detected: a file replaced by other weights of the same size and modification time (``cp -a``,
  ``rsync -a``, ``tar``), since other weights differ in (nearly) every element; any change of a
  safetensors header; any change within a sampled range. Not detected: an edit confined to bytes
  outside the sampled ranges (in safetensors, the middle of one tensor larger than 8 KiB). Not
  hashed: modification times (a plain ``cp`` of the same files keeps the fingerprint), except in
  the conversion cache's key (``mtimes=True``: any rewrite converts again).
  Convert the folder for a content fingerprint of every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

SMALL_FILE = 1 << 20  # files up to this size are hashed by content
TENSOR_SAMPLE = 4 << 10  # bytes hashed at each end of every tensor of a large safetensors file
FILE_ENDS = 64 << 10  # bytes hashed at each end of any other large file
FILE_BLOCKS, FILE_BLOCK = 64, 4 << 10  # and that many blocks of that size spread evenly between
TOKENIZER_FILES = ("vocab.json", "merges.txt")
MARKER_KEY = "fingerprint"
PARAMS_KEY = "params_fingerprint"


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

    def params_digest(self) -> str:
        """Hex digest of every parameter's digest, in key order (stored at conversion)."""
        h = _hasher()
        for key in sorted(self._digests):
            _tag(h, key, self._digests[key])
        return h.hexdigest()

    def marker_fields(self, configs: Mapping, scheduler_config: Mapping, tokenizer_dir) -> dict:
        """The fields a converted directory's marker file stores: ``fingerprint`` (the whole model)
        and ``params_fingerprint`` (the parameters; combined with the files read now at load)."""
        params = self.params_digest()
        return {MARKER_KEY: combine(params, configs, scheduler_config, tokenizer_dir), PARAMS_KEY: params}

    def fingerprint(self, configs: Mapping, scheduler_config: Mapping, tokenizer_dir) -> str:
        return combine(self.params_digest(), configs, scheduler_config, tokenizer_dir)


def combine(params_digest: str, configs: Mapping, scheduler_config: Mapping, tokenizer_dir) -> str:
    """``"content:<hex>"`` of a parameter digest and the configs, scheduler config and tokenizer
    files (see the module docstring)."""
    h = _hasher()
    _tag(h, "params", params_digest.encode())
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


def files_fingerprint(root, files: Iterable[Path], mtimes: bool = False) -> str:
    """``"files:<hex>"`` of ``files`` (paths under ``root``; see the module docstring). ``mtimes``:
    the large files' modification times count too (stricter: a cache key, where serving a stale
    conversion is worse than converting again after a plain copy)."""
    root = Path(root)
    h = _hasher()
    for path in sorted({Path(p) for p in files}):
        st = path.stat()
        size = st.st_size
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        _tag(h, name, (f"{size}:{st.st_mtime_ns}" if mtimes and size > SMALL_FILE else str(size)).encode())
        if size <= SMALL_FILE:
            _tag(h, "content", path.read_bytes())
        else:
            with open(path, "rb") as f:
                for label, payload in _large_file_samples(f, size, path.name.endswith(".safetensors")):
                    _tag(h, label, payload)
    return "files:" + h.hexdigest()


def _large_file_samples(f, size: int, safetensors: bool):
    """(label, bytes) pairs sampled from a large file (see the module docstring)."""
    ranges = _safetensors_ranges(f, size) if safetensors else None
    if ranges is None:
        step = (size - 2 * FILE_ENDS) // (FILE_BLOCKS + 1)
        ranges = [(0, FILE_ENDS), (size - FILE_ENDS, size)]
        ranges[1:1] = [(FILE_ENDS + i * step, FILE_ENDS + i * step + FILE_BLOCK) for i in range(1, FILE_BLOCKS + 1)]
    for begin, end in ranges:
        yield f"{begin}:{end}", os.pread(f.fileno(), end - begin, begin)


def _safetensors_ranges(f, size: int) -> list[tuple[int, int]] | None:
    """The header of a safetensors file, then the first and last TENSOR_SAMPLE bytes of every
    tensor, as absolute (begin, end) ranges; None when the header cannot be read."""
    try:
        (length,) = struct.unpack("<Q", os.pread(f.fileno(), 8, 0))
        if length > size - 8:
            return None
        header = json.loads(os.pread(f.fileno(), length, 8))
        start = 8 + length
        ranges = [(0, start)]
        for key in sorted(k for k in header if k != "__metadata__"):
            begin, end = (start + int(x) for x in header[key]["data_offsets"])
            ranges.append((begin, min(end, begin + TENSOR_SAMPLE)))
            ranges.append((max(begin, end - TENSOR_SAMPLE), end))
    except (ValueError, TypeError, KeyError, AttributeError, struct.error):
        return None
    return ranges


def visible_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                     p.relative_to(folder).parts)]

