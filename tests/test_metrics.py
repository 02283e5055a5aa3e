"""TrainingMetrics: scrape the real HTTP endpoint, parse the text format, compare every
value with numbers computed here from the observed inputs (numpy), plus the disabled,
no-endpoint, bad-input and TensorBoard paths."""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import generate_latest  # required, not skipped: CI must install prometheus-client
from prometheus_client.parser import text_string_to_metric_families

from partialfc import metrics as metrics_module
from partialfc.metrics import THROUGHPUT_WINDOW, TIME_BUCKETS, MetricsEndpointError, TrainingMetrics
from spawn import free_port, run_ranks  # tests/ is on sys.path (conftest.py)


def two_free_ports() -> int:
    """A port P with P and P + 1 free: the endpoints of local ranks 0 and 1."""
    while True:
        port = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def scrape(port: int) -> dict:
    """{(sample name, frozenset(labels)): value} from the live endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def parse(text: str) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    key = (name, frozenset({k: str(v) for k, v in labels.items()}.items()))
    if key not in samples:
        near = sorted(k for k in samples if k[0] == name)
        raise AssertionError(f"{name}{labels} not scraped; have {near}")
    return samples[key]


def random_steps(rng, count: int) -> list[dict]:
    steps = []
    for index in range(count):
        steps.append(dict(
            step=index + 1,
            loss=None if index % 3 == 1 else float(rng.uniform(1, 20)),
            lr=float(rng.uniform(1e-4, 0.2)),
            images=int(rng.integers(1, 300)),
            step_seconds=float(rng.uniform(0.002, 3.0)),
            data_wait_seconds=float(rng.uniform(0.0, 0.04)) * (index % 2),
            grad_norm=None if index % 4 == 3 else float(rng.uniform(0, 9)),
            num_sampled_classes=int(rng.integers(1, 5000)),
        ))
    return steps


def test_endpoint_reports_observed_values(tmp_path):
    rng = np.random.default_rng(11)
    steps = random_steps(rng, 7)
    port_base = free_port() - 1  # local_rank 1 -> port_base + 1 is the free port
    with TrainingMetrics(rank=3, local_rank=1, port_base=port_base) as m:
        assert m.port == port_base + 1
        for step in steps:
            m.observe_step(**step)
        m.observe_checkpoint(5)
        m.observe_eval(6, {"lfw": 0.9951, "cfp_fp": 0.9312})
        m.observe_eval(7, {"lfw": 0.9962})
        samples = scrape(m.port)

    r = {"rank": 3}
    images = np.array([s["images"] for s in steps], dtype=np.float64)
    seconds = np.array([s["step_seconds"] for s in steps])
    waits = [s["data_wait_seconds"] for s in steps]
    last_loss = [s["loss"] for s in steps if s["loss"] is not None][-1]
    last_norm = [s["grad_norm"] for s in steps if s["grad_norm"] is not None][-1]
    assert value(samples, "partialfc_step", **r) == 7
    assert value(samples, "partialfc_images_per_second", **r) == pytest.approx(images.sum() / seconds.sum(), rel=1e-12)
    assert value(samples, "partialfc_loss", **r) == pytest.approx(last_loss)
    assert value(samples, "partialfc_grad_norm", **r) == pytest.approx(last_norm)
    assert value(samples, "partialfc_learning_rate", **r) == pytest.approx(steps[-1]["lr"])
    assert value(samples, "partialfc_head_sampled_classes", **r) == steps[-1]["num_sampled_classes"]
    assert value(samples, "partialfc_images_total", **r) == images.sum()
    assert value(samples, "partialfc_steps_total", **r) == 7
    assert value(samples, "partialfc_last_checkpoint_step", **r) == 5
    assert value(samples, "partialfc_eval_step", **r) == 7
    assert value(samples, "partialfc_eval_accuracy", set="lfw", **r) == pytest.approx(0.9962)
    assert value(samples, "partialfc_eval_accuracy", set="cfp_fp", **r) == pytest.approx(0.9312)

    for name, observed in (("partialfc_step_seconds", seconds), ("partialfc_data_wait_seconds", waits)):
        assert value(samples, f"{name}_count", **r) == len(observed)
        assert value(samples, f"{name}_sum", **r) == pytest.approx(float(np.sum(observed)), rel=1e-12)
        for upper in list(TIME_BUCKETS) + [float("inf")]:
            expected = int((np.asarray(observed) <= upper).sum())
            le = "+Inf" if upper == float("inf") else repr(float(upper))
            assert value(samples, f"{name}_bucket", le=le, **r) == expected, (name, le)

    rss = value(samples, "partialfc_cpu_memory_rss_bytes", **r)
    own = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert 0.5 * own < rss < 2 * own
    assert value(samples, "process_resident_memory_bytes") > 0  # the standard process collector
    assert not any(name.startswith("partialfc_cuda") for name, _ in samples)  # no CUDA here


def test_throughput_uses_the_last_window_only():
    rng = np.random.default_rng(5)
    steps = random_steps(rng, THROUGHPUT_WINDOW + 9)
    m = TrainingMetrics(rank=0, local_rank=0)
    for step in steps:
        m.observe_step(**step)
    tail = steps[-THROUGHPUT_WINDOW:]
    expected = sum(s["images"] for s in tail) / sum(s["step_seconds"] for s in tail)
    samples = parse(generate_latest(m.registry).decode())
    assert m.port is None  # port_base 0: registry only, no endpoint
    assert value(samples, "partialfc_images_per_second", rank=0) == pytest.approx(expected, rel=1e-12)
    assert value(samples, "partialfc_images_total", rank=0) == sum(s["images"] for s in steps)
    m.close()


def test_two_local_ranks_serve_their_own_registries():
    port_base = two_free_ports()
    first = TrainingMetrics(rank=4, local_rank=0, port_base=port_base)
    second = TrainingMetrics(rank=5, local_rank=1, port_base=port_base)
    try:
        assert (first.port, second.port) == (port_base, port_base + 1)
        common = dict(lr=0.1, images=8, step_seconds=0.5, data_wait_seconds=0.0, grad_norm=None)
        first.observe_step(step=1, loss=2.5, num_sampled_classes=17, **common)
        second.observe_step(step=1, loss=7.25, num_sampled_classes=23, **common)
        one, two = scrape(first.port), scrape(second.port)
    finally:
        first.close()
        second.close()
    assert value(one, "partialfc_loss", rank=4) == 2.5 and value(two, "partialfc_loss", rank=5) == 7.25
    assert value(one, "partialfc_head_sampled_classes", rank=4) == 17
    assert value(two, "partialfc_head_sampled_classes", rank=5) == 23
    assert not any(dict(labels).get("rank") == "5" for _, labels in one)
    assert not any(name == "partialfc_grad_norm" and labels for name, labels in one)  # never observed


def _rank_scrapes_its_neighbour(rank, world_size, port_base):
    """Each gloo rank serves its endpoint, then scrapes the other rank's while both live."""
    import torch.distributed as dist

    with TrainingMetrics(rank=rank, local_rank=rank, port_base=port_base) as m:
        for step in range(1, 4):
            m.observe_step(step=step, loss=10.0 * (rank + 1) / step, lr=0.01 * step, images=16 + rank,
                           step_seconds=0.25, data_wait_seconds=0.0, grad_norm=None,
                           num_sampled_classes=51 - rank)
        dist.barrier()  # both endpoints are up and hold three steps
        other = (rank + 1) % world_size
        samples = scrape(port_base + other)
        dist.barrier()  # keep serving until the neighbour has scraped us
    keep = ("partialfc_loss", "partialfc_images_per_second", "partialfc_head_sampled_classes", "partialfc_step")
    return {name: value(samples, name, rank=other) for name in keep}


def test_two_rank_processes_scrape_each_other():
    port_base = two_free_ports()
    seen_by = run_ranks(_rank_scrapes_its_neighbour, 2, port_base, timeout=120)
    for scraper, seen in enumerate(seen_by):
        served = 1 - scraper
        assert seen == {"partialfc_loss": pytest.approx(10.0 * (served + 1) / 3),
                        "partialfc_images_per_second": pytest.approx((16 + served) / 0.25),
                        "partialfc_head_sampled_classes": 51 - served, "partialfc_step": 3}


def test_close_stops_the_endpoint():
    m = TrainingMetrics(rank=0, local_rank=0, port_base=free_port())
    port = m.port
    scrape(port)
    m.close()
    m.close()  # idempotent
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_busy_port_is_a_one_line_value_error():
    """A ValueError, so the entrypoint prints this line instead of a traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MetricsEndpointError) as caught:
            TrainingMetrics(rank=3, local_rank=1, port_base=port - 1)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == (f"metrics port {port} on 127.0.0.1 is in use (metrics.port_base = {port - 1}, "
                                 "local rank 1); choose another metrics.port_base or 0 to serve nothing")


def test_cuda_memory_gauges_per_device(monkeypatch):
    fake = {"0": (100, 300, 250), "1": (7, 9, 8)}
    monkeypatch.setattr(metrics_module, "cuda_memory_bytes", lambda: fake)
    m = TrainingMetrics(rank=2, local_rank=0)
    m.observe_step(step=1, loss=None, lr=0.1, images=4, step_seconds=0.1, data_wait_seconds=0.0,
                   grad_norm=None, num_sampled_classes=3)
    samples = parse(generate_latest(m.registry).decode())
    for device, values in fake.items():
        for kind, expected in zip(("allocated", "reserved", "peak_allocated"), values):
            assert value(samples, f"partialfc_cuda_memory_{kind}_bytes", rank=2, device=device) == expected


def test_disabled_is_a_no_op(tmp_path):
    m = TrainingMetrics(rank=0, local_rank=0, port_base=free_port(), tensorboard_dir=str(tmp_path / "tb"),
                        enabled=False)
    m.observe_step(step=1, loss=1.0, lr=0.1, images=4, step_seconds=0.1, data_wait_seconds=0.0,
                   grad_norm=1.0, num_sampled_classes=3)
    m.observe_checkpoint(1)
    m.observe_eval(1, {"lfw": 0.5})
    m.close()
    assert m.port is None and m.registry is None
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=-1, local_rank=0), ValueError, "rank must be >= 0, got -1"),
    (dict(rank="0", local_rank=0), TypeError, "rank must be an int, got '0'"),
    (dict(rank=0, local_rank=True), TypeError, "local_rank must be an int, got True"),
    (dict(rank=0, local_rank=3, port_base=65534), ValueError, "port_base 65534 \\+ local_rank 3"),
    (dict(rank=0, local_rank=0, host=""), TypeError, "host must be a non-empty string"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainingMetrics(**kwargs)


def test_bad_observations():
    m = TrainingMetrics(rank=0, local_rank=0)
    good = dict(step=1, loss=1.0, lr=0.1, images=4, step_seconds=0.1, data_wait_seconds=0.0,
                grad_norm=1.0, num_sampled_classes=3)
    for field, bad, error in (("loss", "nan", TypeError), ("images", 2.5, TypeError),
                              ("step_seconds", -0.5, ValueError), ("num_sampled_classes", -1, ValueError)):
        with pytest.raises(error, match=field):
            m.observe_step(**dict(good, **{field: bad}))
    with pytest.raises(TypeError, match="eval accuracy of 'lfw'"):
        m.observe_eval(3, {"lfw": "high"})
    with pytest.raises(TypeError, match="dict of set name"):
        m.observe_eval(3, [("lfw", 0.9)])


def test_tensorboard_scalars_on_rank_zero_only(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = np.random.default_rng(3)
    steps = random_steps(rng, 6)
    for rank in (0, 1):
        with TrainingMetrics(rank=rank, local_rank=rank, tensorboard_dir=str(tmp_path / f"tb{rank}")) as m:
            for step in steps:
                m.observe_step(**step)
            m.observe_eval(6, {"agedb_30": 0.875})
    assert not (tmp_path / "tb1").exists()
    events = EventAccumulator(str(tmp_path / "tb0"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(s["step"], s["loss"]) for s in steps if s["loss"] is not None]
    assert [step for step, _ in loss] == [step for step, _ in expected]
    np.testing.assert_allclose([v for _, v in loss], [v for _, v in expected], rtol=1e-6)
    lr = [e.value for e in events.Scalars("train/lr")]
    np.testing.assert_allclose(lr, [s["lr"] for s in steps], rtol=1e-6)
    assert [e.value for e in events.Scalars("head/sampled_classes")] == [s["num_sampled_classes"] for s in steps]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("eval/agedb_30")] == [(6, 0.875)]
