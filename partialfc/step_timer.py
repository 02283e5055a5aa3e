"""Where a training step's time goes, measured without a host sync per step.

A step is split into phases:

==================  ============================================================
``data_wait``       from ``start_step()`` to ``data_ready()``: waiting for the batch
``backbone_forward`` the engine's forward
``head``            the Partial FC head's forward and backward (exclusive of comm.)
``backbone_backward`` the engine's backbone backward (DDP's gradient all-reduce runs
                    under it in buckets; the part it does not hide lands here)
``optimizer``       clipping and both optimizer steps and schedules
``communication``   the head's collectives (embedding/label all-gather, the two
                    all-reduces of the softmax statistics, the gradient
                    reduce-scatter), including waiting for the slowest rank
``other``           the rest of the step (Python between phases, anything untimed)
==================  ============================================================

Phases nest: ``communication`` opened inside ``head`` is subtracted from ``head``, so
the phases and ``other`` add up to the step. Code anywhere (the engine, the head's
collectives) opens a phase with the module function ``phase(name)``, which does
nothing unless a timer is installed and a step is open -- the cost of an idle
``with phase(...)`` is one function call.

On CUDA every boundary is a ``torch.cuda.Event`` recorded on the current stream, and
the elapsed times are read only in ``summary()`` (at log time): no sync per step. A
phase's time is then *device* time between its boundaries: the GPU working on that
phase or idle waiting for the host to enqueue it. ``data_wait`` in particular is the
time the GPU sat idle while the host fetched the batch -- zero when the host runs
ahead of the GPU, which is the point. On CPU the boundaries are ``perf_counter``
readings (the host is the device). Tests inject a clock.
"""
from __future__ import annotations

import collections
import contextlib
import time
from typing import Callable, Optional

import torch

PHASES = ("data_wait", "backbone_forward", "head", "backbone_backward", "optimizer", "communication")
MAX_STEPS_KEPT = 1000  # a window longer than this keeps its last steps only

_active: Optional["StepTimer"] = None
_IDLE = contextlib.nullcontext()


def phase(name: str):
    """``with phase("head"): ...`` times the block in the installed timer, if any."""
    timer = _active
    if timer is None or timer._step is None:
        return _IDLE
    return timer.phase(name)


class _Step:
    __slots__ = ("start", "end", "spans")

    def __init__(self, start):
        self.start = start
        self.end = None
        self.spans: list = []  # [name, parent index or None, start mark, end mark]


class StepTimer:
    """Per-phase step times over a window of steps; see the module docstring."""

    def __init__(self, device: torch.device | str = "cpu", clock: Optional[Callable[[], float]] = None) -> None:
        self.device = torch.device(device)
        self.use_events = self.device.type == "cuda" and clock is None
        self.clock = clock or time.perf_counter
        self._steps: collections.deque = collections.deque(maxlen=MAX_STEPS_KEPT)
        self._step: Optional[_Step] = None
        self._open: list = []  # indices of the open spans of the current step, innermost last

    # ------------------------------------------------------------------ marks
    def _mark(self):
        if self.use_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return self.clock()

    def _elapsed(self, start, end) -> float:
        if self.use_events:
            end.synchronize()  # at summary time only; the window's events are long done
            return start.elapsed_time(end) / 1000.0
        return end - start

    # ------------------------------------------------------------------ install
    def install(self) -> "StepTimer":
        """Make this the timer that ``phase(...)`` calls anywhere in the process report to."""
        global _active
        _active = self
        return self

    def uninstall(self) -> None:
        global _active
        if _active is self:
            _active = None

    # ------------------------------------------------------------------ step
    def start_step(self) -> None:
        """Open a step; its ``data_wait`` starts now (call it just before fetching the batch)."""
        if self._step is not None:
            raise RuntimeError("start_step() while a step is open; call end_step() first")
        now = self._mark()
        self._step = _Step(now)
        self._step.spans.append(["data_wait", None, now, None])
        self._open = [0]

    def data_ready(self) -> None:
        """The batch is in hand: close ``data_wait``."""
        if self._step is None or self._open != [0] or self._step.spans[0][3] is not None:
            raise RuntimeError("data_ready() must follow start_step() once, outside any phase")
        self._step.spans[0][3] = self._mark()
        self._open = []

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in PHASES or name == "data_wait":
            raise ValueError(f"unknown step phase {name!r}; one of {PHASES[1:]}")
        step = self._step
        if step is None:
            yield
            return
        parent = self._open[-1] if self._open else None
        index = len(step.spans)
        step.spans.append([name, parent, self._mark(), None])
        self._open.append(index)
        try:
            yield
        finally:
            step.spans[index][3] = self._mark()
            if self._open and self._open[-1] == index:
                self._open.pop()

    @property
    def step_open(self) -> bool:
        return self._step is not None

    def discard_step(self) -> None:
        """Drop the open step, if any (opened for a batch that never came: the run ended)."""
        self._step = None
        self._open = []

    def end_step(self) -> None:
        step = self._step
        if step is None:
            raise RuntimeError("end_step() without start_step()")
        if self._open:
            names = [step.spans[i][0] for i in self._open]
            raise RuntimeError(f"end_step() with phases still open: {names}")
        step.end = self._mark()
        self._steps.append(step)
        self._step = None

    # ------------------------------------------------------------------ read
    def summary(self, reset: bool = True) -> dict:
        """Mean seconds per step and share of the step, per phase, over the steps since
        the last reset: ``{"steps": n, "step_seconds": s, "phases": {name: {"seconds",
        "share"}}}`` with every name of ``PHASES`` plus ``other``. Reads the device's
        events: call it at log time, not per step."""
        steps = list(self._steps)
        if reset:
            self._steps.clear()
        totals = dict.fromkeys(PHASES, 0.0)
        step_total = 0.0
        for step in steps:
            step_total += self._elapsed(step.start, step.end)
            inclusive = [self._elapsed(s[2], s[3]) for s in step.spans]
            exclusive = list(inclusive)
            for (name, parent, _, _), seconds in zip(step.spans, inclusive):
                if parent is not None:
                    exclusive[parent] -= seconds
            for (name, _, _, _), seconds in zip(step.spans, exclusive):
                totals[name] += seconds
        count = len(steps)
        if count == 0:
            return {"steps": 0, "step_seconds": 0.0,
                    "phases": {name: {"seconds": 0.0, "share": 0.0} for name in (*PHASES, "other")}}
        step_seconds = step_total / count
        means = {name: total / count for name, total in totals.items()}
        means["other"] = step_seconds - sum(means.values())
        share = (lambda s: s / step_seconds) if step_seconds > 0 else (lambda s: 0.0)
        return {"steps": count, "step_seconds": step_seconds,
                "phases": {name: {"seconds": seconds, "share": share(seconds)} for name, seconds in means.items()}}


SHORT_NAMES = {"data_wait": "data", "backbone_forward": "fwd", "head": "head", "backbone_backward": "bwd",
               "optimizer": "opt", "communication": "comm", "other": "other"}


def format_breakdown(phases: dict) -> str:
    """``summary()["phases"]`` as one log-line fragment: ``data 2% fwd 31% head 20% ...``."""
    return " ".join(f"{SHORT_NAMES.get(name, name)} {100 * values['share']:.0f}%" for name, values in phases.items())


__all__ = ["PHASES", "StepTimer", "format_breakdown", "phase"]
