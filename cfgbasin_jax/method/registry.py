"""One registry of the method names and their paper defaults, shared by ``cfgbasin-generate``, the
demo and the benchmark.

    methods.get("og-dtp")                      # also "OG+DTP", "og_dtp"
    methods.guidance("stp")                    # static_transition(500, 0.0, 7.5)
    methods.guidance("og-stp", scale=4.0)      # the paper's -2.0 above t=650, then 4.0

Parameters of :meth:`Method.guidance` (missing ones take the method's defaults):
  scale   the CFG scale (constant CFG) or the scale from the transition on
  before  the scale before the transition (0: no guidance, 1: conditional only, < 0: opposite)
  t       static rules: the transition timestep
  mode    OG+DTP: "exact" (two passes, the official rule) or "causal" (one pass)
  shape_before, shape_after, precision, fallback: passed to the guidance builder
  threshold, gate_steps, pre_scale   gated methods (detect, then mitigate; ``guidance.gated``): the
          score threshold (no paper default: give it or calibrate it on plain prompts,
          ``pipeline.calibrate_threshold``), the score's steps, the scale before the flag
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Callable, Mapping

from cfgbasin_jax.method import guidance as G


@dataclasses.dataclass(frozen=True)
class Method:
    """A named method: ``name`` (the CLI spelling), ``label`` (tables), its paper defaults and the
    guidance builder. ``baseline``: an inference-time baseline sampled with constant CFG;
    ``cli``: selectable with ``cfgbasin-generate --method`` (CADS and prompt augmentation are flags)."""

    name: str
    label: str
    summary: str
    defaults: Mapping
    build: Callable[..., G.Guidance]
    aliases: tuple = ()
    baseline: bool = False
    cli: bool = True

    def guidance(self, **params) -> G.Guidance:
        """The method's :class:`~cfgbasin_jax.method.guidance.Guidance`; ``None`` values keep the defaults."""
        params = {k: v for k, v in params.items() if v is not None}
        unknown = set(params) - set(self.defaults) - {"shape_before", "shape_after", "precision", "fallback"}
        if unknown:
            raise ValueError(f"methods: {self.name} takes {', '.join(sorted(self.defaults))}, not {', '.join(sorted(unknown))}")
        return self.build(**{**self.defaults, **params})


def _constant(scale, **_shapes):
    return G.constant(scale)


def _static(t, before, scale, **kw):
    return G.static_transition(t, before, scale, **kw)


def _noise_diff(before, scale, **kw):
    return G.dynamic_transition(before, scale, signal="noise_diff", **kw)


def _latent_cosine(before, scale, mode, **kw):
    return G.dynamic_transition(before, scale, signal="latent_cosine", mode=mode, **kw)


_CFG = MappingProxyType({"scale": 7.5})
_GATE = {"threshold": None, "gate_steps": 1, "pre_scale": None}


def _gated_of(base: Method) -> Method:
    """``gated-<base>``: flagged samples follow ``base``, the others constant CFG (``guidance.gated``)."""

    def build(threshold, gate_steps, pre_scale, **kw):
        return G.gated(base.build(**kw), threshold, steps=gate_steps, pre_scale=pre_scale)

    return Method(f"gated-{base.name}", f"gated {base.label}",
                  f"{base.label} for samples whose ||eps_c - eps_u|| at the first step(s) exceeds a threshold, "
                  "CFG for the rest", MappingProxyType({**base.defaults, **_GATE}), build)


_TRANSITIONS = (
    Method("stp", "STP", "no guidance while t > 500, then CFG (static transition point)",
           MappingProxyType({"t": 500, "before": 0.0, "scale": 7.5}), _static),
    Method("og-stp", "OG+STP", "opposite guidance -2.0 while t > 650, then CFG",
           MappingProxyType({"t": 650, "before": -2.0, "scale": 7.5}), _static),
    Method("dtp", "DTP", "conditional only (1.0) until the first minimum of ||eps_c - eps_u||, then CFG",
           MappingProxyType({"before": 1.0, "scale": 7.5}), _noise_diff),
    Method("og-dtp", "OG+DTP", "opposite guidance until the first minimum of the latents' cosine distance, then CFG",
           MappingProxyType({"before": -7.5, "scale": 7.5, "mode": "exact"}), _latent_cosine),
)

_ALL = (
    Method("cfg", "CFG", "ordinary classifier-free guidance at every step", _CFG, _constant, ("constant",)),
    *_TRANSITIONS,
    *(_gated_of(m) for m in _TRANSITIONS),
    Method("wen", "Wen", "Wen et al.: optimise the prompt embedding at the first step, then CFG", _CFG, _constant,
           ("wen et al.",), baseline=True),
    Method("cads", "CADS", "condition-annealed noise on the conditional embedding, CFG", _CFG, _constant,
           baseline=True, cli=False),
    Method("prompt-augmentation", "Aug", "random word repetitions in the prompt (rand_word_repeat), CFG", _CFG,
           _constant, ("aug", "prompt-aug"), baseline=True, cli=False),
)

METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in _ALL})


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-").replace("+", "-")


_LOOKUP = {_key(spelling): m for m in _ALL for spelling in (m.name, m.label, *m.aliases)}


def get(name: str) -> Method:
    """The method called ``name`` in any of our spellings ("og-dtp", "OG+DTP", "og_dtp")."""
    method = _LOOKUP.get(_key(name))
    if method is None:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return method


def names(baselines: bool = True, cli_only: bool = False) -> tuple:
    """Canonical method names, in registry order."""
    return tuple(m.name for m in _ALL if (baselines or not m.baseline) and (m.cli or not cli_only))


def guidance(name: str, **params) -> G.Guidance:
    """``get(name).guidance(**params)``."""
    return get(name).guidance(**params)


__all__ = ["METHODS", "Method", "get", "guidance", "names"]
