"""Memorization and quality metrics in JAX: SSCD copy similarity, CLIP score, the Wen et al. detection
score with ROC helpers, and chunked nearest-neighbour search.

    from cfgbasin_jax.models import sscd, clip_score, detection, neighbors, images
"""

from cfgbasin_jax.metrics.detection import detection_score, roc_auc, threshold_at_fpr, tpr_at_fpr
from cfgbasin_jax.metrics.neighbors import nearest_neighbors

__all__ = ["detection_score", "nearest_neighbors", "roc_auc", "threshold_at_fpr", "tpr_at_fpr"]
