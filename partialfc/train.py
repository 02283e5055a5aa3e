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

    from partialfc import run_log
    from partialfc.distributed.runtime import STARTUP_TIMEOUT_MINUTES, init_runtime, shutdown_runtime
    from partialfc.distributed.supervision import EXIT_CODE, first_line, is_collective_failure
    from partialfc.trainer import Trainer

    try:
        runtime = init_runtime(cfg.train.device, cfg.train.backend, timeout_minutes=STARTUP_TIMEOUT_MINUTES,
                               require_group=cfg.train.engine == "deepspeed",
                               collective_timeout=cfg.train.collective_timeout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_log.configure_console(runtime.rank)

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        run_log.log_to_file_only(line)

    abandon_group = False
    try:
        summary = Trainer(cfg, runtime).train()
        if runtime.is_main:
            logging.getLogger("partialfc.train").info("done: %s", summary)
    except ValueError as exc:
        # Bad data, a label out of range, a checkpoint of another model: say what, no
        # traceback. Published first, so the peers left waiting name this rank.
        line = f"error [rank {runtime.rank}]: {exc}"
        runtime.supervisor.publish_failure(line)
        report(line)
        return 2
    except KeyboardInterrupt:
        report(f"error [rank {runtime.rank}]: interrupted after step {runtime.supervisor.step}")
        return 130
    except Exception as exc:
        if runtime.world_size > 1 and is_collective_failure(exc):
            # A peer failed, stopped or vanished: name it in one line instead of gloo's traceback.
            abandon_group = True
            report(f"error [rank {runtime.rank}]: {runtime.supervisor.explain_collective_failure(exc)}")
            return EXIT_CODE
        runtime.supervisor.publish_failure(f"{type(exc).__name__}: {first_line(exc)}")
        raise  # a bug: its traceback is the report
    finally:
        run_log.detach_log_file()
        shutdown_runtime(runtime, abandon=abandon_group)
    return 0


if __name__ == "__main__":
    from partialfc.distributed.runtime import exit_process

    exit_process(main())  # not sys.exit: see exit_process
