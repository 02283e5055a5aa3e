"""Training telemetry: a Prometheus endpoint per rank and TensorBoard scalars on rank 0.

Why per rank: on a multi-node job the interesting failures are local (one slow loader,
one rank leaking host memory, one GPU close to OOM), so every process serves its own
numbers on ``port_base + local_rank`` from its own ``CollectorRegistry`` and a scraper
sees each rank separately (every series also carries a ``rank`` label). TensorBoard
gets the same scalars from rank 0 only, for the loss curve people look at.

The trainer owns timing and host syncs: it passes plain Python numbers, and ``None``
for the loss or gradient norm on steps where it did not read them back from the
device (those gauges then keep their last value). Nothing here touches CUDA streams
beyond the memory counters, which are host-side bookkeeping in the caching allocator.

``prometheus-client`` is required when metrics are enabled; ``tensorboard`` is
optional: without it a warning is logged and only Prometheus is served.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import sys
from typing import Optional

log = logging.getLogger("partialfc.metrics")

# Step and data-wait times span ~1 ms (small CPU batches, prefetched data) to tens of
# seconds (a stalled file system), so the buckets are roughly logarithmic.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
THROUGHPUT_WINDOW = 20
"""Steps averaged by the images/s gauge (a single step is too noisy to read)."""


class MetricsEndpointError(ValueError):
    """The rank's HTTP endpoint cannot be opened (port in use, no permission, bad host):
    a ValueError, so the entrypoint prints it as one line."""


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"TrainingMetrics: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"TrainingMetrics: {name} must be >= {minimum}, got {value!r}")
    return value


def _check_number(name: str, value, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"TrainingMetrics: {name} must be a number, got {value!r}")
    return float(value)


def process_rss_bytes() -> int:
    """Resident set size of this process (current on Linux, peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def cuda_memory_bytes() -> dict[str, tuple[int, int, int]]:
    """``{device: (allocated, reserved, peak allocated)}`` of this rank's CUDA device; {} without CUDA.

    Only the current device: querying the others would create a CUDA context (hundreds
    of MB) on every GPU of the node from every rank.
    """
    torch = sys.modules.get("torch")  # never import torch (or init CUDA) just to read counters
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    index = torch.cuda.current_device()
    return {str(index): (torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index),
                         torch.cuda.max_memory_allocated(index))}


class TrainingMetrics:
    """What one training process reports; every method is a no-op when disabled.

    ``port_base = 0`` builds the registry but serves no HTTP endpoint (tests, or a
    scraper-less run); otherwise the endpoint is ``http://host:(port_base + local_rank)/metrics``.
    """

    def __init__(self, *, rank: int, local_rank: int, host: str = "127.0.0.1", port_base: int = 0,
                 tensorboard_dir: str | None = None, enabled: bool = True) -> None:
        self.rank = _check_int("rank", rank, 0)
        self.local_rank = _check_int("local_rank", local_rank, 0)
        _check_int("port_base", port_base, 0)
        if not isinstance(host, str) or not host:
            raise TypeError(f"TrainingMetrics: host must be a non-empty string, got {host!r}")
        if port_base and port_base + local_rank > 65535:
            raise ValueError(f"TrainingMetrics: port_base {port_base} + local_rank {local_rank} "
                             f"exceeds 65535; lower metrics.port_base")
        self.enabled = bool(enabled)
        self.registry = None
        self._server = None
        self._thread = None
        self._writer = None
        self._port: Optional[int] = None
        self._window = collections.deque(maxlen=THROUGHPUT_WINDOW)  # (images, seconds) per step
        if not self.enabled:
            return
        self._build_registry()
        if port_base:
            self._serve(host, port_base)
        if tensorboard_dir and self.rank == 0:
            self._writer = _open_tensorboard(tensorboard_dir)

    # ------------------------------------------------------------------ set-up
    def _build_registry(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)  # standard process_* series (CPU seconds, fds, RSS)
        rank = ("rank",)

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, rank + tuple(extra), registry=registry)

        self._step = gauge("partialfc_step", "Last completed optimizer step.")
        self._images_per_second = gauge(
            "partialfc_images_per_second", f"Images/s of this rank over the last {THROUGHPUT_WINDOW} steps.")
        self._loss = gauge("partialfc_loss", "Last training loss read back from the device.")
        self._lr = gauge("partialfc_learning_rate", "Backbone learning rate after the last step.")
        self._grad_norm = gauge("partialfc_grad_norm", "Backbone gradient norm before clipping.")
        self._sampled = gauge("partialfc_head_sampled_classes", "Classes kept by this rank's Partial FC shard.")
        self._checkpoint_step = gauge("partialfc_last_checkpoint_step", "Step of the last checkpoint written.")
        self._eval = gauge("partialfc_eval_accuracy", "Verification accuracy per evaluation set.", ("set",))
        self._eval_step = gauge("partialfc_eval_step", "Step of the last evaluation.")
        self._phase_seconds = gauge("partialfc_step_phase_seconds",
                                    "Mean seconds per step spent in each phase over the last log window "
                                    "(partialfc/step_timer.py: device time on CUDA).", ("phase",))
        self._phase_share = gauge("partialfc_step_phase_share",
                                  "Share of the step spent in each phase over the last log window.", ("phase",))
        self._rss = gauge("partialfc_cpu_memory_rss_bytes", "Resident host memory of this process.")
        self._cuda = {
            kind: gauge(f"partialfc_cuda_memory_{kind}_bytes", f"CUDA caching allocator: {kind} bytes.", ("device",))
            for kind in ("allocated", "reserved", "peak_allocated")
        }
        self._images_total = Counter("partialfc_images", "Images processed by this rank.", rank, registry=registry)
        self._steps_total = Counter("partialfc_steps", "Steps observed on this rank.", rank, registry=registry)
        self._step_seconds = Histogram("partialfc_step_seconds", "Wall time of one step, data wait included.",
                                       rank, buckets=TIME_BUCKETS, registry=registry)
        self._data_wait = Histogram("partialfc_data_wait_seconds", "Time one step waited for its batch.",
                                    rank, buckets=TIME_BUCKETS, registry=registry)
        self._label = str(self.rank)

    def _serve(self, host: str, port_base: int) -> None:
        from prometheus_client import start_http_server

        port = port_base + self.local_rank
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            where = f"(metrics.port_base = {port_base}, local rank {self.local_rank})"
            if exc.errno == errno.EADDRINUSE:
                problem = f"metrics port {port} on {host} is in use {where}"
            else:
                problem = f"metrics endpoint {host}:{port} cannot be opened {where}: {exc.strerror or exc}"
            raise MetricsEndpointError(f"{problem}; choose another metrics.port_base or 0 to serve nothing") from None
        self._port = self._server.server_address[1]
        log.info("rank %d serves Prometheus metrics on http://%s:%d/metrics", self.rank, host, self._port)

    @property
    def port(self) -> int | None:
        """The HTTP port of this rank's endpoint, or None when none is served."""
        return self._port

    # ------------------------------------------------------------------ observe
    def observe_step(self, *, step: int, loss: float | None, lr: float, images: int, step_seconds: float,
                     data_wait_seconds: float, grad_norm: float | None, num_sampled_classes: int) -> None:
        """Record one optimizer step of this rank.

        ``images``: images this rank processed in the step; ``step_seconds``: wall time of
        the whole step including ``data_wait_seconds`` (the time blocked on the loader).
        """
        if not self.enabled:
            return
        _check_int("step", step, 0)
        _check_int("images", images, 0)
        _check_int("num_sampled_classes", num_sampled_classes, 0)
        loss = _check_number("loss", loss, allow_none=True)
        grad_norm = _check_number("grad_norm", grad_norm, allow_none=True)
        lr = _check_number("lr", lr)
        step_seconds = _check_number("step_seconds", step_seconds)
        data_wait_seconds = _check_number("data_wait_seconds", data_wait_seconds)
        if step_seconds < 0 or data_wait_seconds < 0:
            raise ValueError(f"TrainingMetrics: negative time at step {step}: step_seconds={step_seconds}, "
                             f"data_wait_seconds={data_wait_seconds}")

        label = self._label
        self._window.append((images, step_seconds))
        window_seconds = sum(seconds for _, seconds in self._window)
        images_per_second = sum(n for n, _ in self._window) / window_seconds if window_seconds > 0 else 0.0
        self._step.labels(label).set(step)
        self._images_per_second.labels(label).set(images_per_second)
        self._lr.labels(label).set(lr)
        self._sampled.labels(label).set(num_sampled_classes)
        if loss is not None:
            self._loss.labels(label).set(loss)
        if grad_norm is not None:
            self._grad_norm.labels(label).set(grad_norm)
        self._images_total.labels(label).inc(images)
        self._steps_total.labels(label).inc()
        self._step_seconds.labels(label).observe(step_seconds)
        self._data_wait.labels(label).observe(data_wait_seconds)
        self._update_memory()

        if self._writer is not None:
            scalars = {"train/lr": lr, "train/images_per_second": images_per_second,
                       "train/step_seconds": step_seconds, "train/data_wait_seconds": data_wait_seconds,
                       "head/sampled_classes": num_sampled_classes}
            if loss is not None:
                scalars["train/loss"] = loss
            if grad_norm is not None:
                scalars["train/grad_norm"] = grad_norm
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)

    def _update_memory(self) -> None:
        self._rss.labels(self._label).set(process_rss_bytes())
        for device, values in cuda_memory_bytes().items():
            for kind, value in zip(("allocated", "reserved", "peak_allocated"), values):
                self._cuda[kind].labels(self._label, device).set(value)

    def observe_breakdown(self, step: int, phases: dict) -> None:
        """``phases``: ``StepTimer.summary()["phases"]``, ``{name: {"seconds", "share"}}``."""
        if not self.enabled:
            return
        for name, values in phases.items():
            self._phase_seconds.labels(self._label, name).set(_check_number("seconds", values["seconds"]))
            self._phase_share.labels(self._label, name).set(_check_number("share", values["share"]))
        if self._writer is not None:
            for name, values in phases.items():
                self._writer.add_scalar(f"step_phase_share/{name}", values["share"], step)

    def observe_checkpoint(self, step: int) -> None:
        if not self.enabled:
            return
        self._checkpoint_step.labels(self._label).set(_check_int("step", step, 0))

    def observe_eval(self, step: int, results: dict[str, float]) -> None:
        """``results``: accuracy per verification set, e.g. ``{"lfw": 0.9953}``."""
        if not self.enabled:
            return
        _check_int("step", step, 0)
        if not isinstance(results, dict):
            raise TypeError(f"TrainingMetrics: eval results must be a dict of set name -> accuracy, got {results!r}")
        checked = {}
        for name, value in results.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"TrainingMetrics: eval set name must be a non-empty string, got {name!r}")
            checked[name] = _check_number(f"eval accuracy of {name!r}", value)
        self._eval_step.labels(self._label).set(step)
        for name, value in checked.items():
            self._eval.labels(self._label, name).set(value)
            if self._writer is not None:
                self._writer.add_scalar(f"eval/{name}", value, step)

    def close(self) -> None:
        """Stop the endpoint and flush TensorBoard; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TrainingMetrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_tensorboard(directory: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard scalars in %s (pip install tensorboard)",
                    directory)
        return None
    return SummaryWriter(log_dir=str(directory))
