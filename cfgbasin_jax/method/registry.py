"""The one registry of method names: everything a name turns into is here, and nowhere else.

    methods.get("og-dtp")                      # also "OG+DTP", "og_dtp"; gated: "gated-og-dtp"
    methods.guidance("stp")                    # static_transition(500, 0.0, 7.5)
    methods.guidance("og-stp", scale=4.0)      # the paper's -2.0 above t=650, then 4.0
    methods.TOY_DEMO.guidance(methods.OG_DTP)  # a named preset's values (not the paper's)

A :class:`Method` carries its names (``name``, ``aliases``, the table ``label``), its paper defaults
(``defaults``, one value each), its guidance builder, its gated variant (``gated``/``base``), its
inference-time baseline (``hook``: a :class:`Hook` that :func:`cfgbasin_jax.baselines.sample` applies),
what its images are named by (``file_tag``), and how the paper scripts' flags set it (``script``: a
:class:`ScriptFlags`; the flags it reads, those it ignores, the reference script's defaults).

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
import math
from types import MappingProxyType
from typing import Callable, Mapping

from cfgbasin_jax.method import guidance as G

CFG_SCALE = G.CFG_SCALE  # the paper's CFG scale (every method's scale from the transition on)
_SHAPE_PARAMS = ("shape_before", "shape_after", "precision", "fallback")
# The paper scripts' guidance flags (cfgbasin-generate); a method reads some and ignores the rest.
GUIDANCE_FLAGS = ("guidance_scale", "guidance_scale_later", "guidance_change_step", "CFG_scheduling",
                  "CFG_scheduling_later", "og_mode", "og_precision")
GATE_FLAGS = ("gate_threshold", "gate_calibrate", "gate_fpr", "gate_steps", "gate_pre_scale")


@dataclasses.dataclass(frozen=True)
class Hook:
    """An inference-time baseline around ``Pipeline.generate`` (:func:`cfgbasin_jax.baselines.sample`):
    ``wen`` optimises the prompt embedding at the first step (Wen et al.), ``cads`` adds condition-annealed
    noise to the conditional embedding, ``augmentation`` (a kind of ``baselines.AUGMENTATIONS``) inserts
    ``repeat_num`` random words into each prompt. Every baseline samples with constant CFG."""

    wen: bool = False
    cads: bool = False
    augmentation: str | None = None
    repeat_num: int = 4

    def options(self) -> dict:
        """The prompt and conditioning options as a run records them ({} when there are none)."""
        return {"prompt_augmentation": self.augmentation, "cads": self.cads} if self.augmentation or self.cads else {}


NO_HOOK = Hook()


@dataclasses.dataclass(frozen=True)
class ScriptFlags:
    """How the paper scripts' flags (``cfgbasin-generate``) set a method.

    reads: the guidance flags it uses (the other :data:`GUIDANCE_FLAGS` and :data:`GATE_FLAGS` are
    ignored, with a warning). defaults: {flag: the reference script's default}. params: flag values ->
    :meth:`Method.guidance` parameters. preset: the run preset of its script (``cfgbasin_jax.runs.config``).
    """

    reads: tuple
    defaults: Mapping
    params: Callable[[Mapping], dict]
    preset: str

    def ignored(self) -> tuple:
        return tuple(f for f in GUIDANCE_FLAGS + GATE_FLAGS if f not in self.reads)


@dataclasses.dataclass(frozen=True)
class Method:
    """A named method (see the module docstring). ``opposite``: its ``before`` is an opposite-guidance
    scale; ``sign_twins``: (name when ``before >= 0``, name when ``before < 0``), the name a run records
    (STP with a negative scale is OG+STP); ``records``: per-image signals a run stores beside the noise
    difference; ``cli``: selectable with ``cfgbasin-generate --method``."""

    name: str
    label: str
    summary: str
    defaults: Mapping
    build: Callable[..., G.Guidance]
    aliases: tuple = ()
    hook: Hook | None = None
    file_tag: str | None = None  # image names: None Images/{i}.png, "t" {i}_{timestep}, "index" {i}_{step}
    opposite: bool = False
    sign_twins: tuple | None = None
    records: tuple = ()
    script: ScriptFlags | None = None
    cli: bool = True
    base_name: str | None = None  # gated methods: the method they mitigate with

    @property
    def baseline(self) -> bool:
        return self.hook is not None

    @property
    def is_gated(self) -> bool:
        return self.base_name is not None

    @property
    def base(self) -> "Method":
        """The method a gated method mitigates with (itself when not gated)."""
        return METHODS[self.base_name] if self.is_gated else self

    @property
    def gated(self) -> "Method | None":
        """``gated-<this>``, or None when it cannot be gated."""
        return _GATED_OF.get(self.name)

    def guidance(self, **params) -> G.Guidance:
        """The method's :class:`~cfgbasin_jax.method.guidance.Guidance`; ``None`` values keep the defaults."""
        params = {k: v for k, v in params.items() if v is not None}
        unknown = set(params) - set(self.defaults) - set(_SHAPE_PARAMS)
        if unknown:
            raise ValueError(f"methods: {self.name} takes {', '.join(sorted(self.defaults))}, not {', '.join(sorted(unknown))}")
        return self.build(**{**self.defaults, **params})

    def recorded_name(self, before) -> str:
        """The method name a run records for scale ``before`` (see ``sign_twins``)."""
        if self.sign_twins is None:
            return self.name
        twin = METHODS[self.sign_twins[1] if before < 0 else self.sign_twins[0]]
        return twin.gated.name if self.is_gated else twin.name

    def image_tag(self, index: int, t: int) -> int | None:
        """What an image's file name carries besides its index (``file_tag``): the transition timestep
        ``t``, the transition step ``index``, or nothing."""
        return {"t": int(t), "index": int(index)}.get(self.file_tag)

    def from_flags(self, flags: Mapping) -> G.Guidance:
        """The guidance the paper scripts' ``flags`` ({flag: value}, None = the script's default) ask
        for. A ValueError names the flag that caused it: ``FlagError``."""
        flags = {**self.script.defaults, **{k: v for k, v in flags.items() if v is not None}}
        params = self.script.params(flags)
        try:
            return self.guidance(**params)
        except ValueError as err:
            for flag in self.script.reads:  # the first flag that fails on its own (the others at their defaults)
                alone = self.script.params({**self.script.defaults, flag: flags.get(flag)})
                try:
                    self.guidance(**alone)
                except ValueError:
                    raise FlagError(flag, flags.get(flag), err) from None
            raise FlagError(None, None, err) from None


class FlagError(ValueError):
    """A flag's value the method refuses: ``flag`` (None: the combination), its value, the reason."""

    def __init__(self, flag, value, reason):
        self.flag, self.value, self.reason = flag, value, str(reason)
        super().__init__(self.reason if flag is None else f"--{flag} {_show(value)}: {self.reason}")


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------- builders


def _constant(scale, shape_before="static", shape_after="static", **_):
    if shape_before == "static" and shape_after == "static":
        return G.constant(scale)
    return G.static_transition(0, scale, scale, shape_before, shape_after)


def _static(t, before, scale, **kw):
    return G.static_transition(t, before, scale, **kw)


def _noise_diff(before, scale, **kw):
    return G.dynamic_transition(before, scale, signal="noise_diff", **kw)


def _latent_cosine(before, scale, mode, **kw):
    return G.dynamic_transition(before, scale, signal="latent_cosine", mode=mode, **kw)


def _timestep_flag(value) -> int:
    """--guidance_change_step (a float there): timesteps are whole numbers, so "t > step" and
    "t <= step" hold exactly as for floor(step)."""
    if not math.isfinite(value):
        raise FlagError("guidance_change_step", value, "guidance: transition timestep t must be finite")
    return math.floor(value)


def _shapes(f) -> dict:
    return {"shape_before": f["CFG_scheduling"], "shape_after": f["CFG_scheduling_later"]}


_SHAPE_FLAGS = ("CFG_scheduling", "CFG_scheduling_later")
_SHAPE_DEFAULTS = {"CFG_scheduling": "static", "CFG_scheduling_later": "static"}
_CONSTANT_FLAGS = ScriptFlags(
    ("guidance_scale", "CFG_scheduling"), MappingProxyType({**_SHAPE_DEFAULTS, "guidance_scale": CFG_SCALE}),
    lambda f: {"scale": f["guidance_scale"], "shape_before": f["CFG_scheduling"], "shape_after": f["CFG_scheduling"]},
    "laion10k")


def _static_flags(before: float, t: float) -> ScriptFlags:
    return ScriptFlags(
        ("guidance_scale", "guidance_scale_later", "guidance_change_step", *_SHAPE_FLAGS),
        MappingProxyType({**_SHAPE_DEFAULTS, "guidance_scale": before, "guidance_scale_later": CFG_SCALE,
                          "guidance_change_step": t}),
        lambda f: {"t": _timestep_flag(f["guidance_change_step"]), "before": f["guidance_scale"],
                   "scale": f["guidance_scale_later"], **_shapes(f)},
        "laion10k")


def _og_dtp_params(f) -> dict:
    before = -abs(f["guidance_scale"])
    after = f.get("guidance_scale_later")
    return {"before": before, "scale": abs(f["guidance_scale"]) if after is None else after,
            "mode": f.get("og_mode") or "exact", "precision": f.get("og_precision") or "stable", **_shapes(f)}


_CFG = MappingProxyType({"scale": CFG_SCALE})
_STP = MappingProxyType({"t": 500, "before": 0.0, "scale": CFG_SCALE})
_OG_STP = MappingProxyType({"t": 650, "before": -2.0, "scale": CFG_SCALE})
_DTP = MappingProxyType({"before": 1.0, "scale": CFG_SCALE})
_OG_DTP = MappingProxyType({"before": -7.5, "scale": CFG_SCALE, "mode": "exact"})
_GATE = {"threshold": None, "gate_steps": 1, "pre_scale": None}

CFG = Method("cfg", "CFG", "ordinary classifier-free guidance at every step", _CFG, _constant, ("constant",),
             script=_CONSTANT_FLAGS)
# The STP script's own argparse defaults: --guidance_scale 7.5, --guidance_change_step 0 (CFG from the
# first step); the paper's STP (0 above t=500) is the README's command, and the registry default.
STP = Method("stp", "STP", "no guidance while t > 500, then CFG (static transition point)", _STP, _static,
             sign_twins=("stp", "og-stp"), script=_static_flags(CFG_SCALE, 0.0))
OG_STP = Method("og-stp", "OG+STP", "opposite guidance -2.0 while t > 650, then CFG", _OG_STP, _static,
                opposite=True, sign_twins=("stp", "og-stp"), script=_static_flags(_OG_STP["before"], float(_OG_STP["t"])))
DTP = Method("dtp", "DTP", "conditional only (1.0) until the first minimum of ||eps_c - eps_u||, then CFG", _DTP,
             _noise_diff, file_tag="t", script=ScriptFlags(
                 ("guidance_scale", "guidance_scale_later", *_SHAPE_FLAGS),
                 MappingProxyType({**_SHAPE_DEFAULTS, "guidance_scale": _DTP["before"], "guidance_scale_later": CFG_SCALE}),
                 lambda f: {"before": f["guidance_scale"], "scale": f["guidance_scale_later"], **_shapes(f)},
                 "sdv1_pretrained"))
OG_DTP = Method("og-dtp", "OG+DTP", "opposite guidance until the first minimum of the latents' cosine distance, then CFG",
                _OG_DTP, _latent_cosine, file_tag="index", opposite=True, records=("latent_cosine",),
                script=ScriptFlags(
                    ("guidance_scale", "guidance_scale_later", *_SHAPE_FLAGS, "og_mode", "og_precision"),
                    MappingProxyType({**_SHAPE_DEFAULTS, "guidance_scale": abs(_OG_DTP["before"])}),
                    _og_dtp_params, "sdv1_pretrained"))
_TRANSITIONS = (STP, OG_STP, DTP, OG_DTP)


def _gated_of(base: Method) -> Method:
    """``gated-<base>``: flagged samples follow ``base``, the others constant CFG (``guidance.gated``)."""

    def build(threshold, gate_steps, pre_scale, **kw):
        return G.gated(base.build(**kw), threshold, steps=gate_steps, pre_scale=pre_scale)

    def params(f):
        return {**base.script.params(f), "threshold": f.get("gate_threshold"), "gate_steps": f.get("gate_steps"),
                "pre_scale": f.get("gate_pre_scale")}

    script = ScriptFlags(base.script.reads + GATE_FLAGS, base.script.defaults, params, base.script.preset)
    return dataclasses.replace(
        base, name=f"gated-{base.name}", label=f"gated {base.label}", aliases=(),
        summary=f"{base.label} for samples whose ||eps_c - eps_u|| at the first step(s) exceeds a threshold, CFG for the rest",
        defaults=MappingProxyType({**base.defaults, **_GATE}), build=build, script=script, base_name=base.name)


_GATED = tuple(_gated_of(m) for m in _TRANSITIONS)
WEN = Method("wen", "Wen", "Wen et al.: optimise the prompt embedding at the first step, then CFG", _CFG, _constant,
             ("wen et al.",), hook=Hook(wen=True), script=_CONSTANT_FLAGS)
CADS = Method("cads", "CADS", "condition-annealed noise on the conditional embedding, CFG", _CFG, _constant,
              hook=Hook(cads=True), cli=False)
AUG = Method("prompt-augmentation", "Aug", "random word repetitions in the prompt (rand_word_repeat), CFG", _CFG,
             _constant, ("aug", "prompt-aug"), hook=Hook(augmentation="rand_word_repeat"), cli=False)
_ALL = (CFG, *_TRANSITIONS, *_GATED, WEN, CADS, AUG)

METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in _ALL})
_GATED_OF = MappingProxyType({m.base_name: m for m in _GATED})


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-").replace("+", "-")


_LOOKUP = {_key(spelling): m for m in _ALL for spelling in (m.name, m.label, *m.aliases)}


def get(name) -> Method:
    """The method called ``name`` in any of our spellings ("og-dtp", "OG+DTP", "og_dtp"); a Method
    is returned as it is."""
    if isinstance(name, Method):
        return name
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


# ------------------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    """Values other than the paper's, stated by name: ``scale`` (every method's CFG scale),
    ``opposite_before`` (the opposite-guidance methods' scale before the transition), ``methods`` (the
    methods it runs, registry names); ``None`` keeps the paper default."""

    name: str
    description: str
    scale: float | None = None
    opposite_before: float | None = None
    methods: tuple = ()

    def guidance(self, method, t=None, opposite_t=None, scale=None, opposite_before=None, **gate) -> G.Guidance:
        """``method``'s guidance under this preset: ``t`` sets the static rule's transition timestep,
        ``opposite_t`` that of the opposite-guidance static rule; ``gate`` (threshold, gate_steps,
        pre_scale) applies to gated methods only. Explicit ``scale`` / ``opposite_before`` override."""
        m = get(method)
        params = {"scale": self.scale if scale is None else scale}
        if m.opposite:
            params["before"] = self.opposite_before if opposite_before is None else opposite_before
        if "t" in m.defaults:
            params["t"] = opposite_t if m.opposite else t
        if m.is_gated:
            params.update(gate)
        return m.guidance(**params)


# The toy demo (cfgbasin-demo): CFG 4.0 suits the 16 px pixel model; opposite guidance -2.0 (OG+DTP too).
TOY_DEMO = Preset("toy-demo", "cfgbasin-demo on the shipped toy model", scale=4.0, opposite_before=-2.0)
# The benchmark (python -m bench): the paper's CFG 7.5; OG+DTP at -2.0 instead of the official -7.5.
BENCH = Preset("bench", "python -m bench's method table", scale=CFG_SCALE, opposite_before=-2.0,
               methods=("cfg", "stp", "dtp", "og-dtp"))
PRESETS = MappingProxyType({p.name: p for p in (TOY_DEMO, BENCH)})

__all__ = ["AUG", "BENCH", "CADS", "CFG", "CFG_SCALE", "DTP", "FlagError", "Hook", "METHODS", "Method", "OG_DTP",
           "OG_STP", "PRESETS", "Preset", "STP", "ScriptFlags", "TOY_DEMO", "WEN", "get", "guidance", "names"]
