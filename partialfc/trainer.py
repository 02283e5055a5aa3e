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
from partialfc import run_log
from partialfc import resume
from partialfc.atomic_io import append_text, atomic_write_text
from partialfc.config import Config, config_to_dict, dump_config
from partialfc.data import build_source
from partialfc.data.prefetch import prefetch_to_device
from partialfc.distributed.engines import build_engine
from partialfc.distributed.runtime import Runtime
from partialfc.eval.during_training import check_eval_sets
from partialfc.builders import backbone_kwargs, build_head, check_output_dir
from partialfc.head.label_check import DeviceLabelCheck, check_labels_on_host
from partialfc.models import build_backbone
from partialfc.models.memory_format import resolve_channels_last
from partialfc.optim import build_optimizer, build_scheduler
from partialfc.step_timer import StepTimer, format_breakdown
from partialfc.step_timer import phase as timed_phase

log = logging.getLogger("partialfc.train")


class Trainer:
    """Holds the built objects of one run and drives the step loop."""

    def __init__(self, cfg: Config, runtime: Runtime) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.output = Path(cfg.train.output)
        # Checks that need nothing built: a wrong path fails in a second, not after start-up.
        check_output_dir(self.output)
        if runtime.is_main:  # only rank 0 evaluates
            check_eval_sets(cfg.eval)
        self._stop_signal: Optional[int] = None
        self.install_signal_handlers()  # before building: a signal during start-up is remembered, not lost
        self.device = runtime.device
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
        self.head = build_head(cfg, self.num_classes, device_type=self.device.type).to(self.device)
        # The trainer checks labels itself without a device sync per step (_checked_batches,
        # self.label_check), and promises the head equal micro-batches on every rank (every
        # BatchSource yields full batches), so the head skips its per-step size gather.
        self.head.check_labels = False
        self.head.expected_batch_size = cfg.data.batch_size // cfg.train.accumulate
        self.label_check = DeviceLabelCheck(self.num_classes, every=cfg.train.poll_every)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolutions once

        o = cfg.optim
        accumulate = cfg.train.accumulate
        if cfg.data.batch_size % accumulate:
            raise ValueError(f"data.batch_size = {cfg.data.batch_size} is not divisible by "
                             f"train.accumulate = {accumulate}")
        # data.batch_size is the per-rank batch of one optimizer step; it is back-propagated
        # in `accumulate` micro-batches of batch_size / accumulate images.
        self.base_lr = o.lr * self.global_batch / o.lr_reference_batch
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
            channels_last=resolve_channels_last(cfg.train.channels_last, self.device), compile_mode=cfg.train.compile,
        )
        self.backbone = self.engine.module  # unwrapped, for evaluation
        self.head_optimizer = build_optimizer(o.name, self.head.parameters(), lr=self.base_lr * cfg.head.lr_scale,
                                              row_sparse=True, **common)
        self.schedulers = {"backbone": self.engine.scheduler, "head": make_scheduler(self.head_optimizer)}
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.resumed = (0, 0, None)  # (step, samples seen, checkpoint) where this run started
        self._saved = (None, None)  # (step, directory) of the last checkpoint written
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
        return bool(flag.item())  # host sync, every train.poll_every steps (_poll_now), for preemption safety

    def _poll_now(self) -> bool:
        """Steps where the device-waiting checks run: every ``train.poll_every``, the last step
        and checkpoint steps. A function of the step only, so every rank polls at the same step."""
        return self.step % self.cfg.train.poll_every == 0 or self.step >= self.stop_step or self._checkpoint_now()

    def _checkpoint_now(self) -> bool:
        every = self.cfg.train.checkpoint_every
        return bool(every and self.step % every == 0)

    # ------------------------------------------------------------------ state
    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.runtime.world_size

    @property
    def samples_seen(self) -> int:
        """Images trained on since step 0, over every world size this run has had."""
        step, samples, _ = self.resumed
        return samples + (self.step - step) * self.global_batch

    def _position(self) -> dict:
        epoch, batch = self.epoch, self.batch_in_epoch
        if batch >= self.steps_per_epoch:  # stopped on an epoch's last batch: the next one starts there
            epoch, batch = epoch + 1, 0
        return {"epoch": epoch, "batch_in_epoch": batch, "samples_in_epoch": batch * self.global_batch,
                "samples_seen": self.samples_seen, "global_batch": self.global_batch}

    def save(self) -> Path:
        """Checkpoint this step, once: the final save right after a periodic one, or a
        stop signal on a checkpoint step, returns the directory already written."""
        if self._saved[0] == self.step:
            return self._saved[1]
        path = self._save()
        self._saved = (self.step, path)
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
        """Apply ``train.resume`` to the output directory (see partialfc/resume.py); returns
        the checkpoint resumed from. A finished run is not loaded: ``train`` says so."""
        plan = resume.agreed_start_plan(self.output, self.cfg.train.resume, self.device)
        if plan.checkpoint is not None:
            manifest = ckpt.read_manifest(plan.checkpoint)
            ckpt.check_compatible(manifest, num_classes=self.head.num_classes,
                                  num_subcenters=self.head.num_subcenters, embedding_size=self.head.embedding_size,
                                  backbone_name=self.cfg.model.backbone, where=str(plan.checkpoint))
            progress = resume.progress_on_resume(
                manifest, global_batch=self.global_batch, steps_per_epoch=self.steps_per_epoch,
                epochs=self.cfg.train.epochs, max_steps=self.cfg.train.max_steps)
            self.step, self.epoch, self.batch_in_epoch = progress.step, progress.epoch, progress.batch_in_epoch
            self.stop_step = progress.stop_step
            self.resumed = (progress.step, progress.samples_seen, plan.checkpoint)
            if progress.steps_left == 0:
                return plan.checkpoint  # nothing to load, nothing to write
        resume.carry_out(plan, self.output, self.step, is_main=self.runtime.is_main, device=self.device)
        if plan.checkpoint is None:
            return None
        if plan.warning and self.runtime.is_main:
            log.warning("%s", plan.warning)
        ckpt.load_checkpoint(
            plan.checkpoint, engine=self.engine, head=self.head, head_optimizer=self.head_optimizer,
            head_scheduler=self.schedulers["head"], backbone_name=self.cfg.model.backbone,
        )
        if progress.saved_global_batch != self.global_batch:
            for scheduler in (self.engine.scheduler, self.schedulers["head"]):
                resume.set_schedule_step(scheduler, progress.schedule_step,
                                         self.global_batch / progress.saved_global_batch)
            if self.runtime.is_main:
                log.warning("%s", resume.rescale_message(
                    progress, world_size=self.runtime.world_size, global_batch=self.global_batch,
                    total_steps=self.total_steps, lr=self.engine.scheduler.get_last_lr()[0]))
        if self.runtime.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", plan.checkpoint, self.step, self.epoch,
                     self.batch_in_epoch)
        return plan.checkpoint

    # ------------------------------------------------------------------ step
    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step; returns ``(loss, backbone grad norm or None)`` as tensors."""
        images = images.to(self.device, non_blocking=True)  # no-ops after prefetch_to_device
        labels = labels.to(self.device, non_blocking=True)
        if labels.device.type != "cpu":
            self.label_check.observe(labels, self.step + 1)  # device ops only; read at _poll_now steps
        accumulate = self.cfg.train.accumulate
        self.engine.train()
        self.engine.zero_grad()
        self.head_optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=self.device)
        # The engine back-propagates the head (gradient unscaled but for 1 / accumulate),
        # then the backbone; see partialfc/distributed/engines.py.
        for image_part, label_part in zip(images.chunk(accumulate), labels.chunk(accumulate)):
            embeddings = self.engine.forward(image_part)
            with timed_phase("head"):  # the engine times the head's backward under the same name
                loss = self.head(embeddings, label_part)
            self.engine.backward(loss)
            step_loss += loss.detach() / accumulate
        grad_norm = self.engine.clip_and_step()  # also steps the backbone's schedule
        with timed_phase("optimizer"):
            self.head_optimizer.step()
            self.schedulers["head"].step()
        return step_loss, grad_norm

    def _checked_batches(self):
        """This epoch's batches, host labels range-checked before they are copied to the
        device (host work, no device sync); labels made on the device are checked by
        ``self.label_check`` instead. Then one batch is kept in flight to the device."""
        def checked():
            step = self.step
            for images, labels in self.source.epoch(self.epoch, self.batch_in_epoch):
                step += 1
                if labels.device.type == "cpu":
                    check_labels_on_host(labels, self.num_classes, where=f"step {step}: ")
                yield images, labels

        return prefetch_to_device(checked(), self.device)

    # ------------------------------------------------------------------ loop
    def _write_start_files(self) -> None:
        if not self.runtime.is_main:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        # From here on rank 0's log also goes to OUTPUT/train.log (appended across starts). It
        # stays attached until the caller's run_log.detach_log_file(), so an error line reaches it.
        run_log.attach_log_file(self.output, self.runtime.rank)
        if self.resumed[2] is not None:
            run_log.log_to_file_only(f"resumed from {self.resumed[2]} at step {self.step}")
        atomic_write_text(self.output / "config.toml", dump_config(self.cfg))
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
        log.info("data: %s, %s batches/epoch of %d per rank", self.source.describe(), f"{len(self.source):,}",
                 self.cfg.data.batch_size)

    def _build_metrics(self):
        from partialfc.metrics import TrainingMetrics

        m = self.cfg.metrics
        return TrainingMetrics(
            rank=self.runtime.rank, local_rank=self.runtime.local_rank, host=m.host, port_base=m.port_base,
            tensorboard_dir=str(self.output / "tensorboard") if m.tensorboard else None, enabled=m.enabled,
        )

    def train(self) -> dict:
        self.maybe_resume()
        if self.step >= self.stop_step:
            return self._nothing_left()
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
        started = time.time()
        self._first_step = self.step  # for the ETA after a resume
        timer = self.timer = StepTimer(self.device).install()
        try:
            return self._run_epochs(bar, timer, metrics_file, started)
        finally:
            timer.uninstall()

    def _run_epochs(self, bar, timer: StepTimer, metrics_file: Path, started: float) -> dict:
        cfg = self.cfg.train
        window_start, window_steps, window_wait = time.time(), 0, 0.0
        last_loss = float("nan")
        while self.step < self.stop_step and self.epoch < cfg.epochs:
            batches = iter(self._checked_batches())
            step_start = time.perf_counter()
            if not timer.step_open:  # open across an epoch boundary: the new epoch's start is data wait
                timer.start_step()
            for images, labels in batches:
                timer.data_ready()
                self.runtime.supervisor.batch_arrived()
                data_wait = time.perf_counter() - step_start
                loss, grad_norm = self.train_step(images, labels)
                timer.end_step()
                self.step += 1
                self.batch_in_epoch += 1
                window_steps += 1
                window_wait += data_wait
                log_now = self.step % cfg.log_every == 0 or self.step == self.stop_step
                if log_now:
                    last_loss = float(loss)  # host sync, only on log steps
                    now = time.time()
                    images_per_s = window_steps * self.global_batch / (now - window_start)
                    breakdown = timer.summary()["phases"]  # reads the window's CUDA events: a log-step sync
                    self._log_step(metrics_file, last_loss, images_per_s, now - started,
                                   data_wait_share=window_wait / max(now - window_start, 1e-9), breakdown=breakdown)
                    if self.metrics is not None:
                        self.metrics.observe_breakdown(self.step, breakdown)
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
                poll_now = self._poll_now()
                if poll_now:
                    self.label_check.check(force=True)  # before any checkpoint holds a bad batch's update
                if self._checkpoint_now():
                    self.save()
                self._maybe_evaluate()
                if poll_now and self._stop_requested():
                    final = self.save()
                    log.warning("stop signal received: checkpointed step %d to %s, exiting", self.step, final)
                    self.source.close()
                    return {"step": self.step, "loss": last_loss, "checkpoint": str(final), "preempted": True}
                if self.step >= self.stop_step:
                    break
                self.runtime.supervisor.beat(self.step)  # alive; next: wait for the loader
                step_start = time.perf_counter()
                timer.start_step()
            else:
                report = self.source.report()
                if report and self.runtime.is_main:
                    log.info("epoch %d data report: %s", self.epoch, report)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        timer.discard_step()  # opened after the last batch of an epoch that turned out to be the end
        self.label_check.check(force=True)
        final = self.save()  # the step checkpoint_every just saved is not saved again
        self.source.close()
        return {"step": self.step, "loss": last_loss, "checkpoint": str(final)}

    def _nothing_left(self) -> dict:
        """A resumed run that is already finished: say so, write nothing, succeed."""
        checkpoint = self.resumed[2]
        if self.runtime.is_main:
            limit = (f" (train.max_steps = {self.cfg.train.max_steps})"
                     if self.cfg.train.max_steps and self.step >= self.cfg.train.max_steps else "")
            log.info("nothing left to train: %s is at step %d of %d%s", checkpoint, self.step, self.stop_step, limit)
        self.source.close()
        return {"step": self.step, "checkpoint": str(checkpoint), "nothing_left": True}

    def _log_step(self, metrics_file: Path, loss: float, images_per_s: float, elapsed: float,
                  data_wait_share: float, breakdown: dict) -> None:
        if not self.runtime.is_main:
            return
        lr = self.schedulers["backbone"].get_last_lr()[0]
        remaining = (self.stop_step - self.step) * elapsed / max(1, self.step - self._first_step)
        log.info("step %d/%d epoch %d loss %.4f lr %.5f %.1f img/s eta %ds | %s",
                 self.step, self.stop_step, self.epoch, loss, lr, images_per_s, remaining, format_breakdown(breakdown))
        append_text(metrics_file, json.dumps({
            "step": self.step, "epoch": self.epoch, "samples": self.samples_seen, "loss": loss, "lr": lr,
            "images_per_s": images_per_s, "data_wait_share": data_wait_share, "breakdown": breakdown}) + "\n")

    def _maybe_evaluate(self) -> None:
        """Every ``eval.every`` steps, and at the last step (the model the run ends with)."""
        every = self.cfg.eval.every
        if not every or not self.cfg.eval.sets or (self.step % every and self.step < self.stop_step):
            return
        from partialfc.eval.during_training import evaluate_during_training

        evaluate_during_training(self)
