"""Read a PyTorch state dict from a diffusers / transformers weight folder into numpy, without torch
for safetensors.

Looked for in this order (first found wins): `<stem>.safetensors`, `<stem>.safetensors.index.json`
(sharded), `<stem>.bin`, `<stem>.bin.index.json`, then a single `*.safetensors` or `*.bin` file of any
name (e.g. a `.fp16.` variant). `.bin` files are read with torch.load(weights_only=True); torch is
imported only there (without it: one ConversionError naming the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # registers numpy's 'bfloat16' for safetensors' numpy API

from cfgbasin_jax.convert.errors import ConversionError

# File stems of the weights of each component folder.
WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
}


@dataclass(frozen=True)
class StateDict:
    """A PyTorch state dict as numpy arrays, with the file each key came from.

    tensors: key -> array (the file's dtype; bfloat16 via ml_dtypes)
    files: key -> the weight file holding it
    source: the file (or shard index) named in errors about keys that are absent
    """

    tensors: dict
    files: dict
    source: Path


def find_weight_file(folder: Path, stems) -> Path:
    """The weight file (or shard index) of a component folder; ConversionError naming the folder if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"missing folder {folder}")
    candidates = []
    for suffix in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"):
        for stem in stems:
            candidates.append(folder / f"{stem}{suffix}")
    for path in candidates:
        if path.is_file():
            return path
    for pattern in ("*.safetensors", "*.bin"):
        matches = sorted(folder.glob(pattern))
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(m.name for m in matches)
            raise ConversionError(f"{folder}: several weight files ({names}) and none named {candidates[0].name}")
    names = ", ".join(p.name for p in candidates)
    raise ConversionError(f"{folder}: no weight file (looked for {names})")


def read_state_dict(path: Path) -> StateDict:
    """Read one weight file or a sharded `*.index.json` into a StateDict."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    tensors = _read_file(path)
    return StateDict(tensors=tensors, files={key: path for key in tensors}, source=path)


def read_component_state_dict(folder: Path, kind: str) -> StateDict:
    """find_weight_file + read_state_dict for component `kind` ('unet', 'vae', 'text_encoder')."""
    return read_state_dict(find_weight_file(folder, WEIGHT_STEMS[kind]))


def _read_file(path: Path) -> dict:
    if path.name.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.name.endswith(".bin"):
        return _read_torch_bin(path)
    raise ConversionError(f"{path}: unknown weight file type (need .safetensors or .bin)")


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ConversionError(f"{path}: cannot read safetensors file ({err})") from err


def _read_torch_bin(path: Path) -> dict:
    try:
        import torch
    except ImportError as err:
        raise ConversionError(
            f"{path}: pickled PyTorch weights (.bin) need torch, which cannot be imported ({err}); install it "
            "(pip install 'cfgbasin_jax[torch]') or use a folder with .safetensors weights"
        ) from err

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConversionError(f"{path}: cannot read pickled weights ({err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a state dict")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            tensors[key] = value.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            tensors[key] = value.numpy()
    return tensors


def _read_sharded(index_path: Path) -> StateDict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConversionError(f"{index_path}: not a shard index with a 'weight_map' ({err})") from err
    tensors, files = {}, {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_path.parent / shard_name
        if not shard.is_file():
            raise ConversionError(f"{index_path}: shard file {shard_name} is missing")
        for key, value in _read_file(shard).items():
            tensors[key] = value
            files[key] = shard
    for key, shard_name in weight_map.items():
        if key not in tensors:
            raise ConversionError(
                f"{index_path.parent / shard_name}: parameter {key!r} listed in {index_path.name} is absent"
            )
    return StateDict(tensors=tensors, files=files, source=index_path)
