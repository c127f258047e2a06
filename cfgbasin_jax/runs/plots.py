"""Noise-difference trace plots (matplotlib, Agg backend; nothing is shown on screen).

``||eps_c - eps_u||`` per denoising step for each image, with the detected transition step marked:
the signal the paper's dynamic transition point watches (its first local minimum). Steps where one
UNet half was skipped (scale 0 or 1 for the whole batch) have no value and leave a gap.
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
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
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
