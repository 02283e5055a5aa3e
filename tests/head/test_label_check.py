"""Label checks without per-step host syncs, and batch sizes without a collective.

"No host sync" is checked on the meta device: a meta tensor has no values, so any
read of one on the host (``bool()``, ``int()``, ``.item()``, ``.tolist()``) raises.
``observe`` must run on meta labels; ``check`` may read only every N steps.
"""
from __future__ import annotations

import pytest
import torch

from spawn import run_ranks

from partialfc.head.label_check import DeviceLabelCheck, check_labels_on_host


def test_host_check_reports_the_offending_label():
    check_labels_on_host(torch.tensor([0, 4, 9]), 10)
    check_labels_on_host(torch.tensor([], dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"batch 3: label 10 is outside \[0, 10\) \(num_classes\)"):
        check_labels_on_host(torch.tensor([0, 10, 2]), 10, where="batch 3: ")
    with pytest.raises(ValueError, match=r"label -2 is outside \[0, 10\)"):
        check_labels_on_host(torch.tensor([-2, 11]), 10)
    with pytest.raises(ValueError, match="needs a CPU tensor"):
        check_labels_on_host(torch.tensor([1], device="meta"), 10)


def test_device_check_reads_only_every_n_steps_and_reports_the_first_bad_label():
    check = DeviceLabelCheck(num_classes=7, every=3)
    check.observe(torch.tensor([0, 6, 3]), step=1)
    check.observe(torch.tensor([2, 9, 12, 1]), step=2)  # first bad: 9 at step 2
    check.check()  # 2 batches observed < 3: returns without reading
    check.observe(torch.tensor([-1]), step=3)  # later bad labels do not replace the first
    with pytest.raises(ValueError, match=r"step 2: label 9 is outside \[0, 7\) \(num_classes\)"):
        check.check()


def test_device_check_passes_good_batches_and_force_reads_now():
    check = DeviceLabelCheck(num_classes=5, every=100)
    for step in range(1, 4):
        check.observe(torch.arange(5), step=step)
        check.check()
    check.check(force=True)
    check.observe(torch.tensor([], dtype=torch.long), step=4)
    check.observe(torch.tensor([[4, 5]]), step=5)  # any shape; 5 is out of range
    check.check()  # not yet due
    with pytest.raises(ValueError, match=r"step 5: label 5 is outside \[0, 5\)"):
        check.check(force=True)


def test_observe_does_not_read_the_device():
    check = DeviceLabelCheck(num_classes=10, every=5)
    for step in range(3):
        check.observe(torch.empty(8, dtype=torch.long, device="meta"), step=step)
        check.check()  # not due: must not read either
    # The read happens in check() when due: on meta it cannot, which shows the rest never read.
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        check.check(force=True)


@pytest.mark.parametrize("every", [0, -1, True, 1.5])
def test_device_check_rejects_a_bad_interval(every):
    with pytest.raises(ValueError, match="label check interval must be an int >= 1"):
        DeviceLabelCheck(10, every)


def _sizes_rank(rank, world_size):
    from partialfc.distributed import batch_sizes as module
    from partialfc.distributed import collectives

    group_sizes = module.batch_sizes(3 + 2 * rank, torch.device("cpu"))  # gathered: 3 and 5
    calls = []
    original = collectives.all_gather_no_grad
    collectives.all_gather_no_grad = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        promised = module.batch_sizes(4, torch.device("cpu"), expected_size=4)
    finally:
        collectives.all_gather_no_grad = original
    try:
        module.batch_sizes(5, torch.device("cpu"), expected_size=4)
        broken = None
    except ValueError as error:
        broken = str(error)
    return group_sizes, promised, len(calls), broken


def test_batch_sizes_communicate_only_without_a_promise():
    results = run_ranks(_sizes_rank, 2)
    for rank, (gathered, promised, collective_calls, broken) in enumerate(results):
        assert gathered == [3, 5]
        assert promised == [4, 4] and collective_calls == 0
        assert broken == (f"rank {rank} holds a batch of 5 rows where every rank was promised 4 "
                          "(data.batch_size / train.accumulate)")


def test_batch_sizes_single_process():
    from partialfc.distributed.batch_sizes import batch_sizes

    assert batch_sizes(6, torch.device("cpu")) == [6]
    assert batch_sizes(6, torch.device("cpu"), expected_size=6) == [6]
