"""Write the cleaned set and everything that explains it.

Outputs for ``OUT_PREFIX`` (all beside each other):

- ``OUT_PREFIX.rec`` / ``.idx``: the kept records, plain image records with keys
  ``0 .. N'-1`` in the original order. Each keeps its original image bytes; the
  IRHeader carries the new label, ``id`` = new key and ``id2`` = the original key.
- ``property``: ``N_classes',H,W`` (per directory, as insightface sets have it).
- ``OUT_PREFIX.labels.csv``: ``old_label,new_label`` for every old label (-1 = dropped).
- ``OUT_PREFIX.dropped.csv``: ``record_key,old_label,reason,angle_deg`` per dropped record.
- ``OUT_PREFIX.report.json``: counts before/after, per-reason counts, angle quantiles.
- ``OUT_PREFIX.angles.png``: histogram of angles to the dominant sub-center.

Everything is first written into a private temporary directory next to the output
and then renamed into place, the report last: a run that dies leaves either the
temporary directory (ignored by every reader) or, at worst, a set without its
report -- never a half-written ``.rec`` under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Dict, Optional

import numpy as np

from partialfc.cleaning.select import DROP_ANGLE, DROP_MIN_SAMPLES, KEPT, REASON_NAMES, Selection
from partialfc.data.recordio import IndexedRecordWriter, IRHeader, pack, unpack
from partialfc.data.recordio_source import RecordDataset

ANGLE_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def output_paths(out_prefix: str) -> Dict[str, str]:
    """Final path of every output, by role."""
    directory = os.path.dirname(os.path.abspath(out_prefix))
    return {
        "rec": out_prefix + ".rec",
        "idx": out_prefix + ".idx",
        "property": os.path.join(directory, "property"),
        "labels": out_prefix + ".labels.csv",
        "dropped": out_prefix + ".dropped.csv",
        "histogram": out_prefix + ".angles.png",
        "report": out_prefix + ".report.json",
    }


def check_output_location(out_prefix: str, data_dir: str) -> None:
    """Refuse outputs that would overwrite the input (``property`` is per directory) or
    that cannot be written; a missing output directory is fine (``write_outputs``
    creates it), as long as its nearest existing ancestor is a writable directory."""
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    if os.path.isdir(out_dir) and os.path.samefile(out_dir, data_dir):
        raise ValueError(f"--out {out_prefix!r} is in the input's directory {data_dir!r}; its "
                         f"'property' file would be overwritten: choose another directory")
    existing = out_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out_prefix!r}: {existing!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_prefix!r}: directory {existing!r} is not writable")


def refuse_empty_result(selection: Selection, report: dict) -> None:
    """A cleaned set without images would not load anywhere (``property`` would say
    0 classes): say why instead of writing it. Almost always an undertrained model."""
    if selection.num_new_classes > 0:
        return
    dropped = report["dropped_images"]
    median = report["angle_deg_quantiles"].get("p50")
    raise ValueError(
        f"cleaning would drop all {report['images_before']} images ({dropped['angle']} beyond "
        f"{report['threshold_deg']:g} deg, {dropped['min_samples']} in identities under "
        f"{report['min_samples']} images): nothing written; the checkpoint may be undertrained"
        + (f" (median angle to the dominant sub-center {median:.1f} deg)" if median is not None
           else "")
        + ": look at the angles with --dry-run, then raise --threshold-deg or lower "
          "--min-samples, or train longer")


def build_report(selection: Selection, labels: np.ndarray, *, threshold_deg: float, min_samples: int,
                 num_classes: int, extra: Optional[dict] = None) -> dict:
    """The numbers of a cleaning run (JSON-ready; every count can be re-derived from the files)."""
    reason = selection.reason
    present = selection.samples_before > 0
    within_angle = np.bincount(labels[reason != DROP_ANGLE], minlength=num_classes)
    angles = selection.angle_deg.astype(np.float64)
    quantiles = {f"p{round(q * 100):g}": float(np.quantile(angles, q)) for q in ANGLE_QUANTILES} \
        if angles.size else {}
    nearest_is_dominant = selection.nearest_subcenter == selection.dominant_subcenter[labels]
    report = {
        "threshold_deg": float(threshold_deg),
        "min_samples": int(min_samples),
        "num_classes_before": int(num_classes),
        "images_before": int(reason.size),
        "images_after": int(np.count_nonzero(reason == KEPT)),
        "identities_before": int(np.count_nonzero(present)),
        "identities_after": selection.num_new_classes,
        "dropped_images": {REASON_NAMES[code]: int(np.count_nonzero(reason == code))
                           for code in (DROP_ANGLE, DROP_MIN_SAMPLES)},
        "dropped_identities": {
            "angle": int(np.count_nonzero(present & (within_angle == 0))),
            "min_samples": int(np.count_nonzero(present & (within_angle > 0) & (selection.samples_after == 0))),
        },
        "angle_deg_quantiles": quantiles,
        "share_nearest_is_dominant": float(nearest_is_dominant.mean()) if reason.size else 0.0,
    }
    report.update(extra or {})
    return report


def _write_csv_lines(path: str, header: str, lines) -> None:
    with open(path, "w", encoding="ascii", newline="\n") as handle:
        handle.write(header + "\n")
        for line in lines:
            handle.write(line + "\n")


def histogram_available() -> bool:
    """matplotlib comes with the ``eval`` extra, not with the core install: without it the
    cleaned set and its report are still written, only the plot is left out (with a warning)."""
    import importlib.util
    import logging

    if importlib.util.find_spec("matplotlib") is not None:
        return True
    logging.getLogger("partialfc.clean").warning(
        "matplotlib is not installed (pip install 'partialfc[eval]'): no angle histogram is written")
    return False


def write_histogram(path: str, angles: np.ndarray, keep: np.ndarray, threshold_deg: float) -> None:
    """Stacked histogram of angles to the dominant sub-center, threshold marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    bins = np.linspace(0.0, 180.0, 91)
    axes.hist([angles[keep], angles[~keep]], bins=bins, stacked=True, label=["kept", "dropped"],
              color=["tab:blue", "tab:red"])
    axes.axvline(threshold_deg, color="black", linestyle="--", label=f"threshold {threshold_deg:g} deg")
    axes.set_xlabel("angle to the dominant sub-center (degrees)")
    axes.set_ylabel("images")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_recordio(rec_path: str, idx_path: str, dataset: RecordDataset, sample_ids: np.ndarray,
                   keys: np.ndarray, new_labels: np.ndarray, show_progress: bool = True) -> None:
    """Copy the records ``sample_ids`` with their new labels (image bytes untouched)."""
    from tqdm import tqdm

    with IndexedRecordWriter(idx_path, rec_path) as writer:
        rows = tqdm(range(len(sample_ids)), desc="write", unit="img", unit_scale=True,
                    file=sys.stderr, disable=not show_progress)
        for new_key in rows:
            sample_id = int(sample_ids[new_key])
            _, body = unpack(dataset.reader.read_at(dataset.position(sample_id)))
            header = IRHeader(0, float(new_labels[new_key]), new_key, int(keys[sample_id]))
            writer.write_idx(new_key, pack(header, body))


def write_outputs(out_prefix: str, dataset: RecordDataset, keys: np.ndarray, labels: np.ndarray,
                  selection: Selection, report: dict, image_size=(112, 112), dry_run: bool = False,
                  show_progress: bool = True) -> Dict[str, str]:
    """Stage every output in a temp dir beside ``out_prefix``, then rename into place.

    ``dry_run`` writes only the report and the histogram. An empty result (every image
    dropped) is refused unless ``dry_run``. Missing parent directories are created.
    Returns role -> final path.
    """
    if not dry_run:
        refuse_empty_result(selection, report)
    final = output_paths(out_prefix)
    roles = ["histogram", "report"] if dry_run else \
        ["histogram", "labels", "dropped", "property", "rec", "idx", "report"]
    if not histogram_available():
        roles.remove("histogram")
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out_prefix!r}: cannot create {out_dir!r} "
                         f"({error.strerror})") from None
    staging = tempfile.mkdtemp(prefix="." + os.path.basename(out_prefix) + ".clean-", dir=out_dir)
    staged = {role: os.path.join(staging, os.path.basename(final[role])) for role in roles}
    try:
        keep = selection.keep
        if "histogram" in roles:
            write_histogram(staged["histogram"], selection.angle_deg, keep, report["threshold_deg"])
        if not dry_run:
            _write_csv_lines(staged["labels"], "old_label,new_label",
                             (f"{old},{new}" for old, new in enumerate(selection.old_to_new.tolist())))
            dropped = np.flatnonzero(~keep)
            _write_csv_lines(staged["dropped"], "record_key,old_label,reason,angle_deg",
                             (f"{keys[i]},{labels[i]},{REASON_NAMES[int(selection.reason[i])]},"
                              f"{selection.angle_deg[i]:.4f}" for i in dropped))
            with open(staged["property"], "w", encoding="ascii") as handle:
                handle.write(f"{selection.num_new_classes},{image_size[0]},{image_size[1]}\n")
            kept = np.flatnonzero(keep)
            write_recordio(staged["rec"], staged["idx"], dataset, kept, keys,
                           selection.new_labels[kept], show_progress)
        with open(staged["report"], "w", encoding="ascii") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        # The report is the mark of a complete output: retract an old one first, place it last.
        if os.path.exists(final["report"]):
            os.unlink(final["report"])
        for role in roles:
            os.replace(staged[role], final[role])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {role: final[role] for role in roles}
