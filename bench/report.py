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
    for name, run in result.get("dtp", {}).items():
        best = max((k for k in run["rows"] if k.startswith("ours_b")), key=lambda k: int(k.split("_b")[-1]), default=None)
        if best:
            lines.append(f"- DTP {best.replace('ours_b', 'batch ')} vs the PyTorch batch-1 loop, `{name}`: "
                         f"{run['rows'][best]['ratio_vs_anchor']:.2f}x images/s (target >= {TARGETS['dtp_b8']}x)")
    return lines


def markdown(result: dict) -> str:
    info = result["machine"]
    lines = [f"### Benchmark ({result['date']})", "", f"Machine: {measure.machine_line(info)}", "",
             f"Command: `{result['command']}`"]
    lines += targets(result) + main_table(result) + dtp_table(result) + percall_table(result)
    if result.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path) -> tuple:
    """Write latest.md and latest.json under out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "latest.md", out_dir / "latest.json"
    md.write_text(markdown(result))
    js.write_text(json.dumps(result, indent=1, default=float))
    return md, js
