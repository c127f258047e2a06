"""Shape-bearing type aliases for the functional core (documentation for readers and type checkers).

Letters: B samples, S sampler steps, C latent channels, h/w latent height/width, L tokens, D text
width. ``Annotated`` keeps them plain ``jax.Array`` at run time; numpy arrays are accepted wherever
a ``jax.Array`` is.
"""

from __future__ import annotations

from typing import Annotated

import jax
import jax.numpy as jnp

Latents = Annotated[jax.Array, "float32 [B,C,h,w]"]
Embeddings = Annotated[jax.Array, "float [B,L,D]"]
PerStep = Annotated[jax.Array, "float32 [B,S]"]
StepIndex = Annotated[jax.Array, "int32 [B,S]"]
PerSample = Annotated[jax.Array, "[B]"]
Mask = Annotated[jax.Array, "bool [B]"]
Timesteps = Annotated[jax.Array, "int32 | float32 [S]"]
Scalar = Annotated[jax.Array, "[]"]



def _varying(leaf) -> frozenset:
    """The manual mesh axes ``leaf`` varies over inside ``jax.shard_map`` (empty outside)."""
    aval = jax.typeof(leaf)
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def varying_axes(*trees) -> frozenset:
    """The union of the manual mesh axes over which any leaf of ``trees`` varies (shard_map's
    varying-manual-axes type; empty outside ``shard_map`` or with ``check_vma=False``)."""
    return frozenset().union(*(_varying(leaf) for leaf in jax.tree.leaves(trees)))


def vary(tree, axes: frozenset):
    """Every leaf of ``tree`` marked as varying over ``axes`` (``jax.lax.pcast(..., to="varying")``
    for the axes a leaf lacks; a no-op outside shard_map). Loop state built from constants
    (``jnp.zeros``) is invariant; a scan carry must have the type of the body's output."""
    if not axes:
        return tree

    def cast(leaf):
        missing = tuple(sorted(axes - _varying(leaf), key=str))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, tree)


def like(tree, reference):
    """``tree`` with each leaf cast to the dtype and the varying mesh axes of the matching leaf of
    ``reference`` (the scan carry's types)."""

    def cast(leaf, ref):
        leaf = jnp.asarray(leaf).astype(jnp.result_type(ref))
        return vary(leaf, _varying(ref))

    return jax.tree.map(cast, tree, reference)


__all__ = ["Embeddings", "Latents", "Mask", "PerSample", "PerStep", "Scalar", "StepIndex", "Timesteps", "like", "vary",
           "varying_axes"]
