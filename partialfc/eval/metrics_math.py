"""Score-to-number math shared by the verification sets and the IJB 1:1 protocol.

Everything here takes similarity ``scores`` (higher means "same identity", e.g. the
cosine of two embeddings) and boolean ``issame`` labels, and predicts "same" when
``score >= threshold``.

- ``kfold_threshold_accuracy``: the LFW protocol. Contiguous folds (the split of
  sklearn's ``KFold(shuffle=False)``); on each fold the threshold that is best on the
  other folds is applied. Instead of a fixed grid, every cut between two distinct
  sorted scores is tried (the midpoint is used), so the result does not depend on
  the grid step and is exact on a hand-checkable case.
- ``roc_curve`` and ``tar_at_far``: TAR at a FAR is the best true-accept rate of any
  threshold whose false-accept rate does not exceed the target; a FAR below
  ``1 / num_negatives`` cannot be measured and is reported as missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

__all__ = [
    "KFoldResult",
    "best_threshold",
    "kfold_threshold_accuracy",
    "roc_curve",
    "tar_at_far",
    "format_far",
]


def _check_scores(scores, issame) -> Tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(issame).reshape(-1)
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"issame must hold booleans or 0/1, got values {np.unique(labels)[:5]}")
        labels = labels.astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and issame {labels.shape} differ in length")
    if scores.size == 0:
        raise ValueError("no pairs to evaluate")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores hold {int((~np.isfinite(scores)).sum())} non-finite values")
    return scores, labels


def best_threshold(scores, issame) -> Tuple[float, float]:
    """The threshold with the highest accuracy on these pairs: ``(threshold, accuracy)``.

    Cuts are tried in order of decreasing threshold; among equally accurate cuts the
    first (strictest) one wins.
    """
    scores, labels = _check_scores(scores, issame)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    count = scores.size
    # Cut i predicts the top i pairs as "same": i = 0 .. count.
    true_accepts = np.concatenate(([0], np.cumsum(sorted_labels)))
    accepted = np.arange(count + 1)
    negatives = count - int(labels.sum())
    true_rejects = negatives - (accepted - true_accepts)
    correct = true_accepts + true_rejects
    # A cut inside a run of equal scores cannot be realised by any threshold.
    valid = np.ones(count + 1, dtype=bool)
    valid[1:count] = sorted_scores[:-1] != sorted_scores[1:]
    correct = np.where(valid, correct, -1)
    cut = int(np.argmax(correct))
    if cut == 0:
        threshold = float(np.nextafter(sorted_scores[0], np.inf))
    elif cut == count:
        threshold = float(sorted_scores[-1])
    else:
        threshold = float(0.5 * (sorted_scores[cut - 1] + sorted_scores[cut]))
    return threshold, float(correct[cut]) / count


@dataclass(frozen=True)
class KFoldResult:
    """Cross-validated accuracy: mean and std over folds, and the mean chosen threshold."""

    accuracy: float
    std: float
    threshold: float
    fold_accuracies: Tuple[float, ...]
    fold_thresholds: Tuple[float, ...]


def kfold_threshold_accuracy(scores, issame, num_folds: int = 10) -> KFoldResult:
    """LFW-style k-fold accuracy: threshold fit on k-1 folds, accuracy on the held-out one."""
    scores, labels = _check_scores(scores, issame)
    if not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"num_folds must be an int >= 2, got {num_folds!r}")
    if scores.size < num_folds:
        raise ValueError(f"{scores.size} pairs cannot be split into {num_folds} folds")
    fold_indices = np.array_split(np.arange(scores.size), num_folds)
    accuracies, thresholds = [], []
    for test_index in fold_indices:
        train_mask = np.ones(scores.size, dtype=bool)
        train_mask[test_index] = False
        threshold, _ = best_threshold(scores[train_mask], labels[train_mask])
        predicted = scores[test_index] >= threshold
        accuracies.append(float(np.mean(predicted == labels[test_index])))
        thresholds.append(threshold)
    return KFoldResult(
        accuracy=float(np.mean(accuracies)),
        std=float(np.std(accuracies)),
        threshold=float(np.mean(thresholds)),
        fold_accuracies=tuple(accuracies),
        fold_thresholds=tuple(thresholds),
    )


def _roc_counts(scores: np.ndarray, labels: np.ndarray):
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"a ROC needs both classes: {positives} positive, {negatives} negative pairs")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # Keep the last index of each run of equal scores: a threshold accepts all or none of a run.
    last_of_run = np.r_[sorted_scores[:-1] != sorted_scores[1:], True]
    true_accepts = np.r_[0, np.cumsum(sorted_labels)[last_of_run]]
    false_accepts = np.r_[0, np.cumsum(~sorted_labels)[last_of_run]]
    thresholds = np.r_[np.inf, sorted_scores[last_of_run]]
    return true_accepts, false_accepts, thresholds, positives, negatives


def roc_curve(scores, issame) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(far, tar, thresholds)`` at every distinct score, thresholds decreasing.

    Point ``j`` accepts pairs with ``score >= thresholds[j]``. The curve starts at
    (0, 0) with threshold +inf.
    """
    scores, labels = _check_scores(scores, issame)
    true_accepts, false_accepts, thresholds, positives, negatives = _roc_counts(scores, labels)
    return false_accepts / negatives, true_accepts / positives, thresholds


def tar_at_far(
    scores, issame, fars: Iterable[float]
) -> Dict[float, Optional[Tuple[float, float]]]:
    """For each target FAR: ``(tar, threshold)`` of the best operating point, or None.

    None means the FAR is finer than one false accept among the negatives, so it
    cannot be measured on these pairs. Counts are compared as integers so that
    e.g. 3 false accepts of 3000 negatives sit exactly at FAR 1e-3.
    """
    scores, labels = _check_scores(scores, issame)
    true_accepts, false_accepts, thresholds, positives, negatives = _roc_counts(scores, labels)
    out: Dict[float, Optional[Tuple[float, float]]] = {}
    for target in fars:
        target = float(target)
        if not 0.0 < target <= 1.0:
            raise ValueError(f"FAR must be in (0, 1], got {target}")
        allowed_false_accepts = int(np.floor(target * negatives * (1.0 + 1e-9)))
        if allowed_false_accepts < 1:
            out[target] = None
            continue
        # false_accepts is non-decreasing; the last point within budget has the highest TAR.
        index = int(np.searchsorted(false_accepts, allowed_false_accepts, side="right")) - 1
        out[target] = (float(true_accepts[index]) / positives, float(thresholds[index]))
    return out


def format_far(far: float) -> str:
    """``1e-4`` -> ``"1e-04"``: the key used in logs and tables."""
    return f"{far:.0e}"
