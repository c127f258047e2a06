"""Plots (matplotlib, Agg backend; nothing is shown on screen).

Noise-difference traces: ``||eps_c - eps_u||`` per denoising step for each image, with the detected
transition step marked: the signal the paper's dynamic transition point watches (its first local
minimum). Steps where one UNet half was skipped (scale 0 or 1 for the whole batch) have no value
and leave a gap. Training curves: :func:`plot_training_logs` of a training run's CSV logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _as_trace(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def plot_noise_diff(
    traces: Sequence[Sequence[float | None]],
    transition_index: Sequence[int],
    path,
    labels: Sequence[str] | None = None,
    title: str = "",
    max_lines: int = 200,
) -> Path:
    """Write one figure: trace i (float [S], None/NaN = not computed) against the step index, a
    marker at ``transition_index[i]`` (-1: none). At most ``max_lines`` traces are drawn."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    many = len(traces) > 10
    for k, (trace, index) in enumerate(list(zip(traces, transition_index))[:max_lines]):
        y = _as_trace(trace)
        label = None if many or labels is None else labels[k]
        (line,) = ax.plot(np.arange(len(y)), y, lw=0.8 if many else 1.5, alpha=0.5 if many else 1.0, label=label)
        if 0 <= index < len(y) and np.isfinite(y[index]):
            ax.plot([index], [y[index]], "o", color=line.get_color(), ms=4)
        elif 0 <= index < len(y):
            ax.axvline(index, color=line.get_color(), lw=0.6, ls="--")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("||eps_cond - eps_uncond||")
    shown = min(len(traces), max_lines)
    ax.set_title(title or f"noise difference, {shown} image(s); o = transition")
    if labels is not None and not many and len(traces):
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path, dpi=None) -> Path:
    """Write ``fig`` to ``path`` as a whole (a temporary sibling, then a rename) and close it."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_run(records: Sequence[dict], path, title: str = "") -> Path:
    """All images of a run from their metadata records (keys noise_diff, transition_index, index)."""
    return plot_noise_diff(
        [r.get("noise_diff") or [] for r in records],
        [int(r.get("transition_index", -1)) for r in records],
        path,
        labels=[str(r["index"]) for r in records],
        title=title,
    )


def plot_image(record: dict, path) -> Path:
    """One image's trace, titled with its index, transition and prompt."""
    prompt = str(record.get("prompt", ""))
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    title = f"#{record['index']}  transition {record.get('transition_index', -1)} (t={record.get('transition_t', -1)})\n{prompt}"
    return plot_noise_diff([record.get("noise_diff") or []], [int(record.get("transition_index", -1))], path, title=title)


def plot_training_logs(output_dir, path) -> Path:
    """PNG of a training run's loss_log.csv (batch loss, memorized vs other, moving average) and
    probe_log.csv (:mod:`cfgbasin_jax.training`), e.g. the shipped toy's training_curves.png."""
    plt = _pyplot()
    out = Path(output_dir)
    loss = np.genfromtxt(out / "loss_log.csv", delimiter=",", names=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    k = max(1, len(loss) // 40)
    smooth = lambda v: np.convolve(v, np.ones(k) / k, mode="valid")  # noqa: E731
    steps = loss["step"][k - 1:]
    axes[0].plot(steps, smooth(loss["loss_memorized"]), label="memorized (duplicated) samples", color="tab:red")
    axes[0].plot(steps, smooth(loss["loss_other"]), label="other samples", color="tab:blue")
    axes[0].set_title("training batch loss (moving average)")
    probe_path = out / "probe_log.csv"
    if probe_path.is_file():
        probe = np.atleast_1d(np.genfromtxt(probe_path, delimiter=",", names=True))
        axes[1].plot(probe["step"], probe["probe_memorized"], "o-", color="tab:red", label="memorized images")
        axes[1].plot(probe["step"], probe["probe_other"], "o-", color="tab:blue", label="64 other training images")
        axes[1].set_title("probe loss (fixed noise, 10 timesteps)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend()
    return _save(plt, fig, Path(path), dpi=80)
