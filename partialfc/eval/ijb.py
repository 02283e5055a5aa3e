"""IJB-B / IJB-C style 1:1 template verification: TAR at FAR 1e-6 ... 1e-1 and a ROC plot.

In the IJB protocols a subject is a *template*: a set of images grouped into *media*
(one still photo, or the frames of one video). Frames of one video are nearly the
same picture, so features are averaged per media first and only then over the
template; otherwise a long video would outvote every still photo. Templates are
compared by cosine over a list of template pairs.

Inputs (the insightface IJB text layouts):

- per-image features, a ``.npy`` ``(N, D)`` in the order of the template/media file,
  or ``--checkpoint`` plus ``--image-dir`` of aligned 112 x 112 crops to compute them;
- template/media file: ``image_name template_id media_id`` per line;
- pair file: ``template_id_1 template_id_2 label`` per line (label 1 = same subject).

CLI::

    python -m partialfc.eval.ijb --templates T.txt --pairs P.txt (--features F.npy |
        --checkpoint CKPT --image-dir DIR) [--out-dir OUT] [--normalize-images]

Prints the TAR@FAR table and writes ``OUT/roc.png`` and ``OUT/tar_at_far.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from partialfc.atomic_io import atomic_output_path, atomic_write_text
from partialfc.eval.metrics_math import format_far, roc_curve, tar_at_far

__all__ = [
    "IJB_FARS",
    "read_template_media",
    "read_template_pairs",
    "template_features",
    "pair_scores",
    "roc_table",
    "save_roc_png",
    "main",
]

IJB_FARS: Tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SCORE_CHUNK = 1 << 17  # pairs scored per step; bounds memory on IJB-C's 15.6M pairs


def _read_columns(path: str, num_columns: int, layout: str) -> List[List[str]]:
    rows = []
    with open(path, "r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != num_columns:
                raise ValueError(f"{path}:{line_number}: expected '{layout}', got {line.strip()!r}")
            rows.append(tokens)
    if not rows:
        raise ValueError(f"{path}: file is empty")
    return rows


def _int_column(rows: List[List[str]], column: int, path: str, field: str) -> np.ndarray:
    try:
        return np.array([int(row[column]) for row in rows], dtype=np.int64)
    except ValueError:
        for line_index, row in enumerate(rows):
            if not row[column].lstrip("-").isdigit():
                raise ValueError(
                    f"{path}: record {line_index + 1}: {field} must be an int, got {row[column]!r}"
                ) from None
        raise


def read_template_media(path: str) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``(image_names, template_ids, media_ids)`` from ``image_name template_id media_id`` lines."""
    rows = _read_columns(path, 3, "image_name template_id media_id")
    names = [row[0] for row in rows]
    return names, _int_column(rows, 1, path, "template_id"), _int_column(rows, 2, path, "media_id")


def read_template_pairs(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(template_1, template_2, issame)`` from ``t1 t2 label`` lines."""
    rows = _read_columns(path, 3, "template_id_1 template_id_2 label")
    labels = _int_column(rows, 2, path, "label")
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise ValueError(f"{path}: record {bad[0] + 1}: label must be 0 or 1, got {labels[bad[0]]}")
    return _int_column(rows, 0, path, "template_id_1"), _int_column(rows, 1, path, "template_id_2"), labels == 1


def _group_sums(keys_sorted: np.ndarray, values_sorted: np.ndarray):
    """Sum consecutive rows with equal keys: ``(starts, sums)``."""
    starts = np.flatnonzero(np.r_[True, np.any(keys_sorted[1:] != keys_sorted[:-1], axis=1)])
    return starts, np.add.reduceat(values_sorted, starts, axis=0)


def template_features(
    image_features: np.ndarray,
    template_ids: np.ndarray,
    media_ids: np.ndarray,
    normalize_images: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """``(template_ids sorted, unit features (T, D))``: mean per media, then sum per template.

    With ``normalize_images`` every image counts equally; without, an image's feature
    norm acts as its quality weight (the usual choice for flip-summed features).
    """
    features = np.asarray(image_features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"image features must be 2-D (N, D), got shape {features.shape}")
    if not (features.shape[0] == len(template_ids) == len(media_ids)):
        raise ValueError(
            f"{features.shape[0]} image features for {len(template_ids)} template/media records"
        )
    if not np.isfinite(features).all():
        raise ValueError("image features contain non-finite values")
    if normalize_images:
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        features = features / np.maximum(norms, 1e-12)
    order = np.lexsort((media_ids, template_ids))
    keys = np.stack([template_ids[order], media_ids[order]], axis=1)
    media_starts, media_sums = _group_sums(keys, features[order])
    media_counts = np.diff(np.r_[media_starts, len(order)])[:, None]
    media_means = media_sums / media_counts
    media_templates = keys[media_starts, :1]
    template_starts, template_sums = _group_sums(media_templates, media_means)
    norms = np.linalg.norm(template_sums, axis=1, keepdims=True)
    if np.any(norms == 0):
        zero = media_templates[template_starts[np.flatnonzero(norms[:, 0] == 0)[0]], 0]
        raise ValueError(f"template {zero} has a zero feature sum; cannot normalize")
    return media_templates[template_starts, 0], (template_sums / norms).astype(np.float32)


def pair_scores(
    template_ids: np.ndarray, features: np.ndarray, template_1: np.ndarray, template_2: np.ndarray
) -> np.ndarray:
    """Cosine of each template pair; ``template_ids`` sorted as ``template_features`` returns them."""
    rows = []
    for name, wanted in (("template_id_1", template_1), ("template_id_2", template_2)):
        index = np.clip(np.searchsorted(template_ids, wanted), 0, len(template_ids) - 1)
        missing = np.flatnonzero(template_ids[index] != wanted)
        if missing.size:
            raise ValueError(
                f"pair {missing[0] + 1}: {name} {wanted[missing[0]]} has no images in the template file"
            )
        rows.append(index)
    scores = np.empty(len(template_1), dtype=np.float64)
    for start in range(0, len(scores), SCORE_CHUNK):
        stop = start + SCORE_CHUNK
        first = features[rows[0][start:stop]].astype(np.float64)
        second = features[rows[1][start:stop]].astype(np.float64)
        scores[start:stop] = np.einsum("ij,ij->i", first, second)
    return scores


def roc_table(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float] = IJB_FARS) -> Dict[str, Optional[float]]:
    """``{"1e-06": tar or None, ...}``; None where the negatives cannot resolve that FAR."""
    points = tar_at_far(scores, issame, fars)
    return {format_far(far): (None if point is None else point[0]) for far, point in points.items()}


def format_table(table: Dict[str, Optional[float]], name: str = "TAR") -> str:
    header = "FAR      | " + " | ".join(f"{key:>7}" for key in table)
    values = " | ".join("      -" if value is None else f"{100 * value:7.3f}" for value in table.values())
    return f"{header}\n{name:<8} | {values}"


def save_roc_png(scores: np.ndarray, issame: np.ndarray, path: str, label: str = "model") -> None:
    """ROC (TAR vs log FAR) as a PNG, written atomically; no global matplotlib state touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    far, tar, _ = roc_curve(scores, issame)
    # A few thousand log-spaced points draw the same curve as millions of raw ones.
    positive = far > 0
    far, tar = far[positive], tar[positive]
    picks = np.unique(np.searchsorted(far, np.geomspace(far[0], 1.0, 2000), side="right") - 1)
    figure = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(far[picks], tar[picks], label=label)
    axes.set_xscale("log")
    axes.set_xlim(1e-6, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("False accept rate")
    axes.set_ylabel("True accept rate")
    axes.set_title("1:1 template verification ROC")
    axes.grid(True, which="both", linestyle=":", linewidth=0.5)
    axes.legend(loc="lower right")
    with atomic_output_path(path) as temp_path:
        figure.savefig(temp_path, format="png")


def _embed_image_list(checkpoint: str, image_dir: str, names: List[str], batch_size: int, device) -> np.ndarray:
    """Flip-summed unit features of aligned crops ``image_dir/name`` in file order."""
    import torch

    from partialfc.eval.bin_format import decode_image
    from partialfc.eval.verification import default_device, embed_images
    from partialfc.models import load_backbone

    device = torch.device(device) if device else default_device()
    model = load_backbone(checkpoint, map_location=device)
    chunks = []
    step = batch_size * 16  # decode a slice at a time to bound memory
    for start in range(0, len(names), step):
        batch = []
        for name in names[start : start + step]:
            path = os.path.join(image_dir, name)
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                raise ValueError(f"image listed in the template file is missing: {path}") from None
            batch.append(decode_image(data, (112, 112), path).transpose(2, 0, 1))
        images = torch.from_numpy(np.stack(batch))
        chunks.append(embed_images(model, images, batch_size, device))
    return np.concatenate(chunks)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.eval.ijb",
        description="IJB-B/C style 1:1 verification: media- then template-averaged features, TAR@FAR.",
    )
    parser.add_argument("--templates", required=True, help="'image_name template_id media_id' lines")
    parser.add_argument("--pairs", required=True, help="'template_id_1 template_id_2 label' lines")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="per-image features .npy (N, D), template-file order")
    source.add_argument("--checkpoint", help="backbone to embed --image-dir with")
    parser.add_argument("--image-dir", help="aligned 112x112 crops named as in the template file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--normalize-images", action="store_true",
                        help="L2-normalize each image feature before averaging")
    parser.add_argument("--out-dir", default=".", help="where roc.png and tar_at_far.json go")
    parser.add_argument("--name", default="model", help="curve label in the plot")
    args = parser.parse_args(argv)
    if args.checkpoint and not args.image_dir:
        parser.error("--checkpoint needs --image-dir")
    from partialfc.eval.cli_errors import run_cli

    return run_cli("ijb", lambda: _run(args))


def _load_features(path: str) -> np.ndarray:
    try:
        features = np.load(path, allow_pickle=False)
    except ValueError as error:  # a pickled (object) array, or not a .npy at all
        raise ValueError(f"{path}: not a numeric .npy feature array ({' '.join(str(error).split())})") from None
    if not isinstance(features, np.ndarray) or not np.issubdtype(features.dtype, np.number):
        raise ValueError(f"{path}: expected a numeric (N, D) .npy array, got "
                         f"{getattr(features, 'dtype', type(features).__name__)}")
    return features


def _run(args: argparse.Namespace) -> int:
    names, template_ids, media_ids = read_template_media(args.templates)
    template_1, template_2, issame = read_template_pairs(args.pairs)  # checked before any embedding
    if args.features:
        features = _load_features(args.features)
    else:
        from partialfc.eval.verification import parse_device

        features = _embed_image_list(args.checkpoint, args.image_dir, names, args.batch_size,
                                     parse_device(args.device))
    if features.ndim != 2 or features.shape[0] != len(names):
        raise ValueError(
            f"{args.features or args.checkpoint}: features of shape {features.shape} do not match "
            f"{len(names)} records in {args.templates}"
        )
    ids, template_feats = template_features(features, template_ids, media_ids, args.normalize_images)
    scores = pair_scores(ids, template_feats, template_1, template_2)
    table = roc_table(scores, issame)
    print(format_table(table, args.name))
    os.makedirs(args.out_dir, exist_ok=True)
    save_roc_png(scores, issame, os.path.join(args.out_dir, "roc.png"), args.name)
    atomic_write_text(os.path.join(args.out_dir, "tar_at_far.json"),
                      json.dumps({"name": args.name, "tar_at_far": table}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
