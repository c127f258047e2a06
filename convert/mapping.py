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

Everything is checked from the weight files' headers first (`plan_leaves`); the tensors are then
read one at a time (`lazy_flax_params`: one LazyLeaf per Flax leaf, laid out and cast on reading).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from cfgbasin_jax.models.checkpoint import LazyLeaf, aligned_empty
from cfgbasin_jax.models.errors import ConversionError
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


def layout_of(torch_shape: tuple, leaf: str, flax_shape: tuple) -> str | None:
    """How a PyTorch tensor of `torch_shape` becomes the Flax leaf of `flax_shape`: "same",
    "linear" (transpose), "conv" (OIHW -> HWIO) or "conv1x1" (a 1x1 conv weight as a Dense kernel);
    None when the shapes cannot match."""
    torch_shape, flax_shape = tuple(torch_shape), tuple(flax_shape)
    if leaf != "kernel":
        layout, shape = "same", torch_shape
    elif len(torch_shape) == 2 and len(flax_shape) == 2:
        layout, shape = "linear", torch_shape[::-1]
    elif len(torch_shape) == 4 and len(flax_shape) == 4:
        out_ch, in_ch, height, width = torch_shape
        layout, shape = "conv", (height, width, in_ch, out_ch)
    elif len(torch_shape) == 4 and len(flax_shape) == 2 and torch_shape[2:] == (1, 1):
        layout, shape = "conv1x1", torch_shape[1::-1]
    else:
        return None
    return layout if shape == flax_shape else None


# layout -> (PyTorch -> Flax, Flax -> PyTorch); views, nothing is copied.
_LAYOUTS = {
    "same": (lambda a: a, lambda a: a),
    "linear": (lambda a: a.T, lambda a: a.T),
    "conv": (lambda a: np.transpose(a, (2, 3, 1, 0)), lambda a: np.transpose(a, (3, 2, 0, 1))),
    "conv1x1": (lambda a: a[:, :, 0, 0].T, lambda a: a.T[:, :, None, None]),
}


def apply_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A view of `array` in the Flax layout (see layout_of)."""
    return _LAYOUTS[layout][0](array)


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """The inverse of apply_layout: a view of a Flax leaf in PyTorch's layout."""
    return _LAYOUTS[layout][1](array)


def torch_state_dict(flax_params: Mapping, torch_shapes: Mapping, aliases: Mapping[str, tuple] | None = None) -> dict:
    """Flax params -> {PyTorch key: numpy array} for a module whose state dict has `torch_shapes`
    ({key: shape}); the inverse of the conversion (e.g. to run PyTorch on weights made in JAX)."""
    out = {}
    for path, value in _flatten(flax_params):
        value = np.asarray(value)
        key = next((k for k in torch_key_candidates(path, aliases) if k in torch_shapes), None)
        layout = None if key is None else layout_of(torch_shapes[key], path[-1], value.shape)
        if layout is None:
            raise ConversionError(f"Flax parameter {'/'.join(path)} {value.shape}: no PyTorch key of a matching shape")
        out[key] = np.array(to_torch_layout(value, layout), order="C")  # a writable copy
    return out


def to_flax_layout(array: np.ndarray, leaf: str, flax_shape: tuple) -> np.ndarray | None:
    """PyTorch layout -> Flax layout for one leaf (a view); None when the shapes cannot match."""
    layout = layout_of(array.shape, leaf, flax_shape)
    return None if layout is None else apply_layout(array, layout)


def with_prefix(state: StateDict, prefix: str) -> StateDict:
    """`state` with `prefix` + "." before every key that lacks it, unless some parameter key (buffers
    such as position_ids do not count) already starts with it."""
    mark = prefix + "."
    if any(key.startswith(mark) and not _is_ignored(key) for key in state.specs):
        return state
    specs = {key if key.startswith(mark) else mark + key: spec for key, spec in state.specs.items()}
    return StateDict(specs=specs, source=state.source, readers=state.readers)


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


@dataclass(frozen=True)
class LeafSource:
    """Where one Flax leaf comes from: its Flax path and shape, the PyTorch key and the layout."""

    path: tuple
    shape: tuple
    key: str
    layout: str


def plan_leaves(state: StateDict, target_shapes: Mapping, aliases: Mapping[str, tuple] | None = None) -> list:
    """The LeafSource of every leaf of the Flax tree `target_shapes` (leaves with .shape), checked
    against the state dict's headers only (nothing is read).

    Raises ConversionError naming the file and key for a missing parameter, a shape mismatch, a
    non-float weight, or an unexpected parameter.
    """
    specs = state.specs
    used = set()
    plan = []
    for path, spec in _flatten(target_shapes):
        candidates = torch_key_candidates(path, aliases)
        key = next((k for k in candidates if k in specs), None)
        leaf, shape = path[-1], tuple(spec.shape)
        if key is None:
            raise ConversionError(
                f"{state.source}: missing parameter {candidates[0]!r} "
                f"(shape {expected_torch_shape(leaf, shape)}, for Flax {'/'.join(path)})"
            )
        source = specs[key]
        if source.dtype is None or (source.dtype.kind not in _FLOAT_KINDS and source.dtype.name != "bfloat16"):
            dtype = "unsupported" if source.dtype is None else source.dtype
            raise ConversionError(f"{source.file}: parameter {key!r} has non-float dtype {dtype}")
        layout = layout_of(source.shape, leaf, shape)
        if layout is None:
            raise ConversionError(
                f"{source.file}: parameter {key!r} has shape {tuple(source.shape)}, the model "
                f"config needs {expected_torch_shape(leaf, shape)}"
            )
        used.add(key)
        plan.append(LeafSource(path, shape, key, layout))
    unexpected = sorted(k for k in specs if k not in used and not _is_ignored(k))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(
            f"{specs[unexpected[0]].file}: unexpected parameter {unexpected[0]!r}{more} "
            "that the model config has no place for"
        )
    return plan


def lazy_leaf(state: StateDict, source: LeafSource, dtype) -> LazyLeaf:
    """The Flax leaf `source` of `state` in `dtype`, read only when asked for: one tensor, as a
    (possibly transposed) view of its aligned read buffer, or cast into a new aligned buffer."""
    dtype = np.dtype(dtype)
    spec = state.specs[source.key]

    def read() -> np.ndarray:
        array = apply_layout(state.read(source.key), source.layout)
        if array.dtype == dtype:
            return array  # a view: the writer (or to_device) copies it once, laid out
        out = aligned_empty(source.shape, dtype)
        np.copyto(out, array, casting="unsafe")
        return out

    return LazyLeaf(source.shape, dtype, read, (str(spec.file), spec.offset))


def lazy_flax_params(state: StateDict, target_shapes: Mapping, dtype, aliases: Mapping[str, tuple] | None = None) -> dict:
    """`target_shapes`' tree of LazyLeaf in `dtype`, validated up front (see plan_leaves)."""
    return _nest([(source.path, lazy_leaf(state, source, dtype)) for source in plan_leaves(state, target_shapes, aliases)])


def state_dict_to_flax(
    state: StateDict, target_shapes: Mapping, aliases: Mapping[str, tuple] | None = None
) -> dict:
    """Map `state` onto the Flax tree `target_shapes` (leaves with .shape); float32 numpy leaves,
    all read now (see lazy_flax_params for one at a time). Errors as plan_leaves."""
    plan = plan_leaves(state, target_shapes, aliases)
    return _nest([(source.path, lazy_leaf(state, source, np.float32).read()) for source in plan])
