"""StepTimer's accounting, with an injected clock (no sleeps, no timed assertions)."""
from __future__ import annotations

import pytest
import torch

from partialfc import step_timer
from partialfc.step_timer import PHASES, StepTimer


class FakeClock:
    """Returns ``now``; tests move it by hand, or it ticks by ``tick`` per reading."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        value = self.now
        self.now += self.tick
        return value


def _run_step(timer, clock, times):
    """One step with boundaries at the given times (seconds)."""
    clock.now = times["start"]
    timer.start_step()
    clock.now = times["data"]
    timer.data_ready()
    clock.now = times["forward"][0]
    with timer.phase("backbone_forward"):
        clock.now = times["forward"][1]
    clock.now = times["head"][0]
    with timer.phase("head"):
        clock.now = times["comm"][0]
        with timer.phase("communication"):
            clock.now = times["comm"][1]
        clock.now = times["head"][1]
    clock.now = times["backward"][0]
    with timer.phase("backbone_backward"):
        clock.now = times["backward"][1]
    clock.now = times["optimizer"][0]
    with timer.phase("optimizer"):
        clock.now = times["optimizer"][1]
    clock.now = times["end"]
    timer.end_step()


STEP = {"start": 0.0, "data": 2.0, "forward": (2.0, 5.0), "head": (5.5, 9.5), "comm": (6.0, 8.5),
        "backward": (9.5, 12.0), "optimizer": (12.0, 13.0), "end": 14.0}


def test_phases_are_exclusive_and_add_up_to_the_step():
    clock = FakeClock()
    timer = StepTimer("cpu", clock=clock)
    _run_step(timer, clock, STEP)
    summary = timer.summary()
    seconds = {name: entry["seconds"] for name, entry in summary["phases"].items()}
    assert summary["steps"] == 1 and summary["step_seconds"] == 14.0
    assert seconds == {"data_wait": 2.0, "backbone_forward": 3.0, "head": 1.5, "communication": 2.5,
                       "backbone_backward": 2.5, "optimizer": 1.0, "other": 1.5}
    assert sum(seconds.values()) == pytest.approx(14.0)
    assert summary["phases"]["data_wait"]["share"] == pytest.approx(2.0 / 14.0)
    assert sum(e["share"] for e in summary["phases"].values()) == pytest.approx(1.0)


def test_summary_averages_the_window_and_resets():
    clock = FakeClock()
    timer = StepTimer("cpu", clock=clock)
    _run_step(timer, clock, STEP)
    shifted = {k: (tuple(t + 100 for t in v) if isinstance(v, tuple) else v + 100) for k, v in STEP.items()}
    shifted["data"] = 105.0  # this step waits 5 s for its batch, and starts everything 3 s later
    shifted.update({k: tuple(t + 3 for t in v) for k, v in shifted.items() if isinstance(v, tuple)})
    shifted["end"] += 3
    _run_step(timer, clock, shifted)
    summary = timer.summary(reset=False)
    assert summary["steps"] == 2
    assert summary["step_seconds"] == pytest.approx((14.0 + 17.0) / 2)
    assert summary["phases"]["data_wait"]["seconds"] == pytest.approx((2.0 + 5.0) / 2)
    assert summary["phases"]["optimizer"]["seconds"] == pytest.approx(1.0)
    assert timer.summary()["steps"] == 2  # reset=False kept them; this call resets
    empty = timer.summary()
    assert empty["steps"] == 0 and set(empty["phases"]) == {*PHASES, "other"}


def test_time_between_steps_is_not_counted():
    """Logging, checkpoints and evaluation run between end_step and the next start_step."""
    clock = FakeClock()
    timer = StepTimer("cpu", clock=clock)
    _run_step(timer, clock, STEP)
    later = {k: (tuple(t + 1000 for t in v) if isinstance(v, tuple) else v + 1000) for k, v in STEP.items()}
    _run_step(timer, clock, later)
    summary = timer.summary()
    assert summary["step_seconds"] == 14.0
    assert summary["phases"]["data_wait"]["seconds"] == 2.0


def test_module_phase_is_a_no_op_without_an_installed_timer_or_open_step():
    clock = FakeClock(tick=1.0)
    timer = StepTimer("cpu", clock=clock)
    with step_timer.phase("head"):  # nothing installed
        pass
    timer.install()
    try:
        with step_timer.phase("head"):  # installed, but no step open
            pass
        assert clock.now == 0.0  # the clock was never read
        timer.start_step()
        timer.data_ready()
        with step_timer.phase("head"):
            pass
        timer.end_step()
    finally:
        timer.uninstall()
    assert step_timer._active is None
    summary = timer.summary()
    assert summary["phases"]["head"]["seconds"] == 1.0  # one tick between its two readings


def test_engine_reports_its_phases():
    """The engine opens backbone_forward, head (the head's backward), backbone_backward
    and optimizer; each boundary reads the clock once, so with a clock that ticks 1 s
    per reading every phase must show up with whole seconds."""
    from partialfc.distributed.engines import build_engine
    from partialfc.models import build_backbone

    torch.manual_seed(0)
    engine = build_engine("ddp", build_backbone("mobilefacenet_tiny", embedding_size=8),
                          device=torch.device("cpu"), make_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                          make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0))
    clock = FakeClock(tick=1.0)
    timer = StepTimer("cpu", clock=clock).install()
    try:
        timer.start_step()
        timer.data_ready()
        embeddings = engine.forward(torch.randn(2, 3, 112, 112))
        with step_timer.phase("head"):
            loss = embeddings.square().mean()
        engine.backward(loss)
        engine.clip_and_step()
        timer.end_step()
    finally:
        timer.uninstall()
    phases = timer.summary()["phases"]
    for name in ("data_wait", "backbone_forward", "head", "backbone_backward", "optimizer"):
        assert phases[name]["seconds"] >= 1.0, (name, phases)
    assert phases["communication"]["seconds"] == 0.0
    # Two "head" spans (forward in the trainer, backward in the engine): one tick each.
    assert phases["head"]["seconds"] == 2.0


def test_misuse_is_reported():
    timer = StepTimer("cpu", clock=FakeClock())
    with pytest.raises(RuntimeError, match="end_step\\(\\) without start_step\\(\\)"):
        timer.end_step()
    timer.start_step()
    with pytest.raises(RuntimeError, match="start_step\\(\\) while a step is open"):
        timer.start_step()
    with pytest.raises(RuntimeError, match="end_step\\(\\) with phases still open: \\['data_wait'\\]"):
        timer.end_step()
    timer.data_ready()
    with pytest.raises(RuntimeError, match="data_ready\\(\\) must follow start_step\\(\\) once"):
        timer.data_ready()
    with pytest.raises(ValueError, match="unknown step phase 'backbone'"):
        with timer.phase("backbone"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for event timing")
def test_cuda_events_time_device_work():
    timer = StepTimer("cuda")
    assert timer.use_events
    a = torch.randn(2048, 2048, device="cuda")
    timer.start_step()
    timer.data_ready()
    with timer.phase("backbone_forward"):
        for _ in range(20):
            a = a @ a.T / 2048
    timer.end_step()
    summary = timer.summary()
    assert summary["steps"] == 1 and summary["phases"]["backbone_forward"]["seconds"] > 0
    assert sum(e["share"] for e in summary["phases"].values()) == pytest.approx(1.0)
