"""Memorization detection score of Wen et al. (ICLR 2024) from the sampler's trace, and ROC helpers.

The score of a generation is the magnitude ``||eps_c - eps_u||`` (text-conditional minus
unconditional noise prediction, L2 over the whole latent) averaged over the first ``first_steps``
sampling steps. The sampler already records that magnitude per step (``result.noise_diff``), so the
score costs no UNet work. Steps where one half was skipped (NaN) are left out of the average.

The gated rule (:func:`cfgbasin_jax.method.guidance.gated`) computes the same score inside the loop;
:func:`cfgbasin_jax.pipeline.calibrate_threshold` sets its threshold from prompts known to be plain.
"""

from __future__ import annotations

import numpy as np

DEFAULT_FPR = 0.01
"""The gate's default false-positive rate on plain prompts: its threshold is their 99th percentile."""


def detection_score(noise_diff, first_steps: int = 1, step_axis: int = -1) -> np.ndarray:
    """noise_diff float [B,S] (steps on ``step_axis``; NaN where not computed) -> float64 [B]:
    mean of the finite values among the first ``first_steps`` steps (NaN if none are finite)."""
    d = np.moveaxis(np.asarray(noise_diff, dtype=np.float64), step_axis, -1)
    if d.ndim != 2:
        raise ValueError(f"noise_diff must be [B, steps], got shape {d.shape}")
    if not 1 <= first_steps <= d.shape[-1]:
        raise ValueError(f"first_steps must be in [1, {d.shape[-1]}], got {first_steps}")
    window = d[:, :first_steps]
    finite = np.isfinite(window)
    counts = finite.sum(axis=-1)
    sums = np.where(finite, window, 0.0).sum(axis=-1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _check_scores(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(x)))} non-finite scores")
    return x


def roc_auc(positive, negative) -> float:
    """Area under the ROC curve for "higher score = positive" (memorized), ties counted as 1/2.

    Equals P(s_pos > s_neg) + 0.5 P(s_pos == s_neg) over all pairs (Mann-Whitney U / (n_pos n_neg)),
    computed from mid-ranks in O((n+m) log(n+m)).
    """
    pos, neg = _check_scores("positive", positive), _check_scores("negative", negative)
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    sorted_v = allv[order]
    ranks = np.empty(allv.size, dtype=np.float64)
    # mid-rank of each run of equal values (ranks start at 1)
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], allv.size]
    mid = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mid, ends - starts)
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def tpr_at_fpr(positive, negative, fpr: float = 0.01) -> float:
    """True-positive rate at the strictest threshold whose false-positive rate is <= ``fpr``
    (flagging ``score > threshold``)."""
    pos, neg = _check_scores("positive", positive), _check_scores("negative", negative)
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    # candidate thresholds: every negative score, and -inf (flag all)
    neg_sorted = np.sort(neg)[::-1]
    allowed = int(np.floor(fpr * neg.size + 1e-12))  # negatives we may flag
    threshold = neg_sorted[allowed] if allowed < neg.size else -np.inf
    return float(np.mean(pos > threshold))


def threshold_at_fpr(scores, fpr: float = DEFAULT_FPR) -> float:
    """The threshold above which at most about ``fpr`` of ``scores`` [N] (of prompts known to be
    plain) lie: their ``1 - fpr`` quantile, numpy's linear interpolation (fpr 0.01: the 99th
    percentile)."""
    x = _check_scores("plain-prompt scores", scores)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return float(np.quantile(x, 1.0 - fpr))
