"""Fold/threshold accuracy and TAR@FAR against hand-computed cases and brute-force numpy."""
from __future__ import annotations

import numpy as np
import pytest

from partialfc.eval.metrics_math import (
    best_threshold,
    format_far,
    kfold_threshold_accuracy,
    roc_curve,
    tar_at_far,
)

# Hand case. Sorted: 0.9 T, 0.75 T, 0.6 F, 0.4 T, 0.2 F, 0.1 F. Accepting the top i pairs is
# right on 3, 4, 5, 4, 5, 4, 3 pairs for i = 0..6; the first best is i = 2, cut midway
# between 0.75 and 0.6.
HAND_SCORES = [0.9, 0.2, 0.75, 0.4, 0.6, 0.1]
HAND_ISSAME = [True, False, True, True, False, False]


def test_best_threshold_hand_case():
    threshold, accuracy = best_threshold(HAND_SCORES, HAND_ISSAME)
    assert threshold == pytest.approx(0.675)
    assert accuracy == pytest.approx(5 / 6)


def test_kfold_hand_case_two_folds():
    # Fold 1 trains on (0.4 T, 0.6 F, 0.1 F): accepting nothing and cutting at 0.25 tie at
    # 2 of 3; the strictest wins, a threshold just above 0.6. The test pairs
    # (0.9 T, 0.2 F, 0.75 T) are then all right: 3/3. Fold 2 trains on (0.9 T, 0.2 F, 0.75 T):
    # cut at 0.475; test (0.4 T, 0.6 F, 0.1 F) gets only 0.1 F right: 1/3.
    result = kfold_threshold_accuracy(HAND_SCORES, HAND_ISSAME, num_folds=2)
    assert result.fold_accuracies == pytest.approx((1.0, 1 / 3))
    assert result.accuracy == pytest.approx(2 / 3) and result.std == pytest.approx(1 / 3)
    assert result.fold_thresholds[0] > 0.6 and result.fold_thresholds[0] == pytest.approx(0.6)
    assert result.fold_thresholds[1] == pytest.approx(0.475)
    assert result.threshold == pytest.approx((0.6 + 0.475) / 2)


def _brute_force_threshold(scores, labels):
    """Every realisable cut, strictest first, by direct counting."""
    distinct = np.unique(scores)[::-1]
    candidates = [distinct[0] + 1e-9]
    candidates += [(high + low) / 2 for high, low in zip(distinct[:-1], distinct[1:])]
    candidates += [distinct[-1]]
    best, best_correct = None, -1
    for threshold in candidates:
        correct = sum(int((score >= threshold) == label) for score, label in zip(scores, labels))
        if correct > best_correct:
            best, best_correct = threshold, correct
    return best


def _brute_force_kfold(scores, labels, num_folds):
    size = len(scores)
    base, extra = divmod(size, num_folds)
    accuracies, start = [], 0
    for fold in range(num_folds):
        stop = start + base + (1 if fold < extra else 0)
        test = np.zeros(size, bool)
        test[start:stop] = True
        threshold = _brute_force_threshold(scores[~test], labels[~test])
        accuracies.append(np.mean((scores[test] >= threshold) == labels[test]))
        start = stop
    return np.mean(accuracies), np.std(accuracies)


@pytest.mark.parametrize("size, num_folds, seed", [(37, 10, 0), (203, 10, 1), (50, 3, 2)])
def test_kfold_matches_brute_force_on_random_overlapping_scores(size, num_folds, seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(size) < 0.5
    # Rounded scores: many ties, the case where a cut inside a run would be wrong.
    scores = np.round(np.where(labels, 0.7, 0.1) + 0.3 * rng.standard_normal(size), 1)
    result = kfold_threshold_accuracy(scores, labels, num_folds)
    expected_mean, expected_std = _brute_force_kfold(scores, labels, num_folds)
    assert result.accuracy == pytest.approx(expected_mean)
    assert result.std == pytest.approx(expected_std)
    assert 0.6 < result.accuracy < 1.0


def test_separable_scores_give_perfect_accuracy():
    rng = np.random.default_rng(3)
    labels = np.arange(300) % 2 == 0
    scores = np.where(labels, rng.uniform(0.6, 1.0, 300), rng.uniform(-0.3, 0.5, 300))
    result = kfold_threshold_accuracy(scores, labels)
    assert result.accuracy == 1.0 and result.std == 0.0
    assert 0.5 <= result.threshold <= 0.6


def test_tar_at_far_hand_case():
    negatives = np.arange(10) / 10.0  # 0.0 .. 0.9
    positives = np.array([0.95, 0.85, 0.5])
    scores = np.r_[negatives, positives]
    labels = np.r_[np.zeros(10, bool), np.ones(3, bool)]
    points = tar_at_far(scores, labels, [0.05, 0.1, 0.2, 1.0])
    assert points[0.05] is None  # finer than 1 of 10 negatives
    assert points[0.1][0] == pytest.approx(2 / 3) and points[0.1][1] == pytest.approx(0.85)
    assert points[0.2][0] == pytest.approx(2 / 3) and points[0.2][1] == pytest.approx(0.8)
    assert points[1.0][0] == pytest.approx(1.0)


def _brute_force_tar_at_far(scores, labels, far):
    positives, negatives = scores[labels], scores[~labels]
    allowed = np.floor(far * negatives.size + 1e-6)
    best = 0.0
    for threshold in np.r_[np.inf, np.unique(scores)]:
        if np.sum(negatives >= threshold) <= allowed:
            best = max(best, np.mean(positives >= threshold))
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_tar_at_far_and_roc_match_direct_numpy(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(2011) < 0.3
    scores = np.round(np.where(labels, 0.5, 0.0) + 0.25 * rng.standard_normal(labels.size), 3)
    fars = [1e-3, 3e-3, 1e-2, 1e-1]
    points = tar_at_far(scores, labels, fars)
    for far in fars:
        assert points[far][0] == pytest.approx(_brute_force_tar_at_far(scores, labels, far))
    far_curve, tar_curve, thresholds = roc_curve(scores, labels)
    assert np.all(np.diff(far_curve) >= 0) and np.all(np.diff(tar_curve) >= 0)
    picks = rng.choice(np.arange(1, thresholds.size), 25, replace=False)
    for index in picks:
        assert far_curve[index] == pytest.approx(np.mean(scores[~labels] >= thresholds[index]))
        assert tar_curve[index] == pytest.approx(np.mean(scores[labels] >= thresholds[index]))
    assert far_curve[-1] == 1.0 and tar_curve[-1] == 1.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="differ in length"):
        kfold_threshold_accuracy([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="non-finite"):
        best_threshold([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="cannot be split into 10 folds"):
        kfold_threshold_accuracy([0.1, 0.2], [True, False])
    with pytest.raises(ValueError, match=r"FAR must be in \(0, 1\], got 0.0"):
        tar_at_far([0.1, 0.2], [True, False], [0.0])
    assert format_far(1e-4) == "1e-04"
