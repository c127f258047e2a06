"""Runs README.md's Python code blocks in order, in one namespace, in a fresh process (tests/test_readme.py
starts it at the session's first test): ``python readme_blocks.py WORKDIR``.

Blocks that load a real converted model run against the shipped toy instead: every occurrence of a
key of :func:`substitutions` is replaced by its value before the block runs (documented in the
README). Blocks are written for this; nothing else is patched. A failing block exits 1 naming the
block; otherwise WORKDIR/readme_values.npz holds what the test checks of the namespace.
"""

import os
import re
import sys
import traceback
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"
VALUES = "readme_values.npz"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def substitutions() -> dict:
    import cfgbasin_jax

    return {'"converted/sd14"': repr(str(cfgbasin_jax.TOY_MODEL))}


def run_blocks(blocks: list[str]) -> dict:
    """The namespace after running ``blocks`` in order; SystemExit naming the block that failed."""
    namespace: dict = {"__name__": "readme"}
    replace = substitutions()
    for i, block in enumerate(blocks):
        for old, new in replace.items():
            block = block.replace(old, new)
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:  # name the block in the failure
            raise SystemExit(f"{traceback.format_exc()}\nREADME.md python block {i} failed: "
                             f"{type(err).__name__}: {err}\n{block}") from None
    return namespace


def main(workdir: str) -> None:
    os.chdir(workdir)  # nothing a block writes lands in the checkout
    namespace = run_blocks(python_blocks(README.read_text(encoding="utf-8")))
    res, out = namespace["res"], namespace["out"]  # the custom detector's run; the gated run
    np.savez(VALUES, res_transition_index=res.transition_index, res_noise_diff=res.noise_diff,
             out_gate_flagged=out.gate_flagged, out_transition_index=out.transition_index)


if __name__ == "__main__":
    main(sys.argv[1])
