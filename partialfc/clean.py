"""``python -m partialfc.clean CHECKPOINT --data PREFIX --out OUT_PREFIX``: drop label noise.

Sub-center ArcFace cleaning (DESIGN.md section 6): a model trained with K >= 2
sub-centers per identity embeds every image of the set; each identity's dominant
sub-center is the one nearest to most of its images; images further than
``--threshold-deg`` from it are dropped, identities left with fewer than
``--min-samples`` images too, and the rest is relabelled densely and written as a new
RecordIO set (plus mapping, dropped list, JSON report, histogram) for a K = 1 retrain.

Run it as one process, or under ``torchrun`` to embed on every rank (rank 0 gathers
the embeddings, decides and writes). Every input is checked before any file is
written; the input set is only read.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from partialfc.checkpoint import CheckpointError

DEFAULT_THRESHOLD_DEG = 75.0


def image_keys(dataset) -> np.ndarray:
    """Record key of every image of a ``RecordDataset``, in sample order."""
    if dataset.first_key is None:
        return np.asarray(dataset.reader.keys, dtype=np.int64).copy()
    return np.arange(dataset.first_key, dataset.first_key + dataset.num_images, dtype=np.int64)


def _check_options(threshold_deg: float, min_samples: int, batch_size: int, workers: int) -> None:
    if not 0.0 < threshold_deg <= 180.0:
        raise ValueError(f"--threshold-deg must be in (0, 180], got {threshold_deg}")
    if min_samples < 1:
        raise ValueError(f"--min-samples must be >= 1, got {min_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")


def open_inputs(checkpoint: str, data: str, out_prefix: str):
    """(manifest, dataset) after every check that can fail before work starts."""
    from partialfc.cleaning.write import check_output_location
    from partialfc.models.inference import read_head_header
    from partialfc.data.recordio_source import RecordDataset

    step_dir, manifest = read_head_header(checkpoint)  # a step/run directory or a consolidated file
    if manifest["num_subcenters"] < 2:
        raise ValueError(f"{step_dir}: cleaning needs sub-centers (K >= 2), but this checkpoint has "
                         f"num_subcenters = {manifest['num_subcenters']}; train with "
                         f"head.num_subcenters = 3 first")
    dataset = RecordDataset(data)  # FileNotFoundError names the missing file
    try:
        if dataset.num_classes != manifest["num_classes"]:
            raise ValueError(f"{data}: the data has {dataset.num_classes} classes (from "
                             f"{dataset.num_classes_source}) but checkpoint {step_dir} has "
                             f"{manifest['num_classes']}: not the set the model was trained on")
        if dataset.num_images == 0:
            raise ValueError(f"{dataset.rec_path}: no image records to clean")
        check_framing(dataset, data)
        check_output_location(out_prefix, os.path.dirname(os.path.abspath(dataset.rec_path)))
    except BaseException:
        dataset.close()
        raise
    return step_dir, manifest, dataset


def check_framing(dataset, data: str) -> None:
    """Refuse a set with unreadable record headers (a truncated ``.rec``) before hours of
    embedding: every image is embedded, so one such record would stop the job late."""
    from partialfc.data.recordio import CorruptRecordError, broken_framing

    positions = dataset.image_positions()
    offsets = np.asarray(dataset.reader.offsets, np.int64)[positions]
    broken = broken_framing(dataset.rec_path, offsets)
    if broken.any():
        first = int(np.argmax(broken))
        key = int(dataset.reader.keys[positions[first]])
        raise CorruptRecordError(
            f"{dataset.rec_path}: record {key} at byte {int(offsets[first])}: bad framing "
            f"(truncated or overwritten; {int(broken.sum())} such records): cleaning reads every "
            f"image; `python -m partialfc.data.inspect {data}` lists them")


def _image_size(dataset) -> tuple:
    from partialfc.data.recordio_source import read_property

    prop = read_property(os.path.dirname(os.path.abspath(dataset.rec_path)))
    return (prop[1], prop[2]) if prop is not None else (112, 112)


def run_clean(checkpoint: str, data: str, out_prefix: str, *, threshold_deg: float = DEFAULT_THRESHOLD_DEG,
              min_samples: int = 1, embeddings_path: Optional[str] = None, dry_run: bool = False,
              batch_size: int = 128, workers: int = 2, flip: bool = False, device: str = "auto",
              show_progress: bool = True) -> Optional[dict]:
    """The whole job; returns the report on rank 0 and None on the other ranks.

    ``embeddings_path``: reuse that ``.npy`` (and its ``.index.npy``) when it exists,
    otherwise compute the embeddings and save them there.
    """

    from partialfc.cleaning.embed import embed_dataset, load_embeddings, save_embeddings
    from partialfc.cleaning.select import select_clean
    from partialfc.cleaning.write import build_report, write_outputs
    from partialfc.distributed import collectives
    from partialfc.distributed.runtime import init_runtime
    from partialfc.models import load_backbone
    from partialfc.models.inference import load_class_centers

    _check_options(threshold_deg, min_samples, batch_size, workers)
    step_dir, manifest, dataset = open_inputs(checkpoint, data, out_prefix)
    try:
        keys = image_keys(dataset)
        reuse = embeddings_path is not None and os.path.exists(embeddings_path)
        embeddings = None
        if reuse:  # checked now, before any file is written
            embeddings = load_embeddings(embeddings_path, keys, manifest["embedding_size"])
        elif embeddings_path is not None and not embeddings_path.endswith(".npy"):
            raise ValueError(f"--embeddings file must end in .npy, got {embeddings_path!r}")

        runtime = init_runtime(device=device, timeout_minutes=120.0)
        if reuse:
            if not runtime.is_main:
                return None
            labels = np.array([dataset.fetch(s)[1] for s in range(dataset.num_images)], np.int64)
        else:
            model = load_backbone(step_dir, map_location=runtime.device)
            result = embed_dataset(model, dataset, batch_size=batch_size, device=runtime.device,
                                   num_workers=workers, flip=flip, embedding_size=manifest["embedding_size"],
                                   collective_device=runtime.device if runtime.backend == "nccl" else None,
                                   show_progress=show_progress)
            if result is None:  # not rank 0: its part is done
                return None
            embeddings, labels, gathered_keys = result
            if not np.array_equal(gathered_keys, keys):
                raise RuntimeError("gathered record keys are out of order; this is a bug")
            if embeddings_path is not None:
                save_embeddings(embeddings_path, embeddings, keys)

        centers = load_class_centers(step_dir).numpy()
        selection = select_clean(embeddings, labels, centers, threshold_deg, min_samples)
        report = build_report(selection, labels, threshold_deg=threshold_deg, min_samples=min_samples,
                              num_classes=manifest["num_classes"], extra={
                                  "checkpoint": str(step_dir), "data": dataset.rec_path,
                                  "num_subcenters": manifest["num_subcenters"],
                                  "embeddings": embeddings_path, "flip": flip, "dry_run": dry_run,
                                  "world_size": collectives.world_size()})
        report["outputs"] = write_outputs(out_prefix, dataset, keys, labels, selection, report,
                                          image_size=_image_size(dataset), dry_run=dry_run,
                                          show_progress=show_progress)
        return report
    finally:
        dataset.close()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.clean",
        description="Remove label noise from a RecordIO set with a sub-center (K >= 2) checkpoint: "
                    "drop images far from their identity's dominant sub-center, relabel, and write "
                    "a new set. Run under torchrun to embed on every rank.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="checkpoint step directory, checkpoints root or run output with 'latest'")
    parser.add_argument("--data", required=True, metavar="PREFIX", help="input set: PREFIX.rec/.idx")
    parser.add_argument("--out", required=True, metavar="OUT_PREFIX",
                        help="output prefix, in a directory other than the input's (created if missing)")
    parser.add_argument("--threshold-deg", type=float, default=DEFAULT_THRESHOLD_DEG,
                        help="drop images further than this from the dominant sub-center (default 75)")
    parser.add_argument("--min-samples", type=int, default=1,
                        help="drop identities left with fewer images (default 1)")
    parser.add_argument("--embeddings", metavar="FILE.npy",
                        help="reuse these embeddings (with FILE.index.npy) if present, else save them there")
    parser.add_argument("--dry-run", action="store_true",
                        help="write only the report and the histogram, not the new set")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes per rank (default 2)")
    parser.add_argument("--flip", action="store_true",
                        help="add the embedding of the mirrored image (twice the compute)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch.distributed as dist

    from partialfc.distributed.runtime import shutdown_runtime

    args = parse_args(argv)
    owns_group = not (dist.is_available() and dist.is_initialized())
    try:
        report = run_clean(args.checkpoint, args.data, args.out, threshold_deg=args.threshold_deg,
                           min_samples=args.min_samples, embeddings_path=args.embeddings,
                           dry_run=args.dry_run, batch_size=args.batch_size, workers=args.workers,
                           flip=args.flip, device=args.device, show_progress=not args.quiet)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        print(f"clean: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clean: interrupted; no complete output was written", file=sys.stderr)
        return 130
    finally:
        if owns_group:
            shutdown_runtime()
    if report is not None:
        dropped = report["dropped_images"]
        print(f"clean: kept {report['images_after']} of {report['images_before']} images and "
              f"{report['identities_after']} of {report['identities_before']} identities (dropped "
              f"{dropped['angle']} beyond {report['threshold_deg']:g} deg, {dropped['min_samples']} "
              f"in identities under {report['min_samples']} images)"
              + (" [dry run]" if report["dry_run"] else f"; wrote {args.out}.rec/.idx"))
    return 0


if __name__ == "__main__":
    from partialfc.distributed.runtime import exit_process

    exit_process(main())  # not sys.exit: see exit_process
