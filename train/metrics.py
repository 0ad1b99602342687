"""Classification metrics in plain numpy (no torch), the one implementation train, evaluate and reports use:
confusion matrix, per-class recall, balanced accuracy, dead classes, and the smoothed label mix.

Balanced accuracy is the mean recall over the classes present in the truth (as sklearn's), so a model that never
predicts Moderate or Severe cannot hide behind the Normal/Mild majority.
"""

from __future__ import annotations

import numpy as np

N_CLASSES = 3


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """Counts with rows = truth, columns = prediction."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each class; NaN for a class absent from the truth."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def balanced_accuracy(cm: np.ndarray) -> float:
    recall = per_class_recall(cm)
    return float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan")


def prediction_counts(y_pred: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    return np.bincount(np.asarray(y_pred, dtype=np.int64), minlength=n_classes)


def dead_classes(y_pred: np.ndarray, min_count: int = 3, n_classes: int = N_CLASSES) -> list[int]:
    """Classes predicted fewer than `min_count` times: the model has (nearly) stopped using them."""
    return [int(k) for k in np.flatnonzero(prediction_counts(y_pred, n_classes) < min_count)]


def smoothed_mix(counts) -> np.ndarray | None:
    """Label fractions with one pseudo-count per class (Laplace): a grade that a small training set lacks still gets
    a probability above 0, so a row filled with the prior can never score an infinite log loss."""
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + 1) / (counts.sum() + len(counts)) if counts.sum() else None


def finite(x: float | None, default: float) -> float:
    """x, or `default` when it is None, NaN or infinite (e.g. a selection key on an epoch with no score)."""
    return default if x is None or not np.isfinite(x) else float(x)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, min_count: int = 3) -> dict:
    """Everything the epoch summary needs from labels (N,) and probabilities (N, 3), as JSON-ready values."""
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred)
    recall = per_class_recall(cm)
    return {
        "ba": balanced_accuracy(cm),
        "recall": [None if np.isnan(r) else float(r) for r in recall],
        "pred_counts": prediction_counts(y_pred).tolist(),
        "confusion": cm.tolist(),
        "dead_classes": dead_classes(y_pred, min_count),
    }


def passes_v8_rule(recall: list[float | None], min_recall: float) -> bool:
    """v8's checkpoint rule: Moderate and Severe recall both at least `min_recall` (absent classes pass)."""
    return all(r is None or r >= min_recall for r in recall[1:])
