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
