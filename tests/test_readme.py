"""The README: its Python code blocks run (tests/readme_blocks.py, in a process of their own started
at the session's first test), its functional sections and its layout tree."""

import os
import re
import sys
from pathlib import Path

import numpy as np
from readme_blocks import README, VALUES, python_blocks

import cfgbasin_jax

HERE = Path(__file__).resolve().parent


def start_early(request, items):
    """The README's blocks, run by tests/readme_blocks.py from the session's first test (conftest's `early`)."""
    from early_start import Started, selected

    if not selected(items, "test_readme_python_blocks_run"):
        return {}

    workdir = request.getfixturevalue("tmp_path_factory").mktemp("readme")
    return {"readme_blocks": Started([[sys.executable, HERE / "readme_blocks.py", workdir]], dict(os.environ),
                                     workdir / "logs")}


def test_readme_has_the_functional_sections():
    text = README.read_text(encoding="utf-8")
    assert "## Sampling without the Pipeline" in text
    assert "class BelowTau(D.Detector)" in text and "S.sweep" in text and "jax.grad(loss)" in text


def test_readme_python_blocks_run(early):
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 5
    job = early["readme_blocks"]
    (done,) = job.wait(timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]  # names the block that failed
    values = np.load(job.logs.parent / VALUES)
    index = values["res_transition_index"]  # the custom detector's run
    assert index.shape == (4,)
    d = values["res_noise_diff"]
    for b, k in enumerate(index):  # the documented rule, restated
        want = next((j for j, v in enumerate(d[b]) if v < 0.8), -1)
        assert k == want
    assert index.tolist() == [-1, -1, 0, 0]  # as the README says
    flagged = values["out_gate_flagged"]  # the gated run: OG+STP for the memorized caption only, as the README says
    assert flagged.tolist() == [True, True, False, False]
    assert (values["out_transition_index"] >= 0).tolist() == flagged.tolist()


def test_readme_layout_names_every_module():
    """The README's layout tree and the package agree: every subpackage module is named under its
    folder, and every named module exists."""
    text = README.read_text(encoding="utf-8")
    tree = text[text.index("## Layout") :].split("```")[1]
    package = Path(cfgbasin_jax.__file__).resolve().parent
    named: dict[str, set] = {}
    folder = None  # None: outside cfgbasin_jax/; "": its top level; else the subpackage
    for line in tree.splitlines():
        head = re.match(r"^  (\w+)/", line)
        if line.startswith("cfgbasin_jax/") or re.match(r"^  \w+\.py", line):
            folder = ""
        elif head:
            folder = head.group(1)
        elif not line.startswith(" "):
            folder = None
        if folder is not None:
            body = line[head.end():] if head else line
            named.setdefault(folder, set()).update(re.findall(r"\b(\w+)\.py\b", body))
    subpackages = sorted(p.parent.name for p in package.glob("*/__init__.py"))
    assert {"method", "models", "runs", "metrics", "loading"} <= set(subpackages)
    for sub in subpackages:
        actual = {p.stem for p in (package / sub).glob("*.py")} - {"__init__"}
        assert named.get(sub, set()) == actual, (sub, named.get(sub), actual)
    for module in named[""]:
        assert (package / f"{module}.py").is_file(), module
