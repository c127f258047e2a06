"""The toy: a generated 16x16 text-to-image dataset with a memorized subset (``data``) and the training
of a model that memorizes it (``train``). The shipped toy model is :data:`cfgbasin_jax.TOY_MODEL`."""
