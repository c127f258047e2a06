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
from typing import Sequence

import numpy as np

from cfgbasin_jax import TOY_MODEL
from cfgbasin_jax.toy import data as toy
from cfgbasin_jax.method import registry as M

SHIPPED_MODEL = TOY_MODEL
# Every method of the registry, by its table label: the transition methods, then the inference-time
# baselines of cfgbasin_jax.baselines, all with constant CFG (Wen et al.'s prompt-embedding
# optimisation, CADS, and rand_word_repeat prompt augmentation).
METHODS = tuple(M.get(name).label for name in M.names())
BASELINES = tuple(M.get(name).label for name in M.names() if M.get(name).baseline)


# ----------------------------------------------------------------------------- metrics


def centred_unit(images: np.ndarray) -> np.ndarray:
    """uint8/float [N,H,W,3] -> float32 [N,D]: mean-centred, unit-norm pixel vectors."""
    x = np.asarray(images, np.float32).reshape(len(images), -1)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N,H,W,3] x [N,H,W,3] -> [N]: pairwise cosine of mean-centred pixels (1 = identical)."""
    return np.sum(centred_unit(a) * centred_unit(b), axis=1)


def nearest_training(images: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(similarity [N], index [N]) of each image's nearest training image."""
    sims = centred_unit(images) @ centred_unit(train).T
    idx = np.argmax(sims, axis=1)
    return sims[np.arange(len(images)), idx], idx


def caption_variants(objects: Sequence[toy.ShapeSpec], count: int, seed: int) -> np.ndarray:
    """uint8 [count,16,16,3]: fresh images that satisfy the caption of ``objects`` (same colours,
    shapes, positions; random background, sizes and jitter), as a generalizing model would draw."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        objs = [
            dataclasses.replace(o, size=int(rng.choice(toy.SHAPE_SIZES)),
                                jitter=(int(rng.integers(-toy.JITTER, toy.JITTER + 1)), int(rng.integers(-toy.JITTER, toy.JITTER + 1))))
            for o in objects
        ]
        out.append(toy.render(objs, str(rng.choice(list(toy.BACKGROUNDS)))))
    return np.stack(out)


def copy_threshold(dataset: toy.ToyDataset, count: int = 2000, quantile: float = 0.99, seed: int = 0) -> float:
    """Similarity above which an output counts as a copy of its duplicated image: the
    ``quantile`` of the similarity between each duplicated image and fresh non-identical images
    satisfying its caption (:func:`caption_variants`), over all memorized captions."""
    sims = []
    for i in np.nonzero(dataset.memorized)[0]:
        variants = caption_variants(dataset.objects[i], count // max(dataset.num_memorized, 1), seed + int(i))
        keep = np.any(variants.reshape(len(variants), -1) != dataset.images[i].reshape(1, -1), axis=1)
        sims.append(similarity(variants[keep], np.repeat(dataset.images[i][None], keep.sum(), 0)))
    return float(np.quantile(np.concatenate(sims), quantile))


def layout_iou(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean over the reference's object colours of the IoU between the pixels of that colour in
    ``image`` and in ``reference`` (nearest-palette classes): 1 when the objects are reproduced
    exactly (sizes, shapes, placement), whatever the background."""
    a, b = classify_colours(image), classify_colours(reference)
    colours = [c for c in np.unique(b) if c < len(toy.COLOURS)]
    if not colours:
        return float("nan")
    return float(np.mean([np.sum((a == c) & (b == c)) / max(np.sum((a == c) | (b == c)), 1) for c in colours]))


def layout_threshold(dataset: toy.ToyDataset, count: int = 2000, quantile: float = 0.99, seed: int = 0) -> float:
    """Layout IoU above which the objects copy the duplicated image: the ``quantile`` of the layout
    IoU between each duplicated image and fresh caption-satisfying images whose objects differ
    from it (another size or placement), as :func:`copy_threshold` does for the whole image."""
    ious = []
    for i in np.nonzero(dataset.memorized)[0]:
        variants = caption_variants(dataset.objects[i], count // max(dataset.num_memorized, 1), seed + int(i))
        ref = dataset.images[i]
        same_layout = [np.array_equal(classify_colours(v) < len(toy.COLOURS), classify_colours(ref) < len(toy.COLOURS)) for v in variants]
        ious += [layout_iou(v, ref) for v, same in zip(variants, same_layout) if not same]
    return float(np.quantile(ious, quantile))


_PALETTE_NAMES = list(toy.COLOURS) + [f"bg:{b}" for b in toy.BACKGROUNDS]
_PALETTE = np.asarray(list(toy.COLOURS.values()) + list(toy.BACKGROUNDS.values()), np.float32)


def classify_colours(image: np.ndarray) -> np.ndarray:
    """int [H,W]: index into the palette (toy colours, then backgrounds) of each pixel's nearest colour."""
    d = np.sum(np.square(np.asarray(image, np.float32)[:, :, None, :] - _PALETTE[None, None]), axis=-1)
    return np.argmin(d, axis=-1)


def _templates():
    out = []
    for shape in toy.SHAPES:
        for size in toy.SHAPE_SIZES:
            out.append((shape, size, toy.shape_mask(shape, size, (8, 8), 16)))
    return out


_TEMPLATES = None


def object_checks(image: np.ndarray, obj: toy.ShapeSpec) -> tuple[bool, bool]:
    """(colour-at-position ok, shape ok) for one captioned object, from pixels.

    Colour: at least 5 of the 3x3 pixels at the captioned position have the caption's colour as
    their nearest palette colour. Shape: the pixels of that colour within 5 px of the position,
    matched against every (shape, size, +-2 px offset) template; the best IoU names the shape.
    """
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _templates()
    labels = classify_colours(image)
    target = list(toy.COLOURS).index(obj.colour)
    r, c = toy.POSITIONS[obj.position]
    window = labels[r - 1: r + 2, c - 1: c + 2]
    colour_ok = int(np.sum(window == target)) >= 5
    mask = labels == target
    rows, cols = np.mgrid[0:16, 0:16]
    near = (np.abs(rows + 0.5 - r) <= 5.5) & (np.abs(cols + 0.5 - c) <= 5.5)
    mask = mask & near
    if not mask.any():
        return colour_ok, False
    best, best_shape = -1.0, None
    for shape, _size, tmpl in _TEMPLATES:
        for dr in range(-2, 3):
            for dc in range(-2, 3):
                t = np.roll(np.roll(tmpl, r - 8 + dr, axis=0), c - 8 + dc, axis=1) & near
                inter = np.sum(t & mask)
                iou = inter / max(np.sum(t | mask), 1)
                if iou > best:
                    best, best_shape = iou, shape
    return colour_ok, best_shape == obj.shape


def alignment(image: np.ndarray, objects: Sequence[toy.ShapeSpec]) -> float:
    """Fraction of the caption's attribute checks (colour at position, shape; per object) passed."""
    checks = [ok for obj in objects for ok in object_checks(image, obj)]
    return float(np.mean(checks))


# ----------------------------------------------------------------------------- model


def load_demo_pipeline(model: str | None, log=print):
    """(Pipeline, description, is_toy): the shipped toy, a given pixel-model folder, or - when the
    shipped weights are missing - cfgbasin_jax.models.tiny.random_components() with a notice."""
    from cfgbasin_jax.models.loading import is_pixel_model, load_pixel_components
    from cfgbasin_jax.pipeline import Pipeline

    path = Path(model) if model else SHIPPED_MODEL
    if is_pixel_model(path):
        return Pipeline(load_pixel_components(path)), f"toy model {path}", True
    if model:
        raise ValueError(f"--model {model}: not a pixel-model folder (needs model.json + params.safetensors)")
    from cfgbasin_jax.models.tiny import random_components

    log(
        "NOTICE: the shipped toy weights are not there (" + str(path) + "); falling back to "
        "cfgbasin_jax.models.tiny.random_components(): a RANDOM untrained model. The numbers below say "
        "nothing about memorization."
    )
    return Pipeline(random_components()), "random tiny model (fallback: shipped toy weights missing)", False


def method_guidance(name: str, scale: float, stp_t: int, og_t: int, og_scale: float):
    """The registry method ``name`` (:mod:`cfgbasin_jax.method.registry`) with the demo's settings: CFG scale
    ``scale`` everywhere, STP at ``stp_t``, the opposite-guidance methods at ``og_scale`` (OG+STP at ``og_t``)."""
    method = M.get(name)
    params = {"scale": scale}
    if method.name == "stp":
        params["t"] = stp_t
    if method.name in ("og-stp", "og-dtp"):
        params.update(before=og_scale, t=og_t if method.name == "og-stp" else None)
    return method.guidance(**params)


def generate_method(pipe, name: str, prompts: list, guidance, **kwargs):
    """``pipe.generate`` for a transition method, or the baseline ``name`` (its UNet cost included)."""
    from cfgbasin_jax import baselines as B

    method = M.get(name).name
    if method == "wen":
        return B.wen_generate(pipe, prompts, guidance, **kwargs)[0]
    if method == "cads":
        return pipe.generate(prompts, guidance, conditioning=B.CADS(), **kwargs)
    if method == "prompt-augmentation":  # every sample draws its own 4 repeated words (keyed by its batch position)
        prompts = B.augment_prompts(prompts, "rand_word_repeat", 4, seed=kwargs.get("seed", 0))
    return pipe.generate(prompts, guidance, **kwargs)


def first_local_min_t(noise_diff: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """int [B]: timestep of each row's first strict local minimum of ||eps_c - eps_u|| (the DTP
    rule); -1 where there is none."""
    out = []
    for d in noise_diff:
        idx = [k for k in range(1, len(d) - 1) if d[k - 1] > d[k] < d[k + 1]]
        out.append(int(timesteps[idx[0]]) if idx else -1)
    return np.asarray(out)


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


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def _plot_traces(path: Path, runs: dict, n_mem: int, stp_t: int, og_t: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in ("CFG", "DTP") if m in runs]
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
        if name == "DTP":
            title += " (grey lines: detected transitions)"
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- the demo


@dataclasses.dataclass
class DemoConfig:
    outdir: str = "cfgbasin_demo_out"
    model: str | None = None
    guidance: float = 4.0
    num_mem_prompts: int = 8
    num_plain_prompts: int = 8
    samples_per_prompt: int = 4
    steps: int = 20
    scheduler: str = "ddim"
    seed: int = 0
    stp_t: int | None = None
    og_t: int | None = None
    og_scale: float = -2.0
    methods: tuple = METHODS


def _prompt_set(ds: toy.ToyDataset, cfg: DemoConfig):
    mem_idx = np.nonzero(ds.memorized)[0][: cfg.num_mem_prompts]
    prompts = [(ds.captions[i], list(ds.objects[i]), int(i)) for i in mem_idx]
    for objs in toy.plain_prompts(cfg.num_plain_prompts, cfg.seed, exclude=ds.captions[: ds.num_memorized]):
        prompts.append((toy.caption_of(objs), objs, -1))
    return prompts


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Generate, measure, write the report. Returns {"rows", "report", "stp_t", "og_t", ...}."""
    out = Path(cfg.outdir)
    out.mkdir(parents=True, exist_ok=True)
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

    runs: dict = {}
    stp_t, og_t = cfg.stp_t, cfg.og_t
    order = ["CFG"] + [m for m in cfg.methods if m != "CFG"]
    for name in order:
        if name not in cfg.methods and name != "CFG":
            continue
        if name != "CFG" and stp_t is None:
            # Transition from the measured curve: the median timestep of the first local minimum
            # of ||eps_c - eps_u|| under constant CFG (what DTP detects), over all samples.
            tmin = first_local_min_t(runs["CFG"]["result"].noise_diff, runs["CFG"]["result"].timesteps)
            tmin = tmin[tmin >= 0]
            stp_t = int(np.median(tmin)) if tmin.size else 500
        if stp_t is not None and og_t is None:
            og_t = int(round(stp_t + 0.3 * (1000 - stp_t)))  # the paper's 650 for its 500
        g = method_guidance(name, cfg.guidance, stp_t or 500, og_t or 650, cfg.og_scale)
        t0 = time.perf_counter()
        compiles = pipe.compile_count()
        res = generate_method(pipe, name, batch_prompts, g, num_inference_steps=cfg.steps, seed=cfg.seed,
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
        }
        rows.append(row)
        grid_rows = []
        for i, (caption, objs, mem_index) in enumerate(prompts):
            ref = train_images[mem_index] if mem_index >= 0 else np.full((16, 16, 3), 255, np.uint8)
            grid_rows.append([ref] + [imgs[i * k + j] for j in range(k)])
        _save_png(_grid(grid_rows), out / f"grid_{name.replace('+', '_')}.png")
        runs[name]["nn_sim"] = nn_sim
    _plot_traces(out / "noise_diff.png", runs, n_mem * k, stp_t or 500, og_t or 650)

    table = format_table(rows)
    report = _report_text(cfg, model_desc, is_toy, threshold, lay_threshold, prompts, n_mem, stp_t, og_t, table, time.perf_counter() - t_start)
    (out / "report.md").write_text(report, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"rows": rows, "copy_threshold": threshold, "layout_threshold": lay_threshold, "stp_t": stp_t, "og_t": og_t,
                                                   "model": model_desc, "config": dataclasses.asdict(cfg)}, indent=2, default=str), encoding="utf-8")
    return {"rows": rows, "table": table, "report": out / "report.md", "stp_t": stp_t, "og_t": og_t,
            "threshold": threshold, "is_toy": is_toy, "runs": runs}


def format_table(rows: list[dict]) -> str:
    head = ("| method | copies (mem) | layout copies (mem) | sim to dup. (mem) | p95 NN sim (mem) | p95 NN sim (plain) | "
            "alignment (mem) | alignment (plain) | UNet evals/sample | wall s | median transition t |")
    sep = "|" + "---|" * 11
    lines = [head, sep]
    for r in rows:
        tt = "-" if np.isnan(r["transition_t_median"]) else f"{r['transition_t_median']:.0f}"
        wall = f"{r['wall_s']:.1f}" + ("*" if r["compiled"] else "")
        lines.append(
            f"| {r['method']} | {r['copy_rate_mem']:.0%} | {r['layout_copy_rate_mem']:.0%} | {r['sim_own_mem']:.3f} | {r['p95_nn_mem']:.3f} | "
            f"{r['p95_nn_plain']:.3f} | {r['align_mem']:.2f} | {r['align_plain']:.2f} | "
            f"{r['unet_evals_per_sample']:.1f} | {wall} | {tt} |"
        )
    return "\n".join(lines)


def _report_text(cfg, model_desc, is_toy, threshold, lay_threshold, prompts, n_mem, stp_t, og_t, table, total_s) -> str:
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
    )
    return f"""# cfgbasin-demo report

Model: {model_desc}{notice}
Sampler: {cfg.scheduler}, {cfg.steps} steps, seed {cfg.seed}; {cfg.samples_per_prompt} samples per prompt, the same
initial noise for every prompt and method. Total time {total_s:.0f} s.

## Methods
{method_lines}
STP's t is the median timestep of the first local minimum of ||eps_c - eps_u|| measured under constant CFG
(unless --stp_t is given); OG+STP's t = t_STP + 0.3 (1000 - t_STP) (the paper's 650 for 500).

## Results

{table}

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

{chr(10).join(f'![{m}](grid_{m.replace("+", "_")}.png)' + chr(10) + f'*{m}*' + chr(10) for m in METHODS if m in cfg.methods)}
## Noise difference ||eps_c - eps_u||

![noise difference](noise_diff.png)

## Prompts
{plist}
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cfgbasin-demo", description="The attraction-basin demo on the shipped toy model (offline, CPU).")
    p.add_argument("--outdir", default="cfgbasin_demo_out")
    p.add_argument("--model", default=None, help="a pixel-model folder (default: the shipped toy)")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale after the transition (and for constant CFG)")
    p.add_argument("--num_mem_prompts", type=int, default=8)
    p.add_argument("--num_plain_prompts", type=int, default=8)
    p.add_argument("--samples_per_prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm++2m", "euler", "pndm"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stp_t", type=int, default=None, help="STP transition timestep (default: measured)")
    p.add_argument("--og_t", type=int, default=None, help="OG+STP transition timestep (default: from STP's)")
    p.add_argument("--og_scale", type=float, default=-2.0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    return p


class DemoError(ValueError):
    """Bad demo input (one line naming the flag)."""


def check_config(cfg: DemoConfig) -> None:
    """Every flag, checked before anything is computed or written (DemoError naming the flag)."""
    from cfgbasin_jax.runs import files as F
    from cfgbasin_jax.toy.train import is_pixel_model

    for name in ("num_mem_prompts", "num_plain_prompts", "samples_per_prompt", "steps"):
        minimum = 3 if name == "steps" else (1 if name == "samples_per_prompt" else 0)
        if getattr(cfg, name) < minimum:
            raise DemoError(f"--{name} must be >= {minimum}, got {getattr(cfg, name)}")
    if cfg.num_mem_prompts + cfg.num_plain_prompts < 1:
        raise DemoError("--num_mem_prompts and --num_plain_prompts are both 0: nothing to sample")
    for name in ("guidance", "og_scale"):
        if not np.isfinite(getattr(cfg, name)):
            raise DemoError(f"--{name} must be a finite number, got {getattr(cfg, name)}")
    path = Path(cfg.model) if cfg.model else SHIPPED_MODEL
    if cfg.model and not is_pixel_model(path):
        raise DemoError(f"--model {cfg.model}: not a pixel-model folder (needs model.json + params.safetensors)")
    num_train = 1000
    if is_pixel_model(path):
        try:
            meta = json.loads((path / "model.json").read_text(encoding="utf-8"))
            num_train = int(meta["configs"]["scheduler"].get("num_train_timesteps", 1000))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DemoError(f"{path / 'model.json'}: cannot read the scheduler config ({err})") from None
    if cfg.steps > num_train:
        raise DemoError(f"--steps {cfg.steps} must be <= {num_train} (the model's num_train_timesteps)")
    for name in ("stp_t", "og_t"):
        value = getattr(cfg, name)
        if value is not None and not 0 <= value < num_train:
            raise DemoError(f"--{name} {value} must be a timestep in [0, {num_train - 1}]")
    try:
        F.check_writable_dir(cfg.outdir, "--outdir")
    except F.FileError as err:
        raise DemoError(str(err)) from None


def main(argv=None) -> int:
    from cfgbasin_jax.runs import files as F

    args = build_parser().parse_args(argv)
    cfg = DemoConfig(**{**vars(args), "methods": tuple(args.methods)})
    try:
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
