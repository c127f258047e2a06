#!/usr/bin/env python
"""The paper's generate_test_dataset_opposite_guidance.py: opposite guidance + dynamic transition point (OG+DTP).

Same flags and defaults as the reference script; equivalent to ``cfgbasin-generate --method og-dtp``.
See ``cfgbasin_jax.apps.generate`` (``--help``) for the flags, outputs and resume behaviour.
"""

import sys

from cfgbasin_jax.apps.generate import main
from cfgbasin_jax.method import registry

if __name__ == "__main__":
    sys.exit(main(method=registry.OG_DTP.name, prog="generate_test_dataset_opposite_guidance.py"))
