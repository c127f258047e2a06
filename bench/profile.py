"""Where one UNet step's time goes, and how close each side is to the machine's peak.

One classifier-free-guidance step = one UNet call on a batch of 2 (the unconditional and the
conditional half). Its time is split into four kinds of block and the rest:

  conv             every 2-D convolution (resnets, up/downsamplers, conv_in/out, 1x1 projections)
  self_attention   each transformer block's attn1 (projections, scores, softmax, output projection)
  cross_attention  attn2, over the 77 text tokens
  group_norm       every GroupNorm
  rest             the whole step minus the four (layer norms, feed-forwards, activations, adds,
                   the time embedding); negative where the whole program fuses across blocks

Ours: per-block compiled timings. The UNet is traced once with :func:`flax.linen.intercept_methods`
recording every call of those modules (input shapes, output shapes, parameters' path); each distinct
(module, shapes) pair is compiled alone and timed, then multiplied by how often the UNet calls it.
Fusion across block boundaries (GroupNorm + SiLU into the next convolution's input) is not seen
there; the whole step is timed as one program beside them.

PyTorch: :mod:`torch.profiler` over whole forward calls, with a ``record_function`` range opened
around each such module by forward hooks; each kind's time is the inclusive CPU time of its ranges.

FLOPs are counted from the same recorded calls, 2 per multiply-add: convolutions
(2 * out elements * Cin * kh * kw), dense layers (2 * out elements * in features) and the two
attention products (2 * 2 * B * heads * Sq * Sk * head dim); biases, norms, softmax and activations
are not counted (they are well under 1%). A convolution counts as a direct one also where it runs
by Winograd's algorithm (fewer multiplications, :mod:`cfgbasin_jax.models.conv`): the rates are
direct-equivalent work per second. XLA's own count (``cost_analysis``) is given beside it.
The machine's peak is the best of a large float32 matmul in JAX and in PyTorch, in the same run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from bench import measure

KINDS = ("conv", "self_attention", "cross_attention", "group_norm")
PEAK_MATMUL_N = 2048


@dataclasses.dataclass
class Call:
    """One recorded module call: kind ('conv', 'dense', 'self_attention', ...), the unbound module,
    the path of its parameters, its array inputs' and output's shapes, its non-array arguments."""

    kind: str
    module: object
    path: tuple
    inputs: tuple  # ShapeDtypeStruct or None (a non-array argument, kept in `static`)
    static: tuple
    kwargs: dict
    out_shape: tuple


def _kind(module, args, kwargs) -> str | None:
    import flax.linen as nn

    from cfgbasin_jax.models.conv import Conv2d
    from cfgbasin_jax.models.unet import Attention

    if isinstance(module, (nn.Conv, Conv2d)):
        return "conv"
    if isinstance(module, nn.GroupNorm):
        return "group_norm"
    if isinstance(module, nn.Dense):
        return "dense"
    if isinstance(module, Attention):
        context = args[1] if len(args) > 1 else kwargs.get("context")
        return "self_attention" if context is None else "cross_attention"
    return None


def _spec(a):
    import jax

    return jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") and hasattr(a, "dtype") else None


def record_calls(module, params, *inputs, **kwargs) -> list[Call]:
    """Every conv, dense, attention and group-norm call of ``module.apply({'params': params}, *inputs,
    **kwargs)`` (traced abstractly: nothing is computed)."""
    import flax.linen as nn
    import jax

    calls = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        kind = _kind(context.module, args, kwargs) if context.method_name == "__call__" else None
        if kind:
            specs = tuple(_spec(a) for a in args)
            calls.append(Call(kind, context.module.clone(parent=None), tuple(context.module.scope.path), specs,
                              tuple(None if s is not None else a for a, s in zip(args, specs)),
                              dict(kwargs), tuple(out.shape)))
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda p, *xs: module.apply({"params": p}, *xs, **kwargs), params, *inputs)
    return calls


def attention_shape(call: Call) -> tuple:
    """(batch, queries, keys, heads, head dim) of a recorded self- or cross-attention call."""
    x = call.inputs[0]
    context = call.inputs[1] if len(call.inputs) > 1 and call.inputs[1] is not None else x
    return x.shape[0], x.shape[1], context.shape[1], call.module.heads, call.module.dim_head


def call_flops(call: Call) -> int:
    """Multiply-add FLOPs of one recorded call (2 per multiply-add; biases and elementwise work excluded)."""
    out = math.prod(call.out_shape)
    if call.kind == "conv":
        cin = call.inputs[0].shape[-1]
        groups = getattr(call.module, "feature_group_count", 1)  # flax's Conv has groups; our Conv2d has none
        return 2 * out * cin * math.prod(call.module.kernel_size) // groups
    if call.kind == "dense":
        return 2 * out * call.inputs[0].shape[-1]
    if call.kind.endswith("attention"):
        return 2 * 2 * math.prod(attention_shape(call))
    return 0


def count_flops(calls: list[Call]) -> dict:
    """{'total': FLOPs of the whole recorded program, 'conv', 'dense', 'attention_products'}."""
    by = {"conv": 0, "dense": 0, "attention_products": 0}
    for c in calls:
        key = "attention_products" if c.kind.endswith("attention") else c.kind
        if key in by:
            by[key] += call_flops(c)
    return {"total": sum(by.values()), **by}


def _subtree(params, path):
    for name in path:
        params = params[name]
    return params


def _signature(call: Call) -> tuple:
    fields = tuple((f.name, repr(getattr(call.module, f.name))) for f in dataclasses.fields(call.module)
                   if f.name not in ("parent", "name"))
    shapes = tuple(None if s is None else (s.shape, str(s.dtype)) for s in call.inputs)
    return (call.kind, type(call.module).__name__, fields, shapes, repr(call.static), repr(sorted(call.kwargs.items())))


def median_seconds(fn: Callable, args: tuple, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` over ``repeats`` calls after one warm-up call (JAX results
    blocked on, as by :func:`bench.measure.timed`; PyTorch's CPU calls are synchronous)."""
    measure.timed(lambda: fn(*args))
    return float(np.median([measure.timed(lambda: fn(*args))[0] for _ in range(repeats)]))


def ours_breakdown(unet, params, inputs: tuple, calls: list[Call], repeats: int = 3, log=print) -> dict:
    """Per-kind seconds of one UNet call (see the module docstring), the whole step's seconds, the
    number of distinct blocks compiled, and the FLOP counts (ours and XLA's). ``calls``: the call's
    :func:`record_calls`."""
    import jax
    import jax.numpy as jnp

    groups: dict = {}
    for c in calls:
        if c.kind in KINDS:
            groups.setdefault(_signature(c), []).append(c)
    rng = np.random.default_rng(0)
    seconds = dict.fromkeys(KINDS, 0.0)
    log(f"  profile (ours): {len(groups)} distinct blocks of {sum(map(len, groups.values()))} calls")
    for members in groups.values():
        c = members[0]
        module, static, kwargs = c.module, c.static, c.kwargs

        def block(p, *arrays, module=module, static=static, kwargs=kwargs):
            it = iter(arrays)
            args = [next(it) if s is None else s for s in static]
            return module.apply({"params": p}, *args, **kwargs)

        arrays = tuple(jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)) for s in c.inputs if s is not None)
        seconds[c.kind] += len(members) * median_seconds(jax.jit(block), (_subtree(params, c.path), *arrays), repeats)
    whole = jax.jit(lambda p, *xs: unet.apply({"params": p}, *xs, return_dict=False))
    compiled = whole.lower(params, *inputs).compile()
    step_s = median_seconds(compiled, (params, *inputs), repeats)
    try:
        xla_flops = float(_cost(compiled).get("flops", float("nan")))
    except Exception:  # cost analysis not offered by this backend
        xla_flops = float("nan")
    flops = count_flops(calls)
    return {"step_s": step_s, **{f"{k}_s": v for k, v in seconds.items()}, "rest_s": step_s - sum(seconds.values()),
            "distinct_blocks": len(groups), "calls": {k: sum(c.kind == k for c in calls) for k in KINDS},
            "flops": flops, "xla_flops": xla_flops}


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def torch_kind(module) -> str | None:
    """The kind of a PyTorch diffusers module (None: not one of KINDS)."""
    import torch
    from diffusers.models.attention_processor import Attention

    if isinstance(module, torch.nn.Conv2d):
        return "conv"
    if isinstance(module, torch.nn.GroupNorm):
        return "group_norm"
    if isinstance(module, Attention):
        return "cross_attention" if module.is_cross_attention else "self_attention"
    return None


def torch_breakdown(unet, inputs: tuple, repeats: int = 3) -> dict:
    """Per-kind seconds of one PyTorch UNet call from torch.profiler (inclusive CPU time of the
    ranges opened around each module by forward hooks), and the whole call's seconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    open_ranges, handles = [], []

    def pre(kind):
        def hook(module, args):
            r = record_function(f"cfgbasin_profile::{kind}")
            r.__enter__()
            open_ranges.append(r)
        return hook

    def post(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    for module in unet.modules():
        kind = torch_kind(module)
        if kind:
            handles += [module.register_forward_pre_hook(pre(kind)), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            plain = median_seconds(unet, inputs, repeats)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(repeats):
                    with record_function("cfgbasin_profile::step"):
                        unet(*inputs)
    finally:
        for h in handles:
            h.remove()
    totals = {e.key.split("::", 1)[1]: e.cpu_time_total / 1e6 / repeats for e in prof.key_averages()
              if e.key.startswith("cfgbasin_profile::")}
    step_s = totals.get("step", float("nan"))
    seconds = {k: totals.get(k, 0.0) for k in KINDS}
    return {"step_s": step_s, "unprofiled_step_s": plain, **{f"{k}_s": v for k, v in seconds.items()},
            "rest_s": step_s - sum(seconds.values())}


def peak_matmul(n: int = PEAK_MATMUL_N, repeats: int = 5) -> dict:
    """GFLOP/s of an n x n float32 matmul in JAX and in PyTorch, and their best (the measured peak)."""
    import jax
    import jax.numpy as jnp
    import torch

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    flops = 2 * n**3
    x = jnp.asarray(a)
    jax_s = median_seconds(jax.jit(jnp.dot), (x, x), repeats)
    t = torch.from_numpy(a)
    torch_s = median_seconds(torch.mm, (t, t), repeats)
    out = {"n": n, "jax_gflops": flops / jax_s / 1e9, "torch_gflops": flops / torch_s / 1e9}
    out["peak_gflops"] = max(out["jax_gflops"], out["torch_gflops"])
    return out


def attention_implementations(batch: int, tokens: int, heads: int, dim: int, keys: int | None = None,
                              repeats: int = 3) -> dict:
    """Seconds of the attention product alone (q [B,S,H,D], ``keys`` keys; default: self-attention)
    with each of our implementations and with PyTorch's scaled_dot_product_attention."""
    import jax
    import torch

    from cfgbasin_jax.models import attention as A

    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, tokens, heads, dim)).astype(np.float32)
    kv = rng.standard_normal((batch, keys or tokens, heads, dim)).astype(np.float32)
    out = {"shape": [batch, tokens, keys or tokens, heads, dim]}
    for impl in ("chunked", "xla", "dense"):
        fn = jax.jit(lambda q, k, v, impl=impl: A.attend(q, k, v, impl))
        out[impl] = median_seconds(fn, (q, kv, kv), repeats)
    tq, tk = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in (q, kv))
    with torch.no_grad():
        out["torch_sdpa"] = median_seconds(torch.nn.functional.scaled_dot_product_attention, (tq, tk, tk), repeats)
    return out


def profile_section(unet, params, torch_unet, latent: int, context_dim: int, repeats: int = 3, log=print) -> dict:
    """Both breakdowns of one CFG step (batch 2, ``latent`` x ``latent``, 77 text tokens), the FLOPs
    and the fraction of the measured peak each side reaches."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, unet.in_channels, latent, latent)).astype(np.float32)
    t = np.array([500, 500], np.int32)
    ctx = rng.standard_normal((2, 77, context_dim)).astype(np.float32)
    log("  profile: ours")
    calls = record_calls(unet, params, x, t, ctx, return_dict=False)
    ours = ours_breakdown(unet, params, (x, t, ctx), calls, repeats, log=log)
    log("  profile: PyTorch")
    theirs = torch_breakdown(torch_unet, (torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(ctx)),
                             repeats)
    log("  profile: peak matmul, attention implementations")
    peak = peak_matmul()
    biggest = {}  # the largest self- and cross-attention product: (queries * keys, (B, Sq, Sk, H, D))
    for c in calls:
        if c.kind.endswith("attention"):
            b, sq, sk, heads, dim = attention_shape(c)
            biggest[c.kind] = max(biggest.get(c.kind, (0, None)), (sq * sk, (b, sq, heads, dim, sk)), key=lambda e: e[0])
    attention = {kind: attention_implementations(*spec, repeats=repeats) for kind, (_, spec) in biggest.items()}
    for row, step in ((ours, ours["step_s"]), (theirs, theirs["unprofiled_step_s"])):
        gflops = ours["flops"]["total"] / step / 1e9
        row.update(gflops=gflops, fraction_of_peak=gflops / peak["peak_gflops"])
    return {"batch": 2, "latent": latent, "ours": ours, "torch": theirs, "peak": peak, "attention": attention,
            "repeats": repeats}
