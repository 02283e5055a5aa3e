"""Entrypoint: ``torchrun --nproc_per_node=N -m partialfc.train CONFIG [--set key=value ...]``.

Parse the config, start the process group, build the trainer, train. Everything
else lives in ``trainer.py`` (order of events) and the modules it calls.
"""
from __future__ import annotations

import argparse
import logging
import sys

from partialfc.config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.train",
        description="Train a face-recognition backbone with a Partial FC head (run under torchrun).",
    )
    parser.add_argument("config", help="TOML config file, e.g. configs/demo.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--resume", default=None, metavar="auto|CHECKPOINT",
                        help="shorthand for --set train.resume=...")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f'train.resume="{args.resume}"')
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from partialfc.distributed.runtime import init_runtime, shutdown_runtime
    from partialfc.trainer import Trainer

    try:
        runtime = init_runtime(cfg.train.device, cfg.train.backend, require_group=cfg.train.engine == "deepspeed")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if runtime.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {runtime.rank}] %(message)s", datefmt="%H:%M:%S",
    )
    try:
        summary = Trainer(cfg, runtime).train()
        if runtime.is_main:
            logging.getLogger("partialfc.train").info("done: %s", summary)
    except ValueError as exc:
        # Bad data, a label out of range, a checkpoint of another model: say what, no traceback.
        print(f"error [rank {runtime.rank}]: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
