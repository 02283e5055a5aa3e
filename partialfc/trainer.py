"""The order of events in a training run; no parallel logic lives here.

Build (data -> backbone -> head -> engine and optimizers -> schedule), optionally
resume, then for each step: forward the backbone (DDP or DeepSpeed engine), the Partial
FC head (model-parallel), backward, clip, step both optimizers and schedules, log,
checkpoint, evaluate.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from partialfc import checkpoint as ckpt
from partialfc.atomic_io import atomic_write_text
from partialfc.config import Config, config_to_dict, dump_config
from partialfc.data import build_source
from partialfc.distributed.engines import build_engine
from partialfc.distributed.runtime import Runtime
from partialfc.head import CombinedMargin, PartialFC
from partialfc.models import build_backbone
from partialfc.optim import build_optimizer, build_scheduler

log = logging.getLogger("partialfc.train")


def build_margin(head_cfg) -> CombinedMargin:
    overrides = {k: getattr(head_cfg, k) for k in ("scale", "m1", "m2", "m3") if getattr(head_cfg, k) is not None}
    return CombinedMargin.preset(head_cfg.margin, **overrides)


def backbone_kwargs(cfg: Config) -> dict:
    return {
        "embedding_size": cfg.model.embedding_size,
        "dropout": cfg.model.dropout,
        "amp_dtype": None if cfg.train.amp == "none" else cfg.train.amp,
    }


def build_head(cfg: Config, num_classes: int, process_group=None) -> PartialFC:
    return PartialFC(
        build_margin(cfg.head), cfg.model.embedding_size, num_classes,
        sample_rate=cfg.head.sample_rate, num_subcenters=cfg.head.num_subcenters,
        process_group=process_group, impl=cfg.head.impl, chunk_size=cfg.head.chunk_size, seed=cfg.train.seed,
        compute_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.head.compute_dtype],
    )


class Trainer:
    """Holds the built objects of one run and drives the step loop."""

    def __init__(self, cfg: Config, runtime: Runtime) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self._stop_signal: Optional[int] = None
        self.install_signal_handlers()  # first: a signal during start-up is remembered, not lost
        self.device = runtime.device
        self.output = Path(cfg.train.output)
        torch.manual_seed(cfg.train.seed)  # identical backbone init on every rank

        self.source = build_source(cfg.data, rank=runtime.rank, world_size=runtime.world_size,
                                   seed=cfg.train.seed, device=self.device.type)
        if cfg.data.num_classes and self.source.num_classes != cfg.data.num_classes:
            raise ValueError(f"data.num_classes = {cfg.data.num_classes} but the data has {self.source.num_classes}")
        self.num_classes = self.source.num_classes
        self.steps_per_epoch = len(self.source)
        if self.steps_per_epoch == 0:
            raise ValueError("the data yields no full batch per rank; lower data.batch_size")

        self.backbone_kwargs = backbone_kwargs(cfg)
        self.backbone = build_backbone(cfg.model.backbone, **self.backbone_kwargs).to(self.device)
        self.head = build_head(cfg, self.num_classes).to(self.device)

        o = cfg.optim
        accumulate = cfg.train.accumulate
        if cfg.data.batch_size % accumulate:
            raise ValueError(f"data.batch_size = {cfg.data.batch_size} is not divisible by "
                             f"train.accumulate = {accumulate}")
        # data.batch_size is the per-rank batch of one optimizer step; it is back-propagated
        # in `accumulate` micro-batches of batch_size / accumulate images.
        global_batch = cfg.data.batch_size * runtime.world_size
        self.base_lr = o.lr * global_batch / o.lr_reference_batch
        common = dict(momentum=o.momentum, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        warmup = int(o.warmup_epochs * self.steps_per_epoch)

        def make_scheduler(optimizer):
            return build_scheduler(optimizer, total_steps=self.total_steps, warmup_steps=warmup,
                                   schedule=o.schedule, poly_power=o.poly_power)

        # The engine owns the backbone's optimizer, schedule and loss scaling (DDP or DeepSpeed).
        self.engine = build_engine(
            cfg.train.engine, self.backbone, device=self.device,
            make_optimizer=lambda params: build_optimizer(o.name, params, lr=self.base_lr, **common),
            make_scheduler=make_scheduler, amp=cfg.train.amp, clip_grad_norm=o.clip_grad_norm,
            accumulate=accumulate, micro_batch_size=cfg.data.batch_size // accumulate,
            zero_stage=cfg.train.zero_stage, user_json=cfg.train.deepspeed_config or None,
        )
        self.backbone = self.engine.module  # unwrapped, for evaluation
        self.head_optimizer = build_optimizer(o.name, self.head.parameters(), lr=self.base_lr * cfg.head.lr_scale,
                                              row_sparse=True, **common)
        self.schedulers = {"backbone": self.engine.scheduler, "head": make_scheduler(self.head_optimizer)}
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.stop_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self.best_accuracy: dict = {}
        self.metrics = None  # TrainingMetrics when enabled

    # ------------------------------------------------------------------ preemption
    def install_signal_handlers(self) -> None:
        """SIGUSR1 (SLURM's warning before preemption) and SIGTERM: checkpoint, then exit."""
        def request_stop(signum, _frame):
            self._stop_signal = signum

        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, request_stop)

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got a stop signal.

        A signal reaches ranks at different moments; the tiny all-reduce makes them
        agree on the step to stop after, so the checkpoint is collective-safe.
        """
        flag = torch.tensor([0 if self._stop_signal is None else 1], device=self.device)
        if self.runtime.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())  # host sync, one per step, for preemption safety

    # ------------------------------------------------------------------ state
    def _position(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples_in_epoch": self.batch_in_epoch * self.cfg.data.batch_size * self.runtime.world_size}

    def save(self) -> Path:
        path = self._save()
        if self.metrics is not None:
            self.metrics.observe_checkpoint(self.step)
        return path

    def _save(self) -> Path:
        # Both calls are collective under DeepSpeed (ZeRO's partitions are gathered).
        backbone_state, engine_state = self.engine.backbone_state_dict(), self.engine.state_dict()
        return ckpt.save_checkpoint(
            self.output, step=self.step, position=self._position(), config_dict=config_to_dict(self.cfg),
            backbone_name=self.cfg.model.backbone, backbone_kwargs=self.backbone_kwargs,
            backbone_state=backbone_state, head=self.head, engine_state=engine_state,
            head_optimizer=self.head_optimizer, head_scheduler=self.schedulers["head"],
            keep_last=self.cfg.train.keep_last,
        )

    def maybe_resume(self) -> Optional[Path]:
        resume = self.cfg.train.resume
        if not resume:
            return None
        path = ckpt.find_latest(self.output) if resume == "auto" else ckpt.resolve_checkpoint(resume)
        if path is None:
            return None
        manifest = ckpt.load_checkpoint(
            path, engine=self.engine, head=self.head, head_optimizer=self.head_optimizer,
            head_scheduler=self.schedulers["head"], backbone_name=self.cfg.model.backbone,
        )
        self.step = manifest["step"]
        position = manifest["position"]
        global_batch = self.cfg.data.batch_size * self.runtime.world_size
        # Samples, not batches: the world size (so batches per epoch) may have changed.
        self.epoch = position["epoch"]
        self.batch_in_epoch = position["samples_in_epoch"] // global_batch
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self.runtime.is_main:
            self._truncate_metrics_log(self.step)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                     self.batch_in_epoch)
        return path

    def _truncate_metrics_log(self, step: int) -> None:
        """Drop log records past the resumed step: those steps are about to run again,
        so after a crash and restart the log still has each step exactly once."""
        metrics_file = self.output / "metrics.jsonl"
        if not metrics_file.is_file():
            return
        kept = [line for line in metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(metrics_file, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ step
    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step; returns ``(loss, backbone grad norm or None)`` as tensors."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        accumulate = self.cfg.train.accumulate
        self.engine.train()
        self.engine.zero_grad()
        self.head_optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=self.device)
        # The engine back-propagates the head (gradient unscaled but for 1 / accumulate),
        # then the backbone; see partialfc/distributed/engines.py.
        for image_part, label_part in zip(images.chunk(accumulate), labels.chunk(accumulate)):
            loss = self.head(self.engine.forward(image_part), label_part)
            self.engine.backward(loss)
            step_loss += loss.detach() / accumulate
        grad_norm = self.engine.clip_and_step()  # also steps the backbone's schedule
        self.head_optimizer.step()
        self.schedulers["head"].step()
        return step_loss, grad_norm

    # ------------------------------------------------------------------ loop
    def _write_start_files(self) -> None:
        if not self.runtime.is_main:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "config.toml").write_text(dump_config(self.cfg))
        import platform

        import partialfc

        devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                   if self.device.type == "cuda" else [platform.processor() or platform.machine()])
        log.info("environment: partialfc %s, torch %s, python %s, backend %s, world size %d, devices %s",
                 partialfc.__version__, torch.__version__, platform.python_version(), self.runtime.backend,
                 self.runtime.world_size, devices)
        log.info("resolved config:\n%s", dump_config(self.cfg))
        log.info("run %s: %d ranks on %s, %d classes (%d per rank), %d steps/epoch, %d steps",
                 self.cfg.name, self.runtime.world_size, self.device, self.num_classes, self.head.num_local,
                 self.steps_per_epoch, self.stop_step)

    def _build_metrics(self):
        from partialfc.metrics import TrainingMetrics

        m = self.cfg.metrics
        return TrainingMetrics(
            rank=self.runtime.rank, local_rank=self.runtime.local_rank, host=m.host, port_base=m.port_base,
            tensorboard_dir=str(self.output / "tensorboard") if m.tensorboard else None, enabled=m.enabled,
        )

    def train(self) -> dict:
        self.maybe_resume()
        self._write_start_files()
        self.metrics = self._build_metrics() if self.cfg.metrics.enabled else None
        try:
            return self._train_loop()
        finally:
            if self.metrics is not None:
                self.metrics.close()

    def _progress_bar(self):
        """tqdm bar on rank 0, or None. ``auto`` shows it on a terminal only: in a batch
        job's log file a bar is noise, and the per-window log lines say the same."""
        setting = self.cfg.train.progress
        if not self.runtime.is_main or setting == "off" or (setting == "auto" and not sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.stop_step, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _train_loop(self) -> dict:
        bar = self._progress_bar()
        if bar is None:
            return self._train_steps(None)
        from tqdm.contrib.logging import logging_redirect_tqdm

        with bar, logging_redirect_tqdm():  # log lines print above the bar, not through it
            return self._train_steps(bar)

    def _train_steps(self, bar) -> dict:
        metrics_file = self.output / "metrics.jsonl"
        cfg = self.cfg.train
        started, window_start, window_steps, window_wait = time.time(), time.time(), 0, 0.0
        self._first_step = self.step  # for the ETA after a resume
        last_loss = float("nan")
        while self.step < self.stop_step and self.epoch < cfg.epochs:
            batches = iter(self.source.epoch(self.epoch, self.batch_in_epoch))
            step_start = time.perf_counter()
            for images, labels in batches:
                data_wait = time.perf_counter() - step_start
                loss, grad_norm = self.train_step(images, labels)
                self.step += 1
                self.batch_in_epoch += 1
                window_steps += 1
                window_wait += data_wait
                log_now = self.step % cfg.log_every == 0 or self.step == self.stop_step
                if log_now:
                    last_loss = float(loss)  # host sync, only on log steps
                    now = time.time()
                    images_per_s = window_steps * self.cfg.data.batch_size * self.runtime.world_size / (now - window_start)
                    self._log_step(metrics_file, last_loss, images_per_s, now - started,
                                   data_wait_share=window_wait / max(now - window_start, 1e-9))
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)
                    window_start, window_steps, window_wait = now, 0, 0.0
                if self.metrics is not None:
                    self.metrics.observe_step(
                        step=self.step, loss=last_loss if log_now else None,
                        lr=self.schedulers["backbone"].get_last_lr()[0], images=self.cfg.data.batch_size,
                        step_seconds=time.perf_counter() - step_start, data_wait_seconds=data_wait,
                        grad_norm=float(grad_norm) if (log_now and grad_norm is not None) else None,
                        num_sampled_classes=self.head.last_num_sampled,
                    )
                if bar is not None:
                    bar.update(1)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                self._maybe_evaluate()
                if self._stop_requested():
                    final = self.save()
                    log.warning("stop signal received: checkpointed step %d to %s, exiting", self.step, final)
                    self.source.close()
                    return {"step": self.step, "loss": last_loss, "checkpoint": str(final), "preempted": True}
                if self.step >= self.stop_step:
                    break
                step_start = time.perf_counter()
            else:
                report = self.source.report()
                if report and self.runtime.is_main:
                    log.info("epoch %d data report: %s", self.epoch, report)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        final = self.save()
        self.source.close()
        return {"step": self.step, "loss": last_loss, "checkpoint": str(final)}

    def _log_step(self, metrics_file: Path, loss: float, images_per_s: float, elapsed: float,
                  data_wait_share: float) -> None:
        if not self.runtime.is_main:
            return
        lr = self.schedulers["backbone"].get_last_lr()[0]
        remaining = (self.stop_step - self.step) * elapsed / max(1, self.step - self._first_step)
        log.info("step %d/%d epoch %d loss %.4f lr %.5f %.1f img/s eta %ds",
                 self.step, self.stop_step, self.epoch, loss, lr, images_per_s, remaining)
        with metrics_file.open("a") as f:
            f.write(json.dumps({"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
                                "images_per_s": images_per_s, "data_wait_share": data_wait_share}) + "\n")

    def _maybe_evaluate(self) -> None:
        every = self.cfg.eval.every
        if not every or not self.cfg.eval.sets or self.step % every:
            return
        from partialfc.eval.during_training import evaluate_during_training

        evaluate_during_training(self)
