"""Shape-bearing type aliases for the functional core (documentation for readers and type checkers).

Letters: B samples, S sampler steps, C latent channels, h/w latent height/width, L tokens, D text
width. ``Annotated`` keeps them plain ``jax.Array`` at run time; numpy arrays are accepted wherever
a ``jax.Array`` is.
"""

from __future__ import annotations

from typing import Annotated

import jax

Latents = Annotated[jax.Array, "float32 [B,C,h,w]"]
Embeddings = Annotated[jax.Array, "float [B,L,D]"]
PerStep = Annotated[jax.Array, "float32 [B,S]"]
StepIndex = Annotated[jax.Array, "int32 [B,S]"]
PerSample = Annotated[jax.Array, "[B]"]
Mask = Annotated[jax.Array, "bool [B]"]
Timesteps = Annotated[jax.Array, "int32 | float32 [S]"]
Scalar = Annotated[jax.Array, "[]"]

__all__ = ["Embeddings", "Latents", "Mask", "PerSample", "PerStep", "Scalar", "StepIndex", "Timesteps"]
