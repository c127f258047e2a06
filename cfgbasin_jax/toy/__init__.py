"""The toy: a generated 16x16 text-to-image dataset with a memorized subset (``data``) and the training
the architecture of a model that memorizes it (``model``), trained by :mod:`cfgbasin_jax.training`, and the
demo's measurements (``scoring``). The shipped toy model is :data:`cfgbasin_jax.TOY_MODEL`."""
