"""Label-range checks that do not stall the GPU every step.

``PartialFC._validate`` checks ``0 <= label < num_classes`` with ``int(labels.min())``
and ``int(labels.max())``: two host syncs per step, each draining the GPU queue so
the host cannot run ahead. A bad label must still fail loudly, with the label and
the step, but it need not fail *this very step*: an out-of-range label is owned by
no rank (``target_positions`` gives -1 everywhere), so it only adds a wrong loss
term; nothing is indexed out of bounds. So:

* labels still on the host (the torch loader, before the copy) are checked there at
  once -- host work on a host tensor, no device sync: ``check_labels_on_host``;
* labels already on the device (synthetic data made there, DALI's GPU output) are
  checked on the device: ``DeviceLabelCheck.observe`` accumulates a flag, the first
  bad label and its step in device tensors without reading them, and ``check()``
  reads them with one sync every ``every`` steps (the log interval), and always
  before a checkpoint is written, so no checkpoint contains updates from a bad batch
  without the run failing first.

Why not ``torch._assert_async``: it raises a device-side assert, which on CUDA
leaves the context unusable -- no one-line error naming the label, no chance to
stop cleanly, every later CUDA call fails.
"""
from __future__ import annotations

from typing import Optional

import torch


def _range_error(label: int, num_classes: int, where: str) -> ValueError:
    return ValueError(f"{where}label {label} is outside [0, {num_classes}) (num_classes)")


def check_label_range(labels: torch.Tensor, num_classes: int, where: str = "") -> None:
    """Raise for a label outside ``[0, num_classes)``; reads two values, so on a device
    tensor it is a host sync (the head's own check outside the trainer)."""
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise _range_error(low if low < 0 else high, num_classes, where)


def check_labels_on_host(labels: torch.Tensor, num_classes: int, where: str = "") -> None:
    """Raise for an out-of-range label in a CPU tensor (host work, no device sync)."""
    if labels.device.type != "cpu":
        raise ValueError(f"check_labels_on_host needs a CPU tensor, got one on {labels.device}; "
                         "use DeviceLabelCheck for labels on the device")
    check_label_range(labels, num_classes, where)


class DeviceLabelCheck:
    """Accumulate "any label out of range" on the device; read it every ``every`` steps."""

    def __init__(self, num_classes: int, every: int) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"the label check interval must be an int >= 1, got {every!r}")
        self.num_classes = num_classes
        self.every = every
        self.observed = 0  # batches observed since the last read
        self._found: Optional[torch.Tensor] = None  # bool, 0-dim: a bad label was seen
        self._label: Optional[torch.Tensor] = None  # the first bad label seen
        self._step: Optional[torch.Tensor] = None  # the step it came in

    def observe(self, labels: torch.Tensor, step: int) -> None:
        """Fold one batch's labels in. Device ops only: no host sync, no copy."""
        self.observed += 1
        if labels.numel() == 0:
            return
        labels = labels.reshape(-1)
        if self._found is None or self._found.device != labels.device:
            self._found = torch.zeros((), dtype=torch.bool, device=labels.device)
            self._label = torch.zeros((), dtype=torch.int64, device=labels.device)
            self._step = torch.zeros((), dtype=torch.int64, device=labels.device)
        bad = (labels < 0) | (labels >= self.num_classes)
        any_bad = bad.any()
        # argmax of a 0/1 vector is its first 1; gather (not labels[index]) keeps the index
        # on the device -- indexing with a 0-dim tensor would read it on the host.
        first = labels.gather(0, bad.to(torch.uint8).argmax().reshape(1)).reshape(()).to(torch.int64)
        newly = any_bad & ~self._found
        self._label = torch.where(newly, first, self._label)
        self._step = torch.where(newly, step, self._step)
        self._found = self._found | any_bad

    def check(self, force: bool = False) -> None:
        """Raise ValueError for the first bad label seen, reading the device state once
        every ``every`` observed batches (or now with ``force``: before a checkpoint,
        at the end of a run). Returns without a sync otherwise."""
        if not force and self.observed < self.every:
            return
        self.observed = 0
        if self._found is None:
            return
        if bool(self._found):  # host sync: once per `every` steps, deliberately
            raise _range_error(int(self._label), self.num_classes, f"step {int(self._step)}: ")


__all__ = ["DeviceLabelCheck", "check_label_range", "check_labels_on_host"]
