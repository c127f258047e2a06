"""Import time of ``import cfgbasin_jax``: median wall time of fresh interpreters, interleaved rounds.

    python -m bench.import_time                       # this interpreter: cfgbasin_jax and the jax/flax floor
    python -m bench.import_time --runs 9 --target "before=/venvs/classic/bin/python@/tmp/main-checkout"

Each target is ``LABEL=PYTHON`` or ``LABEL=PYTHON@PYTHONPATH`` (e.g. an older checkout to compare with);
every round runs each target once, in turn. The floor is ``import jax, jax.numpy, flax.struct`` in this
interpreter: what any JAX/Flax library pays. The table also says which of torch, diffusers and
transformers each import pulled in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FLOOR = "import jax, jax.numpy, flax.struct"
PROBE = "import sys, json; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'})))"


def parse_target(spec: str) -> tuple:
    """'LABEL=PYTHON[@PYTHONPATH]' -> (label, python, pythonpath or None)."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"python -m bench.import_time: error: --target {spec!r}: use LABEL=PYTHON[@PYTHONPATH]")
    python, _, path = rest.partition("@")
    return label, python, path or None


def _run(python: str, path: str | None, code: str) -> tuple:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if path:
        env["PYTHONPATH"] = path
    started = time.perf_counter()
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd="/", check=True)
    return time.perf_counter() - started, proc.stdout


def measure(targets: list, runs: int) -> list:
    """[(label, code, python, path)] -> rows with median / min seconds and the heavy packages imported."""
    times = {t[0]: [] for t in targets}
    for _ in range(runs):
        for label, code, python, path in targets:
            times[label].append(_run(python, path, code)[0])
    rows = []
    for label, code, python, path in targets:
        pulled = json.loads(_run(python, path, f"{code}\n{PROBE}")[1].strip().splitlines()[-1])
        rows.append({"target": label, "code": code, "median_s": statistics.median(times[label]),
                     "min_s": min(times[label]), "runs": runs, "imports": pulled})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.import_time", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--target", action="append", default=[], help="LABEL=PYTHON[@PYTHONPATH] (repeatable)")
    args = p.parse_args(argv)
    targets = [(label, "import cfgbasin_jax", python, path) for label, python, path in map(parse_target, args.target)]
    targets += [("this interpreter", "import cfgbasin_jax", sys.executable, None), ("floor", FLOOR, sys.executable, None)]
    rows = measure(targets, args.runs)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print("| target | code | median s | min s | runs | torch / diffusers / transformers imported |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | `{r['code']}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['runs']} | "
              f"{', '.join(r['imports']) or 'none'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
