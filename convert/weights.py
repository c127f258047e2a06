"""Open a PyTorch state dict from a diffusers / transformers weight folder lazily: every key's shape
and dtype up front (from the file headers), one tensor read at a time. No torch for safetensors.

Looked for in this order (first found wins; :func:`find_weight_file`): the requested variant's
`<stem>.fp16.safetensors`, its shard index `<stem>.safetensors.index.fp16.json` (or the legacy
`<stem>.safetensors.fp16.index.json`), the same in `.bin`; then the plain `<stem>.safetensors`,
`<stem>.safetensors.index.json`, `<stem>.bin`, `<stem>.bin.index.json`; then the one weight file or
shard index of any name (the names: :mod:`cfgbasin_jax.convert.weight_names`). Safetensors headers are parsed here and each tensor is read with
one positioned read into an aligned buffer. `.bin` files are opened with
torch.load(weights_only=True, mmap=True); torch is imported only there (without it: one
ConversionError naming the file).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ml_dtypes  # registers numpy's 'bfloat16'
import numpy as np

from cfgbasin_jax.convert import weight_names
from cfgbasin_jax.models.checkpoint import aligned_empty, read_file
from cfgbasin_jax.models.errors import ConversionError

# File stems of the weights of each component folder.
WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
}

READABLE_FORMATS = (".safetensors", ".bin")  # in the order preferred

# safetensors dtype names -> numpy (None: a dtype numpy cannot hold; such a tensor cannot be read).
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


@dataclass(frozen=True)
class TensorSpec:
    """shape, numpy dtype (None if numpy has none), the file holding the tensor, where, and its key
    in that file (`name`: a StateDict may rename its keys, see mapping.with_prefix)."""

    shape: tuple
    dtype: np.dtype | None
    file: Path
    offset: int
    name: str


@dataclass(frozen=True)
class StateDict:
    """A PyTorch state dict opened lazily.

    specs: key -> TensorSpec (shape and dtype from the headers; nothing read yet)
    files: key -> the weight file holding it
    source: the file (or shard index) named in errors about keys that are absent
    read(key) -> numpy array in the file's dtype (bfloat16 via ml_dtypes), a fresh aligned buffer
    """

    specs: dict
    source: Path
    readers: dict  # file -> callable(TensorSpec) -> array

    @property
    def files(self) -> dict:
        return {key: spec.file for key, spec in self.specs.items()}

    def read(self, key: str) -> np.ndarray:
        spec = self.specs[key]
        return self.readers[spec.file](spec)

    @classmethod
    def from_arrays(cls, tensors: dict, source="<memory>") -> "StateDict":
        """A StateDict over arrays already in memory (e.g. a PyTorch module's state dict as numpy);
        `source` names it in errors."""
        source = Path(source)
        specs = {key: TensorSpec(tuple(np.shape(value)), np.asarray(value).dtype, source, 0, key)
                 for key, value in tensors.items()}
        return cls(specs=specs, source=source, readers={source: lambda spec: np.asarray(tensors[spec.name])})


def find_weight_file(folder: Path, stems, variant: str | None = None) -> Path:
    """The weight file (or shard index) of a component folder, as diffusers picks it: the ``variant``'s
    (e.g. "fp16": ``<stem>.fp16.safetensors``, ``<stem>.safetensors.index.fp16.json``) where the folder
    has it, else the plain one; safetensors before .bin; a single file before a shard index. Else
    the one weight file or shard index of any name (shards of an index are not counted; with a
    ``variant``, only its names and plain ones). ConversionError naming the folder if none, or if
    several could be meant."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"missing folder {folder}")
    candidates = []
    for v in ((None,) if variant is None else (variant, None)):
        for fmt in READABLE_FORMATS:
            for names in zip(*(weight_names.expected_names(stem, fmt, v) for stem in stems)):
                candidates += [folder / name for name in names]
    for path in candidates:
        if path.is_file():
            return path
    present = sorted(p for p in folder.iterdir() if p.is_file())
    for fmt in READABLE_FORMATS:
        matches = [p for p in present if _may_be_meant(p.name, fmt, variant)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(m.name for m in matches)
            hint = "; choose one with a variant (--variant, e.g. fp16)" if variant is None else ""
            raise ConversionError(f"{folder}: several weight files ({names}) and none named {candidates[0].name}{hint}")
    names = ", ".join(p.name for p in candidates)
    raise ConversionError(f"{folder}: no weight file (looked for {names})")


def _may_be_meant(name: str, fmt: str, variant: str | None) -> bool:
    """A file of format ``fmt`` that find_weight_file's fallback may pick: a weight file or shard index
    (not a shard) of ``variant`` or plain (any variant when None), or an unusual name ending in ``fmt``."""
    parsed = weight_names.parse(name)
    if parsed is None:
        return name.endswith(fmt)
    return parsed.format == fmt and parsed.kind != "shard" and (variant is None or parsed.variant in (variant, None))


def read_state_dict(path: Path) -> StateDict:
    """Open one weight file or a sharded `*.index.json` as a lazy StateDict."""
    path = Path(path)
    parsed = weight_names.parse(path.name)
    if parsed is not None and parsed.kind == "index":
        return _open_sharded(path)
    specs, reader = _open_file(path)
    return StateDict(specs=specs, source=path, readers={path: reader})


def read_component_state_dict(folder: Path, kind: str, variant: str | None = None) -> StateDict:
    """find_weight_file + read_state_dict for component `kind` ('unet', 'vae', 'text_encoder')."""
    return read_state_dict(find_weight_file(folder, WEIGHT_STEMS[kind], variant))


def _open_file(path: Path) -> tuple[dict, Callable]:
    if path.name.endswith(".safetensors"):
        return _open_safetensors(path)
    if path.name.endswith(".bin"):
        return _open_torch_bin(path)
    raise ConversionError(f"{path}: unknown weight file type (need .safetensors or .bin)")


# ------------------------------------------------------------------------------------------ safetensors


def safetensors_header(path: Path) -> tuple[dict, int]:
    """({key: {"dtype", "shape", "data_offsets"}}, start of the data) of a safetensors file, checked
    against the file's size; ConversionError naming the file if malformed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        start = 8 + length
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            itemsize = _itemsize(entry["dtype"])
            nbytes = None if itemsize is None else math.prod(entry["shape"]) * itemsize
            if not 0 <= begin <= end <= size - start or (nbytes is not None and end - begin != nbytes):
                raise ValueError(f"tensor {key!r}: data offsets {begin}..{end} do not fit its shape or the file")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise ConversionError(f"{path}: cannot read safetensors file ({err})") from err
    return header, start


def _itemsize(dtype_name: str) -> int | None:
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    return None if dtype is None else np.dtype(dtype).itemsize


def _open_safetensors(path: Path) -> tuple[dict, Callable]:
    header, start = safetensors_header(path)
    specs = {}
    for key, entry in header.items():
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        specs[key] = TensorSpec(tuple(entry["shape"]), None if dtype is None else np.dtype(dtype), path,
                                start + entry["data_offsets"][0], key)

    def read(spec: TensorSpec) -> np.ndarray:
        return read_file(path, spec.shape, spec.dtype, spec.offset)

    return specs, read


# ---------------------------------------------------------------------------------------------- .bin


def _open_torch_bin(path: Path) -> tuple[dict, Callable]:
    try:
        import torch
    except ImportError as err:
        raise ConversionError(
            f"{path}: pickled PyTorch weights (.bin) need torch, which cannot be imported ({err}); install it "
            "(pip install 'cfgbasin_jax[torch]') or use a folder with .safetensors weights"
        ) from err

    try:
        state = torch_load(path, mmap=True)
    except ConversionError:
        state = torch_load(path)  # legacy (non-zip) pickles cannot be memory-mapped
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a state dict")
    specs = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        specs[key] = TensorSpec(tuple(value.shape), _torch_numpy_dtype(value.dtype), path, 0, key)

    def read(spec: TensorSpec) -> np.ndarray:
        value = state[spec.name].detach().cpu()
        if value.dtype == torch.bfloat16:
            source = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            source = value.numpy()
        out = aligned_empty(source.shape, source.dtype)
        np.copyto(out, source)
        return out

    return specs, read


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")


def torch_load_reason(err: BaseException) -> str:
    """One line of torch.load's (many-line) error: the first that is not its boilerplate advice."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    return (specific or lines or [type(err).__name__])[0]


def torch_load(path, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU (no pickled code runs), torch's warnings
    (legacy format, pickle protocol) silenced; any failure is one ConversionError line naming the
    file (:func:`torch_load_reason`)."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is "cannot read this file"
        raise ConversionError(f"{path}: cannot read pickled weights ({torch_load_reason(err)})") from None


def _torch_numpy_dtype(dtype):
    import torch

    if dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)
    except (TypeError, RuntimeError):
        return None


# ------------------------------------------------------------------------------------------- sharded


def _open_sharded(index_path: Path) -> StateDict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConversionError(f"{index_path}: not a shard index with a 'weight_map' ({err})") from err
    specs, readers = {}, {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_path.parent / shard_name
        if not shard.is_file():
            raise ConversionError(f"{index_path}: shard file {shard_name} is missing")
        shard_specs, readers[shard] = _open_file(shard)
        specs.update(shard_specs)
    for key, shard_name in weight_map.items():
        if key not in specs:
            raise ConversionError(
                f"{index_path.parent / shard_name}: parameter {key!r} listed in {index_path.name} is absent"
            )
    return StateDict(specs=specs, source=index_path, readers=readers)
