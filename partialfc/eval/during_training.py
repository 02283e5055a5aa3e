"""Verification on the ``.bin`` sets while training runs.

Rank 0 evaluates; the other ranks wait on a deliberate barrier rather than inside a
collective of the next step, so nobody times out in the middle of an all-gather. The
best accuracy per set so far is kept on the trainer, logged, and appended to
``metrics.jsonl`` (and to Prometheus / TensorBoard when metrics are on).
"""
from __future__ import annotations

import json
import logging

import torch

log = logging.getLogger("partialfc.train")


def evaluate_during_training(trainer) -> dict:
    results = {}
    if trainer.runtime.is_main:
        from partialfc.eval.verification import evaluate_bin_sets, format_results

        results = evaluate_bin_sets(trainer.backbone, list(trainer.cfg.eval.sets),
                                    trainer.cfg.eval.batch_size, trainer.device)
        best = trainer.best_accuracy
        for name, values in results.items():
            best[name] = max(best.get(name, 0.0), values["accuracy"])
        log.info("eval step %d: %s | best %s", trainer.step, format_results(results),
                 ", ".join(f"{k} {v:.4f}" for k, v in best.items()))
        with (trainer.output / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": trainer.step, "eval": results, "best": dict(best)}) + "\n")
        if trainer.metrics is not None:
            trainer.metrics.observe_eval(trainer.step, {k: v["accuracy"] for k, v in results.items()})
    if trainer.runtime.world_size > 1:
        torch.distributed.barrier()
    return results
