"""The method registry: one vocabulary and the paper's defaults, used by the CLI, the demo and the bench."""

import sys
from pathlib import Path

import pytest

from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import registry as M

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_every_spelling_names_one_method():
    for spelling in ("og-dtp", "OG+DTP", "og_dtp", " OG_DTP "):
        assert M.get(spelling).name == "og-dtp"
    assert M.get("constant").name == "cfg" and M.get("Aug").name == "prompt-augmentation"
    with pytest.raises(ValueError, match="unknown method 'dropout'"):
        M.get("dropout")


def test_paper_defaults():
    assert M.guidance("cfg") == G.constant(7.5)
    assert M.guidance("stp") == G.static_transition(500, 0.0, 7.5)
    assert M.guidance("og-stp") == G.static_transition(650, -2.0, 7.5)
    assert M.guidance("dtp") == G.dynamic_transition(1.0, 7.5)
    assert M.guidance("og-dtp") == G.dynamic_transition(-7.5, 7.5, signal="latent_cosine", mode="exact")
    assert M.guidance("og-dtp", before=-2.0, scale=4.0, mode="causal") == G.dynamic_transition(
        -2.0, 4.0, signal="latent_cosine", mode="causal")
    with pytest.raises(ValueError, match="takes"):
        M.guidance("cfg", t=500)


def test_cli_demo_and_bench_share_the_registry():
    from bench import runners
    from cfgbasin_jax import baselines
    from cfgbasin_jax.apps import generate as cli
    from cfgbasin_jax.apps import demo

    assert cli.METHODS == M.names(cli_only=True)
    assert demo.METHODS == tuple(M.get(n).label for n in M.names())
    assert all(M.get(m).name == m for m in runners.METHODS)
    assert baselines.METHODS == tuple(n for n in M.names() if M.get(n).baseline)
    assert cli.method_defaults("og-stp")["guidance_change_step"] == M.get("og-stp").defaults["t"]
    assert demo.method_guidance("OG+STP", 4.0, 551, 651, -2.0) == G.static_transition(651, -2.0, 4.0)
    assert runners.guidance("og_dtp") == G.dynamic_transition(-2.0, 7.5, signal="latent_cosine")


def _method_spellings() -> set:
    return {s for m in M.METHODS.values() for s in (m.name, m.label, *m.aliases)} | {M._key(s) for m in M.METHODS.values()
                                                                                   for s in (m.name, m.label, *m.aliases)}


def test_no_method_name_is_compared_outside_the_registry():
    """Every comparison (==, !=, in) with a method's spelling as a literal, outside method/registry.py,
    fails: callers ask the registry (Method attributes, presets). Allowed: bench's section named "dtp"."""
    import ast

    allowed = {("bench/__main__.py", "dtp")}  # a benchmark section's name, not a method
    spellings = _method_spellings() - {"constant"}  # also the name of a guidance rule (Guidance.rule)
    bad = []
    files = [p for d in ("cfgbasin_jax", "convert", "bench", "scripts") for p in (ROOT / d).rglob("*.py")]
    for path in files:
        rel = str(path.relative_to(ROOT))
        if rel == "cfgbasin_jax/method/registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for item in items:
                    if isinstance(item, ast.Constant) and item.value in spellings and (rel, item.value) not in allowed:
                        bad.append(f"{rel}:{node.lineno}: {item.value!r}")
    assert not bad, "method names compared outside the registry:\n" + "\n".join(bad)


def test_script_flags_and_presets_state_their_values():
    """Each method's script defaults, restated from the reference scripts' argparse tables; the presets'
    values; "gated-" is parsed by the registry only (Method.base / Method.gated)."""
    assert dict(M.get("stp").script.defaults)["guidance_change_step"] == 0.0  # the STP script's own default
    assert M.get("og-stp").script.defaults["guidance_change_step"] == 650.0
    assert M.get("dtp").script.defaults["guidance_scale"] == 1.0
    assert M.get("og-dtp").script.defaults["guidance_scale"] == 7.5
    assert "og_mode" in M.get("dtp").script.ignored() and "guidance_change_step" in M.get("og-dtp").script.ignored()
    assert "gate_threshold" in M.get("stp").script.ignored() and "gate_threshold" in M.get("gated-stp").script.reads
    assert M.get("gated-og-stp").base is M.get("og-stp") and M.get("og-stp").gated is M.get("gated-og-stp")
    assert M.get("gated-stp").recorded_name(-1.0) == "gated-og-stp" and M.get("og-stp").recorded_name(0.0) == "stp"
    assert M.get("dtp").image_tag(3, 481) == 481 and M.get("og-dtp").image_tag(3, 481) == 3
    assert M.get("cfg").image_tag(3, 481) is None
    assert (M.TOY_DEMO.scale, M.TOY_DEMO.opposite_before) == (4.0, -2.0)
    assert M.BENCH.guidance("og-dtp") == G.dynamic_transition(-2.0, 7.5, signal="latent_cosine")
    assert M.TOY_DEMO.guidance("og-stp", opposite_t=651) == G.static_transition(651, -2.0, 4.0)
    assert M.get("cfg").from_flags({"guidance_scale": 5.0, "CFG_scheduling": "linear"}) == G.static_transition(
        0, 5.0, 5.0, "linear", "linear")
    with pytest.raises(M.FlagError, match=r"--CFG_scheduling_later bogus: guidance: unknown shape_after"):
        M.get("stp").from_flags({"CFG_scheduling_later": "bogus"})
    assert [m.name for m in M.METHODS.values() if m.hook is not None] == ["wen", "cads", "prompt-augmentation"]
