"""Which records a sub-center ArcFace model says are noise, and the dense relabelling.

ArcFace TPAMI (sub-center section): with K >= 2 sub-centers per identity, clean faces
gather around one sub-center -- the *dominant* one, the sub-center that is nearest to
the largest number of the identity's samples -- while mislabelled faces either sit
near a minor sub-center or far from all of them. A sample is therefore judged by its
angle to its identity's dominant sub-center, not to whichever sub-center it is
nearest to: being close to a minor sub-center is exactly the symptom of noise.

Everything here is plain numpy on arrays already in memory, so it is unit-testable
and independent of how the embeddings were produced.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Drop reasons, stored per sample as small ints (KEPT = not dropped).
KEPT, DROP_ANGLE, DROP_MIN_SAMPLES = 0, 1, 2
REASON_NAMES = {DROP_ANGLE: "angle", DROP_MIN_SAMPLES: "min_samples"}

_ROWS_PER_CHUNK = 65536  # bounds the (rows, K, D) gather of centers


@dataclass(frozen=True)
class Selection:
    """The cleaning decision for every sample and identity.

    Per sample (N): ``nearest_subcenter``, ``angle_deg`` (to the dominant sub-center of
    its label), ``reason`` (``KEPT`` or a drop reason), ``new_labels`` (-1 if dropped).
    Per identity (C): ``dominant_subcenter`` (-1 if it has no samples),
    ``samples_before``, ``samples_after``, ``old_to_new`` (-1 if dropped).
    """

    nearest_subcenter: np.ndarray
    angle_deg: np.ndarray
    reason: np.ndarray
    new_labels: np.ndarray
    dominant_subcenter: np.ndarray
    samples_before: np.ndarray
    samples_after: np.ndarray
    old_to_new: np.ndarray

    @property
    def keep(self) -> np.ndarray:
        return self.reason == KEPT

    @property
    def num_new_classes(self) -> int:
        return int(np.count_nonzero(self.old_to_new >= 0))


def normalize_rows(array: np.ndarray) -> np.ndarray:
    """Unit L2 norm along the last axis, in float32; zero rows stay zero."""
    array = np.asarray(array, dtype=np.float32)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    return array / np.maximum(norms, np.float32(1e-12))


def cosines_to_own_subcenters(embeddings: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """``(N, K)``: cosine of each sample to each sub-center of its own label."""
    embeddings = normalize_rows(embeddings)
    centers = normalize_rows(centers)
    out = np.empty((embeddings.shape[0], centers.shape[1]), np.float32)
    for start in range(0, embeddings.shape[0], _ROWS_PER_CHUNK):
        stop = start + _ROWS_PER_CHUNK
        own = centers[labels[start:stop]]  # (rows, K, D)
        out[start:stop] = np.einsum("nkd,nd->nk", own, embeddings[start:stop])
    return out


def check_inputs(embeddings: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> None:
    if centers.ndim != 3:
        raise ValueError(f"centers must be (num_classes, K, D), got shape {centers.shape}")
    num_classes, num_subcenters, dim = centers.shape
    if num_subcenters < 2:
        raise ValueError(f"cleaning needs sub-centers (K >= 2); the centers have K = {num_subcenters}")
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise ValueError(f"embeddings must be (N, {dim}) to match the centers, got shape {embeddings.shape}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f"labels must be ({embeddings.shape[0]},), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(f"label {int(bad)} is outside [0, num_classes={num_classes})")
    if not np.isfinite(embeddings).all():
        row = int(np.flatnonzero(~np.isfinite(embeddings).all(axis=1))[0])
        raise ValueError(f"embedding row {row} is not finite")


def select_clean(embeddings: np.ndarray, labels: np.ndarray, centers: np.ndarray,
                 threshold_deg: float = 75.0, min_samples: int = 1) -> Selection:
    """Decide, for ``N`` samples with ``labels`` in ``[0, C)``, what to keep.

    1. nearest sub-center of every sample (ties: lowest k);
    2. dominant sub-center of every identity: the k chosen as nearest by most of its
       samples (ties: lowest k);
    3. drop samples whose angle to the dominant sub-center exceeds ``threshold_deg``;
    4. drop identities left with fewer than ``min_samples`` samples (and their samples);
    5. relabel the surviving identities densely, in old-label order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    centers = np.asarray(centers, dtype=np.float32)
    check_inputs(np.asarray(embeddings), labels, centers)
    if not 0.0 < threshold_deg <= 180.0:
        raise ValueError(f"threshold_deg must be in (0, 180], got {threshold_deg}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    num_classes, num_subcenters, _ = centers.shape

    cosines = cosines_to_own_subcenters(embeddings, labels, centers)
    nearest = np.argmax(cosines, axis=1) if labels.size else np.zeros(0, np.int64)
    votes = np.bincount(labels * num_subcenters + nearest,
                        minlength=num_classes * num_subcenters).reshape(num_classes, num_subcenters)
    samples_before = votes.sum(axis=1)
    dominant = np.where(samples_before > 0, np.argmax(votes, axis=1), -1)

    cos_dominant = cosines[np.arange(labels.size), dominant[labels]]
    angle_deg = np.degrees(np.arccos(np.clip(cos_dominant, -1.0, 1.0))).astype(np.float32)

    reason = np.where(angle_deg > threshold_deg, DROP_ANGLE, KEPT).astype(np.int8)
    survivors = np.bincount(labels[reason == KEPT], minlength=num_classes)
    too_small = (survivors > 0) & (survivors < min_samples)
    reason[(reason == KEPT) & too_small[labels]] = DROP_MIN_SAMPLES
    samples_after = np.where(too_small, 0, survivors)

    old_to_new = np.full(num_classes, -1, np.int64)
    alive = samples_after > 0
    old_to_new[alive] = np.arange(int(alive.sum()))
    new_labels = np.where(reason == KEPT, old_to_new[labels], -1)
    return Selection(nearest.astype(np.int64), angle_deg, reason, new_labels, dominant.astype(np.int64),
                     samples_before, samples_after, old_to_new)
