"""``cfgbasin-demo``: the attraction-basin effect on the shipped toy model, offline, on CPU.

For memorized prompts (the captions of the toy's duplicated training images) and plain prompts,
it samples with constant CFG, STP, OG+STP, DTP and OG+DTP from the same seeds, then measures

  (a) memorization: each output's similarity to its nearest training image (cosine of the
      mean-centred pixel vectors: 1 for an exact copy), the paper's 95th-percentile of it, and the
      fraction of memorized-prompt outputs that copy their duplicated image (similarity above a
      threshold set from fresh images that satisfy the same caption, see :func:`copy_threshold`);
  (b) caption alignment, measured from pixels: colour at the captioned position and shape kind;
  (c) UNet evaluations and wall time per method;

and writes ``report.md`` with the table, image grids and noise-difference plots into ``--outdir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from cfgbasin_jax import TOY_MODEL
from cfgbasin_jax.method import registry as M
from cfgbasin_jax.metrics import detection
from cfgbasin_jax.pipeline import calibrate_threshold
from cfgbasin_jax.runtime import files as F
from cfgbasin_jax.toy import data as toy
from cfgbasin_jax.toy.scoring import (alignment, copy_threshold, first_local_min_t, layout_iou, layout_threshold,
                                      nearest_training, similarity)

SHIPPED_MODEL = TOY_MODEL
# Every method of the registry, by its table label: the transition methods, then the inference-time
# baselines of cfgbasin_jax.baselines, all with constant CFG (Wen et al.'s prompt-embedding
# optimisation, CADS, and rand_word_repeat prompt augmentation).
METHODS = tuple(M.get(name).label for name in M.names())
BASELINES = tuple(M.get(name).label for name in M.names() if M.get(name).baseline)
GATED = tuple(M.get(name).label for name in M.names() if M.get(name).is_gated)
PRESET = M.TOY_DEMO  # the demo's CFG and opposite-guidance scales (not the paper's)
# By default the gated rows are gated STP and gated OG+STP (--methods adds the gated DTP rules).
DEFAULT_METHODS = tuple(m for m in METHODS if m not in GATED[2:])


# ----------------------------------------------------------------------------- model


def _resolve_model(name: str) -> Path:
    """--model: a folder, or a Hub id downloaded / found in the cache (:mod:`cfgbasin_jax.loading.hub`)."""
    from cfgbasin_jax.loading.hub import HubError, resolve

    try:
        return resolve(name)
    except HubError as err:
        raise DemoError(f"--model {err}") from None


def load_demo_pipeline(model: str | None, log=print):
    """(Pipeline, description, is_toy): the shipped toy, a given pixel-model folder, or - when the
    shipped weights are missing - cfgbasin_jax.models.tiny.random_components() with a notice."""
    from cfgbasin_jax.models.components import is_pixel_model, load_pixel_components
    from cfgbasin_jax.pipeline import Pipeline

    path = _resolve_model(model) if model else SHIPPED_MODEL
    if is_pixel_model(path):
        return Pipeline(load_pixel_components(path), compilation_cache=True), f"toy model {path}", True
    if model:
        raise ValueError(f"--model {model}: not a pixel-model folder (needs model.json + params.safetensors)")
    from cfgbasin_jax.models.tiny import random_components

    log(
        "NOTICE: the shipped toy weights are not there (" + str(path) + "); falling back to "
        "cfgbasin_jax.models.tiny.random_components(): a RANDOM untrained model. The numbers below say "
        "nothing about memorization."
    )
    return Pipeline(random_components(), compilation_cache=True), "random tiny model (fallback: shipped toy weights missing)", False


def method_guidance(name: str, scale: float, stp_t: int | None, og_t: int | None, og_scale: float, threshold=None,
                    gate_steps: int = 1, pre_scale: float | None = None):
    """The registry method ``name`` (:mod:`cfgbasin_jax.method.registry`) with the demo's settings
    (:meth:`~cfgbasin_jax.method.registry.Preset.guidance`): CFG scale ``scale`` everywhere, STP at
    ``stp_t``, the opposite-guidance methods at ``og_scale`` (OG+STP at ``og_t``; None: the paper's t);
    gated methods with the gate ``threshold`` over ``gate_steps`` steps (``pre_scale`` before the flag)."""
    return PRESET.guidance(name, t=stp_t, opposite_t=og_t, scale=scale, opposite_before=og_scale, threshold=threshold,
                           gate_steps=gate_steps, pre_scale=pre_scale)


def generate_method(pipe, name: str, prompts: list, guidance, **kwargs):
    """``pipe.generate`` under method ``name``'s baseline hook, if any (its UNet cost included); an
    augmented sample draws its words keyed by its batch position."""
    from cfgbasin_jax import baselines as B

    hook = M.get(name).hook
    prompts, extra = B.prepare(hook, prompts, seed=kwargs.get("seed", 0))
    return B.sample(pipe, hook, prompts, guidance, **extra, **kwargs)


# ----------------------------------------------------------------------------- plots and grids


def _grid(rows: list[list[np.ndarray]], scale: int = 4, pad: int = 2) -> np.ndarray:
    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h * scale + pad) + pad, ncols * (w * scale + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            big = np.kron(img, np.ones((scale, scale, 1), np.uint8))
            y, x = pad + i * (h * scale + pad), pad + j * (w * scale + pad)
            out[y: y + h * scale, x: x + w * scale] = big
    return out


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


def _plot_traces(runs: dict, n_mem: int, stp_t: int, og_t: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.label for m in (M.CFG, M.DTP) if m.label in runs]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        res = runs[name]["result"]
        ts = res.timesteps
        for i, d in enumerate(res.noise_diff):
            colour = "tab:red" if i < n_mem else "tab:blue"
            ax.plot(ts, d, color=colour, alpha=0.25, lw=0.8)
        mem, plain = res.noise_diff[:n_mem], res.noise_diff[n_mem:]
        if len(mem):
            ax.plot(ts, np.nanmean(mem, 0), color="tab:red", lw=2.5, label="memorized prompts (mean)")
        if len(plain):
            ax.plot(ts, np.nanmean(plain, 0), color="tab:blue", lw=2.5, label="plain prompts (mean)")
        tt = res.transition_t[res.transition_t >= 0]
        for t in tt:
            ax.axvline(t, color="k", alpha=0.05)
        ax.axvline(stp_t, color="green", ls="--", label=f"STP t={stp_t}")
        ax.axvline(og_t, color="purple", ls=":", label=f"OG+STP t={og_t}")
        ax.set_xlim(ts.max(), ts.min())
        ax.set_xlabel("timestep t")
        ax.set_ylabel("||eps_c - eps_u||")
        title = f"{name}: noise difference per sample"
        if name == M.DTP.label:
            title += " (grey lines: detected transitions)"
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    plt.close(fig)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the demo


@dataclasses.dataclass
class DemoConfig:
    outdir: str = "cfgbasin_demo_out"
    model: str | None = None
    guidance: float = PRESET.scale
    num_mem_prompts: int = 8
    num_plain_prompts: int = 8
    samples_per_prompt: int = 4
    num_inference_steps: int = 20
    scheduler: str = "ddim"
    seed: int = 0
    stp_t: int | None = None
    og_t: int | None = None
    og_scale: float = PRESET.opposite_before
    methods: tuple = DEFAULT_METHODS
    gate_steps: int = 1
    gate_pre_scale: float | None = None
    num_calibration_prompts: int = 32


def _prompt_set(ds: toy.ToyDataset, cfg: DemoConfig):
    mem_idx = np.nonzero(ds.memorized)[0][: cfg.num_mem_prompts]
    prompts = [(ds.captions[i], list(ds.objects[i]), int(i)) for i in mem_idx]
    for objs in toy.plain_prompts(cfg.num_plain_prompts, cfg.seed, exclude=ds.captions[: ds.num_memorized]):
        prompts.append((toy.caption_of(objs), objs, -1))
    return prompts


def calibrate_gate(pipe, ds: toy.ToyDataset, prompts: list, cfg: DemoConfig) -> tuple[float, list]:
    """(threshold, calibration captions): the gate's threshold at a 1% false-positive rate on
    ``cfg.num_calibration_prompts`` held-out plain prompts (none of the demo's), with the demo's seeds."""
    exclude = list(ds.captions[: ds.num_memorized]) + [p[0] for p in prompts]
    captions = [toy.caption_of(o) for o in toy.plain_prompts(cfg.num_calibration_prompts, cfg.seed + 1, exclude)]
    k = cfg.samples_per_prompt
    gated = method_guidance(M.STP.gated, cfg.guidance, None, None, cfg.og_scale, gate_steps=cfg.gate_steps,
                            pre_scale=cfg.gate_pre_scale)
    threshold = calibrate_threshold(
        pipe, [c for c in captions for _ in range(k)], gated, num_inference_steps=cfg.num_inference_steps, seed=cfg.seed,
        scheduler=cfg.scheduler, progress=False, sample_indices=np.tile(np.arange(k), len(captions)))
    return threshold, captions


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Generate, measure, write the report. Returns {"rows", "report", "stp_t", "og_t", ...}."""
    out = Path(cfg.outdir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict = {}  # written together at the end, report.md last (runtime.files.write_all)
    t_start = time.perf_counter()
    pipe, model_desc, is_toy = load_demo_pipeline(cfg.model, log)
    ds = toy.make_dataset()
    threshold = copy_threshold(ds)
    lay_threshold = layout_threshold(ds)
    prompts = _prompt_set(ds, cfg)
    n_mem = sum(1 for p in prompts if p[2] >= 0)
    k = cfg.samples_per_prompt
    batch_prompts = [p[0] for p in prompts for _ in range(k)]
    sample_ids = np.asarray([j for _ in prompts for j in range(k)])  # same seeds for every prompt and method
    info = {i * k + j: prompts[i] for i in range(len(prompts)) for j in range(k)}

    gate_threshold, calibration = None, []
    if set(cfg.methods) & set(GATED):
        gate_threshold, calibration = calibrate_gate(pipe, ds, prompts, cfg)
        log(f"gate threshold {gate_threshold:.4f} (99th percentile over {len(calibration)} held-out plain prompts)")

    runs: dict = {}
    stp_t, og_t = cfg.stp_t, cfg.og_t
    anchor = M.CFG.label  # constant CFG runs first: the other methods' transitions come from its curve
    for name in [anchor] + [m for m in cfg.methods if m != anchor]:
        if name != anchor and stp_t is None:
            # Transition from the measured curve: the median timestep of the first local minimum
            # of ||eps_c - eps_u|| under constant CFG (what DTP detects), over all samples.
            cfg_run = runs[anchor]["result"]
            tmin = first_local_min_t(cfg_run.noise_diff, cfg_run.timesteps)
            tmin = tmin[tmin >= 0]
            stp_t = int(np.median(tmin)) if tmin.size else M.STP.defaults["t"]
        if stp_t is not None and og_t is None:
            og_t = int(round(stp_t + 0.3 * (1000 - stp_t)))  # the paper's 650 for its 500
        g = method_guidance(name, cfg.guidance, stp_t or None, og_t or None, cfg.og_scale, gate_threshold, cfg.gate_steps,
                            cfg.gate_pre_scale)
        t0 = time.perf_counter()
        compiles = pipe.compile_count()
        res = generate_method(pipe, name, batch_prompts, g, num_inference_steps=cfg.num_inference_steps, seed=cfg.seed,
                              scheduler=cfg.scheduler, progress=False, sample_indices=sample_ids)
        wall = time.perf_counter() - t0
        runs[name] = {"result": res, "wall": wall, "compiled": pipe.compile_count() > compiles}
        log(f"{name}: {wall:.1f} s{' (includes compilation)' if runs[name]['compiled'] else ''}")

    train_images = ds.images
    rows = []
    for name in [m for m in METHODS if m in runs]:
        res = runs[name]["result"]
        imgs = res.images
        nn_sim, nn_idx = nearest_training(imgs, train_images)
        own = np.full(len(imgs), np.nan)
        lay = np.full(len(imgs), np.nan)
        aligned = np.zeros(len(imgs))
        for b in range(len(imgs)):
            caption, objs, mem_index = info[b]
            if mem_index >= 0:
                own[b] = similarity(imgs[b: b + 1], train_images[mem_index][None])[0]
                lay[b] = layout_iou(imgs[b], train_images[mem_index])
            aligned[b] = alignment(imgs[b], objs)
        is_mem = np.asarray([info[b][2] >= 0 for b in range(len(imgs))])
        tt = res.transition_t[res.transition_t >= 0]
        row = {
            "method": name,
            "copy_rate_mem": float(np.mean(own[is_mem] > threshold)) if is_mem.any() else float("nan"),
            "layout_copy_rate_mem": float(np.mean(lay[is_mem] > lay_threshold)) if is_mem.any() else float("nan"),
            "sim_own_mem": float(np.mean(own[is_mem])) if is_mem.any() else float("nan"),
            "p95_nn_mem": float(np.percentile(nn_sim[is_mem], 95)) if is_mem.any() else float("nan"),
            "p95_nn_plain": float(np.percentile(nn_sim[~is_mem], 95)) if (~is_mem).any() else float("nan"),
            "align_mem": float(np.mean(aligned[is_mem])) if is_mem.any() else float("nan"),
            "align_plain": float(np.mean(aligned[~is_mem])) if (~is_mem).any() else float("nan"),
            "unet_evals_per_sample": res.unet_evals / len(imgs),
            "wall_s": runs[name]["wall"],
            "compiled": runs[name]["compiled"],
            "transition_t_median": float(np.median(tt)) if tt.size else float("nan"),
            **gate_rates(res.gate_flagged, is_mem),
        }
        rows.append(row)
        grid_rows = []
        for i, (caption, objs, mem_index) in enumerate(prompts):
            ref = train_images[mem_index] if mem_index >= 0 else np.full((16, 16, 3), 255, np.uint8)
            grid_rows.append([ref] + [imgs[i * k + j] for j in range(k)])
        files[grid_file(name)] = _png(_grid(grid_rows))
        runs[name]["nn_sim"] = nn_sim
    files["noise_diff.png"] = _plot_traces(runs, n_mem * k, stp_t or M.STP.defaults["t"], og_t or M.OG_STP.defaults["t"])

    table = format_table(rows)
    gate = {"threshold": gate_threshold, "calibration_prompts": len(calibration), "steps": cfg.gate_steps,
            "auc": detection_auc(runs, n_mem * k, cfg.gate_steps)}
    report = _report_text(cfg, model_desc, is_toy, threshold, lay_threshold, prompts, n_mem, stp_t, og_t, table,
                          time.perf_counter() - t_start, gate)
    files["report.md"] = report.encode("utf-8")
    files["results.json"] = json.dumps({"rows": rows, "copy_threshold": threshold, "layout_threshold": lay_threshold,
                                        "stp_t": stp_t, "og_t": og_t, "gate": gate, "model": model_desc,
                                        "config": dataclasses.asdict(cfg)}, indent=2, default=str).encode("utf-8")
    F.write_all(out, files, last="report.md")
    return {"rows": rows, "table": table, "report": out / "report.md", "stp_t": stp_t, "og_t": og_t,
            "threshold": threshold, "is_toy": is_toy, "runs": runs, "gate": gate}


def grid_file(method: str) -> str:
    """The image grid's file name of a method label ("OG+STP" -> grid_OG_STP.png)."""
    return f"grid_{method.replace('+', '_').replace(' ', '_')}.png"


def gate_rates(flagged, is_mem) -> dict:
    """The gate's true / false positive rates (flagged memorized / plain samples); NaN without a gate."""
    if flagged is None:
        return {"flagged_mem": float("nan"), "flagged_plain": float("nan")}
    flagged = np.asarray(flagged, bool)
    rate = lambda sel: float(np.mean(flagged[sel])) if sel.any() else float("nan")  # noqa: E731
    return {"flagged_mem": rate(is_mem), "flagged_plain": rate(~is_mem)}


def detection_auc(runs: dict, n_mem: int, gate_steps: int) -> float:
    """ROC AUC of the gate's score (memorized vs plain samples) under constant CFG, NaN if one group is empty."""
    score = detection.detection_score(runs[M.CFG.label]["result"].noise_diff, gate_steps)
    if n_mem == 0 or n_mem == len(score):
        return float("nan")
    return detection.roc_auc(score[:n_mem], score[n_mem:])


def format_table(rows: list[dict]) -> str:
    head = ("| method | copies (mem) | layout copies (mem) | sim to dup. (mem) | p95 NN sim (mem) | p95 NN sim (plain) | "
            "alignment (mem) | alignment (plain) | UNet evals/sample | wall s | median transition t | "
            "flagged (mem) | flagged (plain) |")
    sep = "|" + "---|" * 13
    lines = [head, sep]
    for r in rows:
        tt = "-" if np.isnan(r["transition_t_median"]) else f"{r['transition_t_median']:.0f}"
        wall = f"{r['wall_s']:.1f}" + ("*" if r["compiled"] else "")
        lines.append(
            f"| {r['method']} | {r['copy_rate_mem']:.0%} | {r['layout_copy_rate_mem']:.0%} | {r['sim_own_mem']:.3f} | {r['p95_nn_mem']:.3f} | "
            f"{r['p95_nn_plain']:.3f} | {r['align_mem']:.2f} | {r['align_plain']:.2f} | "
            f"{r['unet_evals_per_sample']:.1f} | {wall} | {tt} | {_rate(r['flagged_mem'])} | {_rate(r['flagged_plain'])} |"
        )
    return "\n".join(lines)


def _rate(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.0%}"


def _report_text(cfg, model_desc, is_toy, threshold, lay_threshold, prompts, n_mem, stp_t, og_t, table, total_s,
                 gate) -> str:
    notice = "" if is_toy else (
        "\n> **NOTICE: the shipped toy weights were not found; this report uses a RANDOM untrained model "
        "(`cfgbasin_jax.models.tiny.random_components()`). Its numbers say nothing about memorization.**\n")
    plist = "\n".join(f"- {'**memorized**' if m >= 0 else 'plain'}: {c}" for c, _, m in prompts)
    method_lines = (
        f"- CFG: constant scale {cfg.guidance}\n"
        f"- STP: scale 0 while t > {stp_t}, then {cfg.guidance}\n"
        f"- OG+STP: scale {cfg.og_scale} (opposite guidance) while t > {og_t}, then {cfg.guidance}\n"
        f"- DTP: scale 1 until the first local minimum of ||eps_c - eps_u|| is detected, then {cfg.guidance}\n"
        f"- OG+DTP: scale {cfg.og_scale} until the first local minimum of the latents' cosine distance "
        f"(exact two-pass rule), then {cfg.guidance}\n"
        + "".join(f"- {m}: {m.split(' ', 1)[1]} for samples whose mean ||eps_c - eps_u|| over the first "
                  f"{cfg.gate_steps} step(s) exceeds the gate threshold, constant CFG {cfg.guidance} for the rest\n"
                  for m in GATED if m in cfg.methods)
    )
    gate_text = "" if gate["threshold"] is None else (
        f"\nGate: threshold {gate['threshold']:.4f}, the 99th percentile of the score over "
        f"{gate['calibration_prompts']} held-out plain prompts x {cfg.samples_per_prompt} seeds (a 1% false-positive "
        f"rate there). *flagged (mem)* / *flagged (plain)*: the detector's true / false positive rates on the "
        f"demo's memorized / plain prompts. Detection AUC of the score (memorized vs plain, under CFG): "
        f"{gate['auc']:.3f}. Score steps {cfg.gate_steps}; scale before the flag: "
        f"{cfg.guidance if cfg.gate_pre_scale is None else cfg.gate_pre_scale}.\n")
    return f"""# cfgbasin-demo report

Model: {model_desc}{notice}
Sampler: {cfg.scheduler}, {cfg.num_inference_steps} steps, seed {cfg.seed}; {cfg.samples_per_prompt} samples per prompt, the same
initial noise for every prompt and method. Total time {total_s:.0f} s.

## Methods
{method_lines}
STP's t is the median timestep of the first local minimum of ||eps_c - eps_u|| measured under constant CFG
(unless --stp_t is given); OG+STP's t = t_STP + 0.3 (1000 - t_STP) (the paper's 650 for 500).

## Results

{table}
{gate_text}
Columns: *copies (mem)*: fraction of memorized-prompt outputs whose similarity to their duplicated training image
exceeds {threshold:.3f}, the 99th percentile of the similarity between each duplicated image and fresh images that
satisfy the same caption (random background, sizes, jitter): an output above it is closer to the duplicate than
99% of legitimate caption-satisfying images. *layout copies (mem)*: the same for the objects alone (mean IoU of
each object colour's pixels with the duplicate's, threshold {lay_threshold:.3f}, the 99th percentile over fresh
caption-satisfying images whose objects differ in size or placement), blind to the background colour. *sim to dup.*: mean of that similarity. *p95 NN sim*: the paper's
statistic, the 95th percentile over outputs of the similarity to the nearest training image
(similarity = cosine of mean-centred pixel vectors; 1 = identical). *alignment*: fraction of the caption's
checks passed, measured from pixels (colour at the captioned position, shape kind by template IoU).
*UNet evals/sample*: UNet sample-evaluations per output (CFG = 2 per step). *wall s*: wall time of the method's
generate call (* = includes compiling its sampler).

## Images
Each grid: one row per prompt (memorized prompts first), first column the duplicated training image (blank for
plain prompts), then the samples.

{chr(10).join(f'![{m}]({grid_file(m)})' + chr(10) + f'*{m}*' + chr(10) for m in METHODS if m in cfg.methods)}
## Noise difference ||eps_c - eps_u||

![noise difference](noise_diff.png)

## Prompts
{plist}
"""


class DemoError(ValueError):
    """Bad demo input (one line naming the flag)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump (main: exit status 2)
        raise DemoError(message)


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags; the settings it shares with cfgbasin-generate have its names (--num_inference_steps,
    --scheduler, --seed, --outdir; --steps is the old spelling)."""
    p = _Parser(prog="cfgbasin-demo", description="The attraction-basin demo on the shipped toy model (offline, CPU).")
    p.add_argument("--outdir", default="cfgbasin_demo_out")
    p.add_argument("--model", default=None, help="a pixel-model folder or Hub id (default: the shipped toy)")
    p.add_argument("--guidance", type=float, default=PRESET.scale,
                   help=f"CFG scale after the transition (and for constant CFG); preset {PRESET.name}")
    p.add_argument("--num_mem_prompts", type=int, default=8)
    p.add_argument("--num_plain_prompts", type=int, default=8)
    p.add_argument("--samples_per_prompt", type=int, default=4)
    p.add_argument("--num_inference_steps", "--steps", type=int, default=20)
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm++2m", "euler", "pndm"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stp_t", type=int, default=None, help="STP transition timestep (default: measured)")
    p.add_argument("--og_t", type=int, default=None, help="OG+STP transition timestep (default: from STP's)")
    p.add_argument("--og_scale", type=float, default=PRESET.opposite_before,
                   help=f"opposite-guidance scale of OG+STP and OG+DTP; preset {PRESET.name}")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--gate_steps", type=int, default=1, help="gated methods: steps the memorization score averages over")
    p.add_argument("--gate_pre_scale", type=float, default=None,
                   help="gated methods: the scale of the first --gate_steps - 1 steps (default: the CFG scale)")
    p.add_argument("--num_calibration_prompts", type=int, default=32,
                   help="gated methods: held-out plain prompts that set the gate threshold (1%% false positives)")
    return p


def check_config(cfg: DemoConfig) -> None:
    """Every flag, checked before anything is computed or written (DemoError naming the flag)."""
    from cfgbasin_jax.models.components import is_pixel_model

    for name in ("num_mem_prompts", "num_plain_prompts", "samples_per_prompt", "num_inference_steps", "gate_steps",
                 "num_calibration_prompts"):
        minimum = 3 if name == "num_inference_steps" else (1 if name in ("samples_per_prompt", "gate_steps", "num_calibration_prompts") else 0)
        if getattr(cfg, name) < minimum:
            raise DemoError(f"--{name} must be >= {minimum}, got {getattr(cfg, name)}")
    if cfg.num_mem_prompts + cfg.num_plain_prompts < 1:
        raise DemoError("--num_mem_prompts and --num_plain_prompts are both 0: nothing to sample")
    for name in ("guidance", "og_scale", "gate_pre_scale"):
        if getattr(cfg, name) is not None and not np.isfinite(getattr(cfg, name)):
            raise DemoError(f"--{name} must be a finite number, got {getattr(cfg, name)}")
    path = _resolve_model(cfg.model) if cfg.model else SHIPPED_MODEL
    if cfg.model and not is_pixel_model(path):
        raise DemoError(f"--model {cfg.model}: not a pixel-model folder (needs model.json + params.safetensors)")
    num_train = 1000
    if is_pixel_model(path):
        try:
            meta = json.loads((path / "model.json").read_text(encoding="utf-8"))
            num_train = int(meta["configs"]["scheduler"].get("num_train_timesteps", 1000))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DemoError(f"{path / 'model.json'}: cannot read the scheduler config ({err})") from None
    if cfg.num_inference_steps > num_train:
        raise DemoError(f"--num_inference_steps {cfg.num_inference_steps} must be <= {num_train} (the model's num_train_timesteps)")
    if cfg.gate_steps >= cfg.num_inference_steps:
        raise DemoError(f"--gate_steps {cfg.gate_steps} must be < --num_inference_steps {cfg.num_inference_steps}")
    for name in ("stp_t", "og_t"):
        value = getattr(cfg, name)
        if value is not None and not 0 <= value < num_train:
            raise DemoError(f"--{name} {value} must be a timestep in [0, {num_train - 1}]")
    try:
        F.check_writable_dir(cfg.outdir, "--outdir")
    except F.FileError as err:
        raise DemoError(str(err)) from None


def main(argv=None) -> int:

    try:
        args = build_parser().parse_args(argv)
        cfg = DemoConfig(**{**vars(args), "methods": tuple(args.methods)})
        check_config(cfg)
        result = run_demo(cfg)
    except DemoError as err:
        print(f"cfgbasin-demo: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"cfgbasin-demo: error: {F.describe(err)}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"\nreport: {result['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
