"""The names diffusers and transformers give weight files: plain, of a variant (``fp16``), sharded, and
their shard indexes (``save_pretrained(variant=..., max_shard_size=...)``; diffusers' ``_add_variant``
puts the variant before the last suffix). Standard library only (the Hub resolver uses it too).

    diffusion_pytorch_model.safetensors                       a file
    diffusion_pytorch_model.fp16.safetensors                  a file of variant fp16
    diffusion_pytorch_model.safetensors.index.json            a shard index
    diffusion_pytorch_model-00001-of-00002.safetensors        one of its shards
    diffusion_pytorch_model.safetensors.index.fp16.json       a shard index of variant fp16
    diffusion_pytorch_model.fp16-00001-of-00002.safetensors   one of its shards
    diffusion_pytorch_model.safetensors.fp16.index.json       the same, legacy (diffusers < 0.27)
    diffusion_pytorch_model-00001-of-00002.fp16.safetensors   one of its shards, legacy

A stem has no dot (diffusers' and transformers' never do), so every name above parses one way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMATS = (".safetensors", ".bin", ".msgpack")  # PyTorch safetensors, pickled PyTorch, Flax
_FMT = "|".join(f[1:] for f in FORMATS)
_SHARD = r"-\d{5}-of-\d{5}"
_PATTERNS = (  # (kind, pattern), tried in this order
    ("index", rf"(?P<stem>[^.]+)\.(?P<fmt>{_FMT})\.index(?:\.(?P<variant>[^.]+))?\.json"),
    ("index", rf"(?P<stem>[^.]+)\.(?P<fmt>{_FMT})\.(?P<variant>[^.]+)\.index\.json"),
    ("shard", rf"(?P<stem>[^.]+?){_SHARD}\.(?P<variant>[^.]+)\.(?P<fmt>{_FMT})"),
    ("shard", rf"(?P<stem>[^.]+?)(?:\.(?P<variant>[^.]+?))?{_SHARD}\.(?P<fmt>{_FMT})"),
    ("file", rf"(?P<stem>[^.]+)(?:\.(?P<variant>[^.]+))?\.(?P<fmt>{_FMT})"),
)
_COMPILED = tuple((kind, re.compile(pattern)) for kind, pattern in _PATTERNS)


@dataclass(frozen=True)
class WeightName:
    """A parsed weight file name. kind: "file" | "index" | "shard"; format: ".safetensors" | ".bin" |
    ".msgpack"; variant: e.g. "fp16", None for the plain weights."""

    stem: str
    format: str
    variant: str | None
    kind: str


def parse(name: str) -> WeightName | None:
    """The WeightName of a file name (a path's last part is used); None for anything else."""
    base = str(name).replace("\\", "/").rpartition("/")[2]
    for kind, pattern in _COMPILED:
        match = pattern.fullmatch(base)
        if match:
            return WeightName(match["stem"], "." + match["fmt"], match["variant"], kind)
    return None


def is_weight(name: str) -> bool:
    """A weight file, shard or shard index."""
    return parse(name) is not None


def variant_of(name: str) -> str | None:
    """'diffusion_pytorch_model.fp16.safetensors' -> 'fp16'; a plain weight name (or no weight) -> None."""
    parsed = parse(name)
    return None if parsed is None else parsed.variant


def expected_names(stem: str, fmt: str, variant: str | None) -> tuple:
    """The single file and the shard indexes (current, then legacy) diffusers writes for ``stem`` in
    format ``fmt`` (".safetensors") and ``variant`` (None: the plain names), in the order to look."""
    if variant is None:
        return f"{stem}{fmt}", f"{stem}{fmt}.index.json"
    return f"{stem}.{variant}{fmt}", f"{stem}{fmt}.index.{variant}.json", f"{stem}{fmt}.{variant}.index.json"
