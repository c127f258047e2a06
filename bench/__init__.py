"""Speed benchmarks of the cfgbasin_jax sampler against its anchors (issue 9, with issues 3 and 4).

    python -m bench                          # full run (both sizes, all sections; ~20-30 min on 2 CPU cores)
    python -m bench --sizes tiny --repeats 2 # a few minutes
    python -m bench --help

Writes bench/results/latest.md (the README table) and latest.json. See bench/harness.py for what
each section measures and bench/runners.py for the anchors.
"""
