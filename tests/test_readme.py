"""The README's Python code blocks run, in order, in one namespace.

Blocks that load a real converted model run against the shipped toy instead: every occurrence of a
key of :data:`SUBSTITUTIONS` is replaced by its value before the block runs (documented in the
README). Blocks are written for this; nothing else is patched.
"""

import re
from pathlib import Path

import pytest

import cfgbasin_jax

README = Path(__file__).resolve().parent.parent / "README.md"
SUBSTITUTIONS = {'"converted/sd14"': repr(str(cfgbasin_jax.TOY_MODEL))}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_functional_sections():
    text = README.read_text(encoding="utf-8")
    assert "## Sampling without the Pipeline" in text
    assert "class BelowTau(D.Detector)" in text and "S.sweep" in text and "jax.grad(loss)" in text


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a block writes lands in the checkout
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        for old, new in SUBSTITUTIONS.items():
            block = block.replace(old, new)
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:  # name the block in the failure
            pytest.fail(f"README.md python block {i} failed: {type(err).__name__}: {err}\n{block}")
    res = namespace["res"]  # the custom detector's run
    assert res.transition_index.shape == (4,)
    d = res.noise_diff
    for b, k in enumerate(res.transition_index):  # the documented rule, restated
        want = next((j for j, v in enumerate(d[b]) if v < 0.8), -1)
        assert k == want
    assert res.transition_index.tolist() == [-1, -1, 0, 0]  # as the README says
    out = namespace["out"]  # the gated run: OG+STP for the memorized caption only, as the README says
    assert out.gate_flagged.tolist() == [True, True, False, False]
    assert (out.transition_index >= 0).tolist() == out.gate_flagged.tolist()


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
