"""Markdown and JSON output of a benchmark run."""

from __future__ import annotations

import json
from pathlib import Path

from bench import measure
from bench import runners as R

TARGETS = {"percall": 1.10, "overhead": 0.03, "stp_work": 0.80, "dtp_b8": 3.0}
SHORT = {"ours": "(a) ours", "torch_loop": "(b) PyTorch loop", "torch_pipe": "(c) diffusers PyTorch",
         "flax_pipe": "(d) diffusers Flax", "flax_loop": "Flax loop (our model)"}


def _f(value, fmt="{:.3g}", none="-"):
    return none if value is None else fmt.format(value)


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _size_line(size: dict) -> str:
    return (f"`{size['name']}`: {size['description']}; UNet {size['unet_params_m']:.2f}M parameters; "
            f"UNet parity with PyTorch {size['parity']:.1e} (max abs err / max abs)")


def main_table(result: dict) -> list:
    lines = []
    for name, tab in result.get("table", {}).items():
        size = result["sizes"][name]
        lines += ["", f"#### {_size_line(size)}", "",
                  f"{tab['steps']} DDIM steps; batched runners at batch {tab['batch']}, loops batch 1 "
                  f"({tab['loop_images']} images per round); medians of {result['args']['repeats']} interleaved rounds.", ""]
        rows = []
        on_device = any(v is not None for runs in tab["methods"].values() for row in runs.values()
                        for v in row.get("device_peak_mb", {}).values())
        for method, runs in tab["methods"].items():
            for runner, row in runs.items():
                device = row.get("device_peak_mb", {}).get("torch" if runner.startswith("torch") else "jax")
                rows.append([
                    R.METHOD_LABELS[method] if runner == next(iter(runs)) else "", SHORT[runner],
                    row["n_images"] if runner not in R.LOOPS else 1, _f(row["images_per_s"]),
                    _f(row["ratio_vs_anchor"], "{:.2f}x"), _f(row["unet_evals_per_image"], "{:.0f}"),
                    _f(row["compile_s"] if runner in ("ours", "flax_pipe", "flax_loop") else None, "{:.1f}"),
                    _f(row.get("recompiles_sweep"), "{}", "0 (eager)" if runner.startswith("torch") else "-"),
                    _f(row["peak_rss_mb"], "{:.0f}"), _f(row.get("max_pixel_diff_vs_anchor"), "{}"),
                ] + ([_f(device, "{:.0f}")] if on_device else []))
            for runner, note in tab.get("skipped", {}).items():
                if method in R.RUNNER_METHODS[runner]:
                    rows.append(["", SHORT[runner], "-", note] + ["-"] * (6 + on_device))
        lines += _table(["method", "runner", "batch", "images/s", "vs (b)", "UNet evals/image", "compile s",
                         "recompiles, 10-point t sweep", "peak RSS +MB", "max abs pixel diff vs (b)"]
                        + (["device peak MB"] if on_device else []), rows)
    return lines


def percall_table(result: dict) -> list:
    if "percall" not in result:
        return []
    rows, skipped = [], {}
    for mode, run in result["percall"].items():
        skipped.update(run.get("skipped", {}))
        for r in run["results"]:
            s, ratio = r["seconds"], r["ratio_vs_torch"]
            rows.append([r["config"], f"{r['unet_params_m']:.2f}M", mode.replace("_", " "),
                         "x".join(str(v) for v in r["shape"]), _f(s["torch"]), _f(s.get("ours")),
                         _f(ratio.get("ours"), "{:.2f}x"), _f(s.get("diffusers_flax")),
                         _f(ratio.get("diffusers_flax"), "{:.2f}x"), _f(r["rel_err_vs_torch"].get("ours"), "{:.1e}")])
    return ["", "#### One UNet call (ours vs PyTorch, same weights)", ""] + _table(
        ["config", "params", "setting", "input", "torch s", "ours s", "ours / torch", "diffusers Flax s",
         "diffusers Flax / torch", "ours parity"], rows) + [f"\ndiffusers Flax columns: {note}" for note in skipped.values()]


def dtp_table(result: dict) -> list:
    lines = []
    for name, run in result.get("dtp", {}).items():
        rows = [[SHORT.get(k, f"(a) ours, batch {k.split('_b')[-1]}") if not k.startswith("ours_b") else
                 f"(a) ours, batch {k.split('_b')[-1]}",
                 1 if k in R.LOOPS else row["n_images"], _f(row["images_per_s"]),
                 _f(row["ratio_vs_anchor"], "{:.2f}x"), _f(row["ratio_vs_flax_loop"], "{:.2f}x"),
                 _f(row["unet_evals_per_image"], "{:.0f}")]
                for k, row in run["rows"].items()]
        lines += ["", f"#### DTP images/s, `{name}` ({run['steps']} steps)", ""] + _table(
            ["runner", "batch", "images/s", "vs PyTorch loop (b1)", "vs Flax loop (b1)", "UNet evals/image"], rows)
    return lines


def targets(result: dict) -> list:
    lines = ["", "#### Targets", ""]
    for mode, run in result.get("percall", {}).items():
        ratios = ", ".join(f"{r['config']} {r['ratio_vs_torch']['ours']:.2f}x" for r in run["results"])
        lines.append(f"- per-call ratio ours/PyTorch, {mode.replace('_', ' ')}: {ratios} (target <= {TARGETS['percall']}x)")
    for name, o in result.get("overhead", {}).items():
        lines.append(f"- sampler overhead per step, `{name}` batch {o['batch']}: measured {o['measured_fraction']:+.1%}, "
                     f"isolated {o['isolated_fraction']:.1%} of a {o['unet_call_s'] * 1e3:.1f} ms UNet call "
                     f"(target <= {TARGETS['overhead']:.0%}); host callbacks in the compiled loop: {o['host_callbacks_in_loop']}")
    for name, tab in result.get("table", {}).items():
        if "stp_work" in tab:
            w = tab["stp_work"]
            lines.append(f"- STP UNet work vs constant CFG, `{name}` ({tab['steps']} steps): {w['unet_evals_ratio']:.2f}x "
                         f"UNet evaluations (target <= {TARGETS['stp_work']}x)")
        if "stp_sweep" in tab:
            lines.append(f"- recompilations over a {len(tab['stp_sweep']['points'])}-point sweep of t, `{name}`: "
                         f"{tab['stp_sweep']['recompiles']}")
    for name, cp in result.get("compile", {}).items():
        lines.append(compile_line(name, cp))
    for name, run in result.get("dtp", {}).items():
        best = max((k for k in run["rows"] if k.startswith("ours_b")), key=lambda k: int(k.split("_b")[-1]), default=None)
        if best:
            lines.append(f"- DTP {best.replace('ours_b', 'batch ')} vs the PyTorch batch-1 loop, `{name}`: "
                         f"{run['rows'][best]['ratio_vs_anchor']:.2f}x images/s (target >= {TARGETS['dtp_b8']}x)")
    return lines


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB"


def fullsize_tables(result: dict) -> list:
    """Conversion, load, memory and compile figures of a full-size run (``python -m bench --config``)."""
    full = result.get("fullsize")
    if not full:
        return []
    lines = ["", f"#### `{full['config']}`: {full['description']}", ""]
    c = full.get("convert")
    if c:
        lines += [f"- conversion: {c['convert_s']:.1f} s ({c['convert_vs_read_disk']:.2f}x the {c['read_disk_s']:.1f} s "
                  f"read of the {_gb(c['weight_bytes'])} of weights from disk; {c['convert_vs_read_cache']:.1f}x "
                  f"the {c['read_cache_s']:.1f} s read from the page cache); peak RSS {_gb(c['peak_rss_bytes'])} = "
                  f"{c['peak_rss_vs_weights']:.2f}x the weights (target <= 1.3x); load avg {c['load_avg'][0]}"]
    ld = full.get("load")
    if ld:
        lines += [f"- load_pipeline: {ld['load_disk_s']:.1f} s from disk ({ld['load_vs_read_disk']:.2f}x the "
                  f"{ld['read_disk_s']:.1f} s read of the {_gb(ld['checkpoint_bytes'])} checkpoint; target <= 2x), "
                  f"{ld['load_cache_s']:.1f} s from the page cache ({ld['load_cache_vs_read_cache']:.1f}x its "
                  f"{ld['read_cache_s']:.1f} s read); peak RSS {_gb(ld['peak_rss_bytes'])}, params "
                  f"{_gb(ld['param_bytes'])}; load avg {ld['load_avg'][0]}"]
    m = full.get("memory")
    if m:
        rows = [[label, _gb(m[k]["peak_rss_bytes"]), _f(m[k]["call_s"], "{:.1f}"), _f(m[k]["load_s"], "{:.1f}"),
                 m[k]["load_avg"][0]]
                for k, label in (("ours_float32", "ours, float32"), ("ours_bfloat16", "ours, bfloat16"),
                                 ("torch_pipe", "diffusers StableDiffusionPipeline (PyTorch, float32)")) if k in m]
        lines += ["", f"Peak RSS of one job: batch 1, {m['steps']} DDIM step(s), {m['side']}x{m['side']}, CFG 7.5, "
                  f"VAE decode (ours / PyTorch: {m['ours_vs_torch']:.2f}x; target <= 1x):", ""]
        lines += _table(["process", "peak RSS", "generate s", "load s", "load avg"], rows)
    if full.get("compile"):
        lines += ["", compile_line(full["config"], full["compile"])]
    return lines


def compile_line(name: str, cp: dict) -> str:
    """One line: compile time, and a second process's first call against the steady call (with the
    persistent compilation cache only, where measured, and with the serialized executables)."""
    b = cp["second_process_compile_breakdown"]
    earlier = ""
    if "compilation_cache_only_first_call_s" in cp:
        o = cp["compilation_cache_only_breakdown"]
        earlier = (f"with the persistent compilation cache only: first call {cp['compilation_cache_only_first_call_s']:.1f} s = "
                   f"{cp['compilation_cache_only_vs_steady']:.2f}x the steady call (tracing {o['trace_s']:.1f} s, lowering "
                   f"{o['lower_s']:.1f} s, loading the executables {o['backend_s']:.1f} s); with the serialized executables: ")
    return (f"- compile, `{name}` (batch {cp.get('batch', 1)}, {cp['steps']} steps, {cp['side']}x{cp['side']}): first call "
            f"{cp['first_call_s']:.1f} s ({cp['compile_s']:.1f} s compiling), steady {cp['steady_call_s']:.1f} s; a "
            f"second process on the same caches: {earlier}first call {cp['second_process_first_call_s']:.1f} s = "
            f"{cp['second_process_vs_steady']:.2f}x the steady call (target <= 1.1x; {cp['second_process_cache_hits']} "
            f"cache hits; tracing {b['trace_s']:.1f} s, lowering {b['lower_s']:.1f} s, compiling or loading "
            f"{b['backend_s']:.1f} s); load avg {cp['load_avg'][0]}")


PROFILE_ROWS = (("conv", "convolutions"), ("self_attention", "self-attention (attn1)"),
                ("cross_attention", "cross-attention (attn2)"), ("group_norm", "group norms"), ("rest", "the rest"))


def profile_table(result: dict) -> list:
    """Where one CFG step's UNet call spends its time, ours and PyTorch's; FLOP/s against the peak."""
    lines = []
    for name, p in result.get("profile", {}).items():
        ours, theirs, peak, fl = p["ours"], p["torch"], p["peak"], p["ours"]["flops"]
        rows = [[label + (f" ({ours['calls'][key]} calls)" if key in ours["calls"] else ""),
                 _f(ours[f"{key}_s"], "{:.3f}"), _f(ours[f"{key}_s"] / ours["step_s"], "{:.0%}"),
                 _f(theirs[f"{key}_s"], "{:.3f}"), _f(theirs[f"{key}_s"] / theirs["step_s"], "{:.0%}"),
                 _f(ours[f"{key}_s"] / theirs[f"{key}_s"] if min(ours[f"{key}_s"], theirs[f"{key}_s"]) > 0 else None,
                    "{:.2f}x")]
                for key, label in PROFILE_ROWS]
        rows.append(["whole step", _f(ours["step_s"], "{:.3f}"), "100%", _f(theirs["step_s"], "{:.3f}"), "100%",
                     _f(ours["step_s"] / theirs["unprofiled_step_s"], "{:.2f}x")])
        lines += ["", f"#### Where one CFG step goes, `{name}` (UNet call, batch {p['batch']}, {p['latent']}x{p['latent']} "
                  f"latents; medians of {p['repeats']})", ""]
        lines += _table(["part", "ours s", "ours share", "PyTorch s", "PyTorch share", "ours / PyTorch"], rows)
        lines += ["",
                  f"- ours: per-block compiled timings ({ours['distinct_blocks']} distinct blocks), the whole step as one "
                  f"program; PyTorch: torch.profiler ranges around each module (profiled step {theirs['step_s']:.3f} s, "
                  f"without the profiler {theirs['unprofiled_step_s']:.3f} s; the last column's whole-step ratio uses the latter)",
                  f"- FLOPs per step, a direct convolution's count (Winograd convolutions multiply less, so the rates "
                  f"below are direct-equivalent): {fl['total'] / 1e9:.4g} GFLOP (convolutions {fl['conv'] / 1e9:.4g}, dense "
                  f"{fl['dense'] / 1e9:.4g}, attention products {fl['attention_products'] / 1e9:.4g}; XLA's cost analysis "
                  f"{ours['xla_flops'] / 1e9:.4g}, which counts a loop's body once: the chunked attention's products "
                  f"run in lax.map)",
                  f"- peak ({peak['n']}x{peak['n']} float32 matmul): JAX {peak['jax_gflops']:.0f} GFLOP/s, PyTorch "
                  f"{peak['torch_gflops']:.0f} GFLOP/s; the UNet step reaches {ours['gflops']:.0f} GFLOP/s "
                  f"direct-equivalent "
                  f"({ours['fraction_of_peak']:.0%} of the peak) ours, {theirs['gflops']:.0f} GFLOP/s "
                  f"({theirs['fraction_of_peak']:.0%}) PyTorch"]
        rows = [[kind.replace("_", "-"), "x".join(str(v) for v in a["shape"])]
                + [_f(a[k] * 1e3, "{:.1f}") for k in ("chunked", "xla", "dense", "torch_sdpa")]
                for kind, a in p.get("attention", {}).items()]
        if rows:
            lines += ["", "The largest attention product alone (ms; shape B x queries x keys x heads x head dim):", ""]
            lines += _table(["attention", "shape", "ours chunked", "ours xla", "ours dense", "PyTorch SDPA"], rows)
    return lines


def markdown(result: dict) -> str:
    info = result["machine"]
    lines = [f"### Benchmark ({result['date']})", "", f"Machine: {measure.machine_line(info)}", "",
             f"Command: `{result['command']}`"]
    lines += targets(result) + fullsize_tables(result) + main_table(result) + profile_table(result) + dtp_table(result)
    lines += percall_table(result)
    if result.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path, name: str = "latest") -> tuple:
    """Write NAME.md and NAME.json under out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text(markdown(result))
    js.write_text(json.dumps(result, indent=1, default=float))
    return md, js
