#!/usr/bin/env python
"""SSCD copy similarity, CLIP score and the paper's row for a generation folder.

    python scripts/evaluate.py --gen OUTDIR --train TRAIN_DIR --sscd SSCD_DST --clip CLIP_DIR

See ``cfgbasin_jax.apps.evaluate`` (``--help``) for the flags and the report's keys.
"""

import sys

from cfgbasin_jax.apps.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
