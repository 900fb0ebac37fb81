"""Rare-class metrics on real held-out data (single-label and multi-label)."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

__all__ = ["rare_class_metrics", "multilabel_rare_metrics"]


def rare_class_metrics(y_true, y_pred, rare: int, scores: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Recall, precision, F1 and support of class ``rare``; overall and balanced accuracy; and,
    with ``scores`` (N×C probabilities or logits), the rare class's average precision.

    Precision of a class never predicted is 0 (sklearn's ``zero_division=0``), so an arm that
    ignores the rare class scores 0, not NaN.
    """
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, precision_recall_fscore_support

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape}, y_pred {y_pred.shape}")
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[rare], zero_division=0)
    out = {
        "rare_recall": float(r[0]),
        "rare_precision": float(p[0]),
        "rare_f1": float(f[0]),
        "rare_support": int(s[0]),
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "rare_predicted": int(np.sum(y_pred == rare)),
    }
    if scores is not None:
        scores = np.asarray(scores)
        out["rare_average_precision"] = float(average_precision_score(y_true == rare, scores[:, rare]))
    return out


def multilabel_rare_metrics(y_true, scores, label: int, threshold: float = 0.5) -> Dict[str, float]:
    """Metrics of one finding in a multi-label problem (e.g. ChestX-ray14): ``y_true`` N×L
    multi-hot, ``scores`` N×L probabilities; the finding is positive where score ≥ threshold."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    t = y_true[:, label].astype(bool)
    pred = scores[:, label] >= threshold
    p, r, f, s = precision_recall_fscore_support(t, pred, labels=[True], zero_division=0)
    out = {
        "rare_recall": float(r[0]),
        "rare_precision": float(p[0]),
        "rare_f1": float(f[0]),
        "rare_support": int(s[0]),
        "rare_average_precision": float(average_precision_score(t, scores[:, label])) if t.any() else float("nan"),
        "accuracy": float(np.mean((scores >= threshold) == y_true.astype(bool))),
    }
    if t.any() and not t.all():
        out["rare_auroc"] = float(roc_auc_score(t, scores[:, label]))
    return out
