"""``python -m partialfc.invert CHECKPOINT --out DIR [--classes ...] [--images ...] [--embeddings ...]``

Synthesize faces from a trained model without any training data (ArcFace TPAMI,
DESIGN.md section 6): optimize pixels so the embedding reaches a target while
every BatchNorm layer sees the batch statistics it stored during training.
All targets are inverted together as one batch.

CHECKPOINT is a run directory, a checkpoints root (its ``latest`` is used), a step
directory, the file ``python -m partialfc.checkpoint consolidate`` writes, or a bare
``backbone.pt`` file (then only open-set targets, ``--images`` / ``--embeddings``, are
possible: class centers live in the head shards of a checkpoint or in the
consolidated file). ``partialfc.models.inference.load_model`` resolves it, as for
every other tool.

The defaults are the GPU ones (2000 steps). On a CPU use a small backbone and
few steps for a demo, e.g. ``--steps 200`` with ``mobilefacenet_tiny``.

DIR receives ``NNN_<label>.png`` per target, ``grid.png`` and ``report.json``
(final cosine to the target, to the nearest other target and, when the
checkpoint has class centers, to the nearest other class; BN prior loss before
and after). The metrics are measured on the saved 8-bit images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from partialfc.inversion.optimize import AMP_MODES, InversionSettings

DEFAULTS = InversionSettings()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.invert",
        description="Invert a trained face model: images whose embeddings hit given targets, "
                    "with the BatchNorm running statistics as the image prior.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="run dir, checkpoints root, step dir, consolidated .pt, or backbone.pt")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    targets = parser.add_argument_group("targets (at least one; all are inverted as one batch)")
    targets.add_argument("--classes", type=int, nargs="+", default=[], metavar="ID",
                         help="close-set: class ids whose head centers are the targets")
    targets.add_argument("--images", nargs="+", default=[], metavar="IMAGE",
                         help="open-set: aligned face images of the backbone's input size")
    targets.add_argument("--embeddings", nargs="+", default=[], metavar="FILE.npy",
                         help="target embeddings, float arrays (N, D) or (D,)")
    targets.add_argument("--subcenter", default="mean",
                         help="with K > 1 sub-centers: 'mean' (normalized mean of the normalized "
                              "sub-centers) or a sub-center index")
    loop = parser.add_argument_group("optimization")
    loop.add_argument("--steps", type=int, default=DEFAULTS.steps,
                      help="optimizer steps (a CPU demo: ~200 with a tiny backbone)")
    loop.add_argument("--lr", type=float, default=DEFAULTS.lr, help="Adam learning rate, cosine-decayed")
    loop.add_argument("--bn-weight", type=float, default=DEFAULTS.bn_weight, help="BN statistic prior weight")
    loop.add_argument("--first-bn-weight", type=float, default=DEFAULTS.first_bn_weight,
                      help="extra factor on the first BatchNorm layer")
    loop.add_argument("--tv-weight", type=float, default=DEFAULTS.tv_weight, help="total-variation weight")
    loop.add_argument("--l2-weight", type=float, default=DEFAULTS.l2_weight, help="pixel L2 weight")
    loop.add_argument("--jitter", type=int, default=DEFAULTS.jitter, help="max random shift in pixels")
    loop.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    loop.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of start images, jitter, flips")
    loop.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    loop.add_argument("--amp", choices=AMP_MODES, default=DEFAULTS.amp,
                      help="autocast on CUDA: auto = bf16 if supported else fp16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> InversionSettings:
    return InversionSettings(
        steps=args.steps, lr=args.lr, bn_weight=args.bn_weight, first_bn_weight=args.first_bn_weight,
        tv_weight=args.tv_weight, l2_weight=args.l2_weight, jitter=args.jitter, flip=not args.no_flip,
        seed=args.seed, amp=args.amp, progress=not args.no_progress,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def load_model(path: str, need_centers: bool):
    """(backbone, centers or None, the checkpoint or file used) for CHECKPOINT.

    Centers are read whenever the source has them (the report names the nearest
    other class); ``need_centers`` (close-set targets) makes their absence an error.
    """
    from partialfc.models.inference import load_model as load_checkpoint_model

    loaded = load_checkpoint_model(path, centers=True)
    if need_centers and loaded.centers is None:
        raise ValueError(
            f"--classes needs a checkpoint directory with head shards (class centers) or a "
            f"consolidated checkpoint file; {loaded.source} holds only a backbone"
        )
    return loaded.backbone, loaded.centers, loaded.source


def build_targets(args, backbone, centers, where: str, input_size, embedding_size: int):
    from partialfc.inversion.targets import (class_targets, embedding_targets, image_targets,
                                             parse_subcenter)

    if centers is not None and centers.shape[2] != embedding_size:
        raise ValueError(
            f"{where}: class centers have D = {centers.shape[2]}, the backbone's embedding size is {embedding_size}"
        )
    targets = []
    if args.classes:
        targets += class_targets(centers, args.classes, parse_subcenter(args.subcenter), where=str(where))
    targets += image_targets(backbone, args.images, input_size)
    for path in args.embeddings:
        targets += embedding_targets(path, embedding_size)
    return targets


@torch.no_grad()
def final_metrics(backbone, pixels, targets, centers, start_embeddings) -> List[dict]:
    """Per target: cosines of the saved 8-bit image's embedding to its target and the nearest others."""
    from partialfc.inversion.losses import cosine_matrix
    from partialfc.inversion.report import from_uint8_images
    from partialfc.inversion.targets import class_cosines

    device = next(backbone.parameters()).device
    embeddings = backbone(from_uint8_images(pixels).to(device)).float().cpu()
    target_matrix = torch.stack([target.vector for target in targets])
    to_targets = cosine_matrix(embeddings, target_matrix)
    to_classes = class_cosines(embeddings, centers) if centers is not None else None
    at_start = cosine_matrix(start_embeddings, target_matrix).diagonal()
    rows = []
    for index, target in enumerate(targets):
        row = {"cosine_to_target": float(to_targets[index, index]),
               "cosine_to_target_at_start": float(at_start[index])}
        others = to_targets[index].clone()
        others[index] = float("-inf")
        if len(targets) > 1:
            nearest = int(others.argmax())
            row.update(nearest_other_target=targets[nearest].label,
                       cosine_to_nearest_other_target=float(others[nearest]))
        if to_classes is not None and to_classes.shape[1] > (1 if target.class_id is not None else 0):
            by_class = to_classes[index].clone()
            if target.class_id is not None:
                by_class[target.class_id] = float("-inf")
            nearest_class = int(by_class.argmax())
            row.update(nearest_other_class=nearest_class, cosine_to_nearest_other_class=float(by_class[nearest_class]))
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> Path:
    """The job; raises ValueError / FileNotFoundError with the offending input named."""
    from partialfc.inversion.bn_prior import batchnorm_layers
    from partialfc.inversion.optimize import invert
    from partialfc.inversion.report import image_filenames, to_uint8_images, write_outputs

    if not (args.classes or args.images or args.embeddings):
        raise ValueError("no targets: give at least one of --classes, --images, --embeddings")
    settings = settings_from_args(args)
    device = resolve_device(args.device)
    backbone, centers, where = load_model(args.checkpoint, need_centers=bool(args.classes))
    batchnorm_layers(backbone, where=f"backbone of {where}")
    backbone = backbone.to(device).eval()
    input_size = tuple(getattr(backbone, "input_size", (112, 112)))
    with torch.no_grad():
        embedding_size = int(backbone(torch.zeros(2, 3, *input_size, device=device)).shape[1])
    targets = build_targets(args, backbone, centers, where, input_size, embedding_size)

    result = invert(backbone, torch.stack([t.vector for t in targets]), settings, image_size=input_size)
    pixels = to_uint8_images(result.images)
    filenames = image_filenames([target.label for target in targets])
    metrics = final_metrics(backbone, pixels, targets, centers, result.start_embeddings)
    report = {
        "checkpoint": str(where),
        "device": str(device),
        "settings": {key: getattr(settings, key) for key in settings.__dataclass_fields__ if key != "progress"},
        "subcenter": args.subcenter,
        "bn_loss": {"before": result.bn_loss_before, "after": result.bn_loss_after},
        "grid": "grid.png",
        "targets": [
            {"index": index, "label": target.label, "kind": target.kind, "source": target.source,
             "class_id": target.class_id, "file": filenames[index], **metrics[index]}
            for index, target in enumerate(targets)
        ],
        "history": result.history,
    }
    return write_outputs(args.out, pixels, filenames, report, overwrite=args.overwrite)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    try:
        out_dir = run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
