"""Verification on the ``.bin`` sets while training runs.

The sets are read and decoded at start (``check_eval_sets``): a wrong path or a broken
file fails in seconds, not at the first evaluation hours in, and the decoded sets stay
in ``load_bin``'s cache, so the first evaluation does not read them again.

Rank 0 evaluates (every ``eval.every`` steps and at the last step); the other ranks
wait on a deliberate barrier rather than inside a collective of the next step, so
nobody times out in the middle of an all-gather (the barrier is bounded by
``train.collective_timeout``, which must exceed one evaluation). The best accuracy per
set so far is kept on the trainer, logged, and appended to ``metrics.jsonl`` (and to
Prometheus / TensorBoard when metrics are on).
"""
from __future__ import annotations

import json
import logging
import os

import torch

from partialfc.atomic_io import append_text

log = logging.getLogger("partialfc.train")


def check_eval_sets(eval_cfg) -> None:
    """Load every ``eval.sets`` file now; a ``ValueError`` naming the file if one cannot be used."""
    if not eval_cfg.sets or not eval_cfg.every:
        return
    from partialfc.eval.verification import load_bin, set_name

    names = [set_name(path) for path in eval_cfg.sets]
    for path, name in zip(eval_cfg.sets, names):
        if names.count(name) > 1:
            raise ValueError(f"eval.sets: {path} and another set are both named {name!r} in the results; "
                             "rename one file")
        if not os.path.exists(path):
            raise ValueError(f"eval.sets: {path} does not exist")
        if os.path.isdir(path):
            raise ValueError(f"eval.sets: {path} is a directory, not a .bin file")
        try:
            load_bin(path)
        except OSError as exc:
            raise ValueError(f"eval.sets: {path}: cannot read ({exc.strerror or exc})") from None
        except ValueError as exc:  # load_bin's messages name the file
            raise ValueError(f"eval.sets: {exc}") from None


def evaluate_during_training(trainer) -> dict:
    results = {}
    if trainer.runtime.is_main:
        from partialfc.eval.verification import evaluate_bin_sets, format_results

        with trainer.runtime.supervisor.working_alone():
            results = evaluate_bin_sets(trainer.backbone, list(trainer.cfg.eval.sets),
                                        trainer.cfg.eval.batch_size, trainer.device)
        best = trainer.best_accuracy
        for name, values in results.items():
            best[name] = max(best.get(name, 0.0), values["accuracy"])
        log.info("eval step %d: %s | best %s", trainer.step, format_results(results),
                 ", ".join(f"{k} {v:.4f}" for k, v in best.items()))
        append_text(trainer.output / "metrics.jsonl", json.dumps(
            {"step": trainer.step, "samples": trainer.samples_seen, "eval": results, "best": dict(best)}) + "\n")
        if trainer.metrics is not None:
            trainer.metrics.observe_eval(trainer.step, {k: v["accuracy"] for k, v in results.items()})
    if trainer.runtime.world_size > 1:
        torch.distributed.barrier()
    return results
