"""bench.profile: the recorded calls, the FLOP count and both breakdowns, on a tiny UNet.

The recorded calls are checked against PyTorch diffusers' own modules (counted with forward hooks),
the FLOP count against XLA's cost analysis of the compiled UNet: two independent counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from bench import profile as P  # noqa: E402
from bench import report  # noqa: E402
from cfgbasin_jax.models import tiny  # noqa: E402
from cfgbasin_jax.models.builders import build_unet, param_shapes  # noqa: E402

LATENT = 16


@pytest.fixture(scope="module")
def unets():
    cfg = tiny.tiny_configs("sd1")["unet"]
    ours = build_unet(cfg)
    spec = jax.ShapeDtypeStruct
    inputs = (spec((2, cfg["in_channels"], LATENT, LATENT), jnp.float32), spec((2,), jnp.int32),
              spec((2, 77, cfg["cross_attention_dim"]), jnp.float32))
    params = tiny.random_params(param_shapes(ours, *inputs))
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    return cfg, ours, params, theirs, inputs


def _torch_calls(unet, cfg) -> dict:
    """How many times diffusers' forward calls a module of each kind (its own classes, hooks)."""
    counts = dict.fromkeys(P.KINDS, 0)
    attention = diffusers.models.attention_processor.Attention

    def kind(m):
        if isinstance(m, torch.nn.Conv2d):
            return "conv"
        if isinstance(m, torch.nn.GroupNorm):
            return "group_norm"
        if isinstance(m, attention):
            return "cross_attention" if m.cross_attention_dim != m.query_dim or m.is_cross_attention else "self_attention"
        return None

    handles = []
    for m in unet.modules():
        k = kind(m)
        if k:
            handles.append(m.register_forward_hook(lambda mod, a, o, k=k: counts.__setitem__(k, counts[k] + 1)))
    with torch.no_grad():
        unet(torch.zeros(2, cfg["in_channels"], LATENT, LATENT), torch.tensor([1, 1]),
             torch.zeros(2, 77, cfg["cross_attention_dim"]))
    for h in handles:
        h.remove()
    return counts


def test_recorded_calls_are_diffusers_modules(unets):
    cfg, ours, params, theirs, inputs = unets
    calls = P.record_calls(ours, params, *inputs, return_dict=False)
    recorded = {k: sum(c.kind == k for c in calls) for k in P.KINDS}
    assert recorded == _torch_calls(theirs, cfg)
    assert recorded["self_attention"] > 0 and recorded["cross_attention"] > 0


def test_flop_count_agrees_with_xla(unets, monkeypatch):
    _, ours, params, _, inputs = unets
    # The count is a direct convolution's; XLA counts what runs, so Winograd (fewer multiplications) is off here.
    from cfgbasin_jax.models import conv
    monkeypatch.setattr(conv, "AUTO_WINOGRAD", False)
    flops = P.count_flops(P.record_calls(ours, params, *inputs, return_dict=False))
    assert flops["total"] == flops["conv"] + flops["dense"] + flops["attention_products"]
    assert min(flops["conv"], flops["dense"], flops["attention_products"]) > 0
    compiled = jax.jit(lambda p, *xs: ours.apply({"params": p}, *xs, return_dict=False)).lower(params, *inputs).compile()
    xla = P._cost(compiled)["flops"]
    # XLA also counts biases, norms and activations (not counted here) and, on the matrix-product
    # convolution path, the windows' padded zeros: a little above ours. A dropped factor (2, k*k,
    # a kind of call) is off by far more.
    assert flops["total"] <= xla <= 1.1 * flops["total"]


def test_conv_flops_restated():
    """2 * out elements * Cin * kh * kw for one 3x3 convolution (restated by hand)."""
    import flax.linen as nn

    conv = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
    x = jnp.zeros((2, 5, 6, 4))
    p = conv.init(jax.random.PRNGKey(0), x)["params"]
    (call,) = [c for c in P.record_calls(conv, p, x) if c.kind == "conv"]
    assert P.call_flops(call) == 2 * (2 * 5 * 6 * 8) * 4 * 3 * 3


def test_profile_section_and_report(unets):
    cfg, ours, params, theirs, _ = unets
    out = P.profile_section(ours, params, theirs, LATENT, cfg["cross_attention_dim"], repeats=1, log=lambda *a: None)
    for side in ("ours", "torch"):
        row = out[side]
        assert all(row[f"{k}_s"] > 0 for k in P.KINDS), row
        assert row["rest_s"] == pytest.approx(row["step_s"] - sum(row[f"{k}_s"] for k in P.KINDS))
        assert 0 < row["fraction_of_peak"] and row["gflops"] > 0
    assert out["peak"]["peak_gflops"] == max(out["peak"]["jax_gflops"], out["peak"]["torch_gflops"])
    text = "\n".join(report.profile_table({"profile": {"tiny": out}}))
    for label in ("convolutions", "self-attention", "cross-attention", "group norms", "the rest", "of the peak"):
        assert label in text
    assert np.isfinite(out["ours"]["xla_flops"])
    assert set(out["attention"]) == {"self_attention", "cross_attention"}
    assert all(a[k] > 0 for a in out["attention"].values() for k in ("chunked", "xla", "dense", "torch_sdpa"))
    assert "PyTorch SDPA" in text
