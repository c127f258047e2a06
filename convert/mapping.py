"""PyTorch state dict -> Flax params tree, by walking the TARGET Flax tree (shapes from eval_shape).

For every Flax leaf path, e.g. ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1",
"to_q", "kernel"), the PyTorch key is derived:
  - diffusers names list members `name_N` in Flax and `name.N` in PyTorch (for the ModuleList names
    in LIST_NAMES); transformers nests `layers/0`, which joins to `layers.0` as it is;
  - the leaf `kernel` / `scale` / `embedding` is PyTorch's `weight`, `bias` is `bias`; a bare
    parameter (CLIP's `class_embedding`, `logit_scale`) keeps its name;
  - Linear weights (out, in) are transposed to (in, out); conv weights OIHW become HWIO; a 1x1 conv
    weight (out, in, 1, 1) also fills a Dense kernel;
  - the VAE mid-block attention (Flax query/key/value/proj_attn) is read from either the old names or
    the current to_q/to_k/to_v/to_out.0 (`VAE_ATTENTION_ALIASES`).
Keys of the state dict that no Flax leaf consumed are "unexpected", except known buffers
(`IGNORED_BUFFERS`). Every error names the weight file and the PyTorch key.
transformers 5.x saves a bare CLIPTextModel without the `text_model.` prefix of its (and every
earlier) checkpoint: `with_prefix` puts it back.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from cfgbasin_jax.convert.errors import ConversionError
from cfgbasin_jax.convert.weights import StateDict

# diffusers ModuleList attributes: Flax `down_blocks_0` <-> PyTorch `down_blocks.0`.
LIST_NAMES = frozenset(
    {
        "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
        "downsamplers", "upsamplers", "to_out", "net",
    }
)
LEAF_NAMES = {
    "kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
    "class_embedding": "class_embedding", "logit_scale": "logit_scale",
}
VAE_ATTENTION_ALIASES = {
    "query": ("query", "to_q"),
    "key": ("key", "to_k"),
    "value": ("value", "to_v"),
    "proj_attn": ("proj_attn", "to_out.0"),
}
# Non-parameter buffers some checkpoints carry (older transformers saved CLIP's position_ids).
IGNORED_BUFFERS = ("position_ids",)

_LIST_MEMBER = re.compile(r"(?P<name>.+)_(?P<index>\d+)")
_FLOAT_KINDS = ("f",)


def torch_module_name(segment: str) -> str:
    """One Flax path segment -> the PyTorch attribute path (`resnets_1` -> `resnets.1`)."""
    match = _LIST_MEMBER.fullmatch(segment)
    if match and match.group("name") in LIST_NAMES:
        return f"{match.group('name')}.{match.group('index')}"
    return segment


def torch_key_candidates(flax_path: tuple, aliases: Mapping[str, tuple] | None = None) -> list[str]:
    """The PyTorch keys that may hold the Flax leaf at `flax_path`, preferred first."""
    *modules, leaf = flax_path
    if leaf not in LEAF_NAMES:
        raise ConversionError(f"Flax parameter {'/'.join(flax_path)}: unknown leaf name {leaf!r}")
    names = [torch_module_name(segment) for segment in modules]
    last_options = (names[-1] if names else "",)  # a top-level leaf (CLIP's logit_scale) has no module
    if aliases and modules and modules[-1] in aliases:
        last_options = tuple(reversed(aliases[modules[-1]]))  # current naming first
    prefix = ".".join(names[:-1])
    return [".".join(filter(None, (prefix, last, LEAF_NAMES[leaf]))) for last in last_options]


def expected_torch_shape(leaf: str, flax_shape: tuple) -> tuple:
    """The PyTorch shape that maps onto a Flax leaf of `flax_shape` (for error messages)."""
    if leaf == "kernel" and len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    if leaf == "kernel" and len(flax_shape) == 4:
        height, width, in_ch, out_ch = flax_shape
        return (out_ch, in_ch, height, width)
    return tuple(flax_shape)


def to_flax_layout(array: np.ndarray, leaf: str, flax_shape: tuple) -> np.ndarray | None:
    """PyTorch layout -> Flax layout for one leaf; None when the shapes cannot match."""
    if leaf == "kernel":
        if array.ndim == 2 and len(flax_shape) == 2:
            array = array.T
        elif array.ndim == 4 and len(flax_shape) == 4:
            array = np.transpose(array, (2, 3, 1, 0))
        elif array.ndim == 4 and len(flax_shape) == 2 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0].T
        else:
            return None
    return array if tuple(array.shape) == tuple(flax_shape) else None


def with_prefix(state: StateDict, prefix: str) -> StateDict:
    """`state` with `prefix` + "." before every key that lacks it, unless some parameter key (buffers
    such as position_ids do not count) already starts with it."""
    mark = prefix + "."
    if any(key.startswith(mark) and not _is_ignored(key) for key in state.tensors):
        return state
    rename = {key: key if key.startswith(mark) else mark + key for key in state.tensors}
    return StateDict(
        tensors={rename[key]: value for key, value in state.tensors.items()},
        files={rename[key]: path for key, path in state.files.items()},
        source=state.source,
    )


def _flatten(tree: Mapping, prefix: tuple = ()) -> list:
    leaves = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            leaves.extend(_flatten(value, prefix + (key,)))
        else:
            leaves.append((prefix + (key,), value))
    return leaves


def _nest(flat: list) -> dict:
    tree: dict = {}
    for path, value in flat:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _is_ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in IGNORED_BUFFERS


def state_dict_to_flax(
    state: StateDict, target_shapes: Mapping, aliases: Mapping[str, tuple] | None = None
) -> dict:
    """Map `state` onto the Flax tree `target_shapes` (leaves with .shape); float32 numpy leaves.

    Raises ConversionError naming the file and key for a missing parameter, a shape mismatch, a
    non-float weight, or an unexpected parameter.
    """
    tensors = state.tensors
    used = set()
    flat = []
    for path, spec in _flatten(target_shapes):
        candidates = torch_key_candidates(path, aliases)
        key = next((k for k in candidates if k in tensors), None)
        leaf, shape = path[-1], tuple(spec.shape)
        if key is None:
            raise ConversionError(
                f"{state.source}: missing parameter {candidates[0]!r} "
                f"(shape {expected_torch_shape(leaf, shape)}, for Flax {'/'.join(path)})"
            )
        array = np.asarray(tensors[key])
        if array.dtype.kind not in _FLOAT_KINDS and array.dtype.name != "bfloat16":
            raise ConversionError(f"{state.files[key]}: parameter {key!r} has non-float dtype {array.dtype}")
        converted = to_flax_layout(array, leaf, shape)
        if converted is None:
            raise ConversionError(
                f"{state.files[key]}: parameter {key!r} has shape {tuple(array.shape)}, the model "
                f"config needs {expected_torch_shape(leaf, shape)}"
            )
        used.add(key)
        flat.append((path, np.asarray(converted, dtype=np.float32)))
    unexpected = sorted(k for k in tensors if k not in used and not _is_ignored(k))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(
            f"{state.files[unexpected[0]]}: unexpected parameter {unexpected[0]!r}{more} "
            "that the model config has no place for"
        )
    return _nest(flat)
