#!/usr/bin/env python
"""The paper's generate_test_dataset_stp.py: static transition point (STP; a negative --guidance_scale is opposite guidance + STP).

Same flags and defaults as the reference script; equivalent to ``cfgbasin-generate --method stp``.
See ``cfgbasin_jax.apps.generate`` (``--help``) for the flags, outputs and resume behaviour.
"""

import sys

from cfgbasin_jax.apps.generate import main
from cfgbasin_jax.method import registry

if __name__ == "__main__":
    sys.exit(main(method=registry.STP.name, prog="generate_test_dataset_stp.py"))
