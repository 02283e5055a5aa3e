"""How the backbone is trained data-parallel: plain DDP or DeepSpeed ZeRO-1/2.

This module holds the engine contract and the DDP engine; the DeepSpeed engine lives in
``deepspeed_engine.py`` and is imported only when ``train.engine = deepspeed``.

The Partial FC head never enters an engine: its shards are already model-parallel and
it keeps its own row-sparse optimizer. An engine owns only the backbone, its optimizer,
its learning-rate schedule and (fp16) its loss scaling.

Why the backward is split in two
--------------------------------
``forward`` returns the backbone's embeddings *detached* (a leaf that requires grad),
and ``backward(loss)`` runs two passes:

1. ``(loss / k).backward()`` through the head only: the head's row gradients (scaled
   by nothing but ``1 / k``) and ``dL/d embeddings``;
2. the backbone pass, fed ``dL/d embeddings`` by the engine.

The head's loss is a mean over the *global* batch, so a backbone parameter's true
gradient is the *sum* of the ranks' gradients (see ``parallelize.py``). DDP sums through
our comm hook; DeepSpeed always averages over its data-parallel ranks and offers no
sum, so its pass is fed ``world_size * dL/d embeddings`` -- the average of W-times
gradients is the sum. Because the head's gradient was already taken in pass 1, neither
that factor nor DeepSpeed's fp16 loss scale ever reaches the head.

Gradient accumulation (``accumulate = k``): call ``forward``/``backward`` k times, then
``clip_and_step`` once. Each micro-batch's loss is divided by k, so the k micro-batches
add up to one k-times batch, in the head (sparse gradients accumulate; the row-sparse
optimizers coalesce them) and in the backbone. DDP skips its all-reduce on the first
k - 1 micro-batches (``no_sync``); DeepSpeed counts micro-steps itself.

Memory format and compilation (``train.channels_last``, ``train.compile``)
--------------------------------------------------------------------------
With ``channels_last`` the engine converts every input batch to channels_last strides
in ``forward`` (both engines) and, under DDP, the backbone's 4-d weights once before
wrapping. DeepSpeed keeps the weights as views into its flat fp32/bf16 buffers, which
are NCHW-contiguous by construction; converting them would detach the module from
those buffers, so under DeepSpeed only the input is converted (torch's cuDNN path picks
NHWC kernels when the input is channels_last and converts the weight per call, a copy
of a few MB; not yet measured against DDP on a GPU).

``compile = "backbone"`` trains through ``torch.compile`` of the backbone. Under DDP
the compiled module is what DDP wraps (torch's recommendation: compile the inner
module, so DDP's hooks and ``no_sync`` stay eager and its bucketing splits the graph),
and ``engine.module`` stays the plain module: evaluation, saving and export run eager.
Under DeepSpeed the engine's own ``compile`` hook compiles the module in place, so
evaluation through ``engine.module`` runs compiled too (one extra compilation for
eval mode).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from partialfc import step_timer
from partialfc.distributed import collectives
from partialfc.distributed.parallelize import wrap_backbone
from partialfc.models.memory_format import images_to_channels_last, module_to_channels_last

ENGINES = ("ddp", "deepspeed")
AMP_MODES = ("none", "fp16", "bf16")
ZERO_STAGES = (1, 2)
COMPILE_MODES = ("none", "backbone")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], "torch.optim.lr_scheduler.LRScheduler"]


def _per_element(value, param) -> bool:
    """Whether a torch optimizer state entry has one value per element of ``param``."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape


def _trainable(module: nn.Module) -> list:
    # Frozen parameters (the embedding BatchNorm's scale) stay out of the optimizer.
    return [p for p in module.parameters() if p.requires_grad]


class BackboneEngine:
    """The interface the training step uses; see the module docstring for the order."""

    module: nn.Module  # the unwrapped backbone, for evaluation and saving
    optimizer: Optimizer
    scheduler: object

    def __init__(self, module: nn.Module, accumulate: int, world_size: int, channels_last: bool = False) -> None:
        if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
            raise ValueError(f"train.accumulate must be an int >= 1, got {accumulate!r}")
        self.module = module
        self.accumulate = accumulate
        self.world_size = world_size
        self.channels_last = bool(channels_last)
        self.micro_step = 0  # micro-batches back-propagated since the last optimizer step
        self._pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def closes_window(self) -> bool:
        """Whether the next micro-batch is the last one before an optimizer step."""
        return self.micro_step == self.accumulate - 1

    # -------------------------------------------------------------- interface
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone embeddings, detached from the backbone's graph (see ``backward``)."""
        if self._pending is not None:
            raise RuntimeError("forward() called twice without backward(); one backward per forward")
        with step_timer.phase("backbone_forward"):  # a no-op unless a StepTimer is installed
            if self.channels_last:
                images = images_to_channels_last(images)
            output = self._forward(images)
        leaf = output.detach().requires_grad_(True)
        self._pending = (output, leaf)
        return leaf

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss through the head, then the backbone."""
        if self._pending is None:
            raise RuntimeError("backward() called without a forward() of this micro-batch")
        if loss.ndim != 0:
            raise ValueError(f"backward() expects a scalar loss, got shape {tuple(loss.shape)}")
        output, leaf = self._pending
        self._pending = None
        with step_timer.phase("head"):
            (loss / self.accumulate).backward()
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        with step_timer.phase("backbone_backward"):
            self._backward_backbone(output, grad.to(output.dtype))
        self.micro_step += 1

    def clip_and_step(self) -> Optional[torch.Tensor]:
        """Clip and step the backbone (and its schedule) after ``accumulate`` micro-batches.

        Returns the backbone's gradient norm before clipping (a tensor, no host sync),
        or None when clipping is off.
        """
        if self.micro_step != self.accumulate:
            raise RuntimeError(f"clip_and_step() after {self.micro_step} micro-batches; "
                               f"train.accumulate = {self.accumulate}")
        with step_timer.phase("optimizer"):
            norm = self._step()
        self.micro_step = 0
        return norm

    def zero_grad(self) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    # -------------------------------------------------------------- checkpoint state
    # Both engines speak one format, so a checkpoint resumes under either engine and on
    # any world size: ``state_dict`` is ``{"optimizer": torch optimizer state dict over
    # the trainable parameters in module order, "scheduler": ..., "scaler": ...}`` and
    # ``backbone_state_dict`` is the module's full fp32 state dict. Collective for
    # DeepSpeed (ZeRO's partitions are gathered): call them on every rank.
    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def backbone_state_dict(self) -> dict:
        raise NotImplementedError

    def load_backbone_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------- engine parts
    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _backward_backbone(self, output: torch.Tensor, grad: torch.Tensor) -> None:
        raise NotImplementedError

    def _step(self) -> Optional[torch.Tensor]:
        raise NotImplementedError


class DDPEngine(BackboneEngine):
    """DistributedDataParallel with summed gradients, torch optimizer, GradScaler for fp16."""

    def __init__(self, backbone: nn.Module, *, device: torch.device, make_optimizer: OptimizerFactory,
                 make_scheduler: SchedulerFactory, amp: str, clip_grad_norm: float, accumulate: int,
                 process_group=None, channels_last: bool = False, compile_mode: str = "none",
                 compile_backend: str = "inductor") -> None:
        super().__init__(backbone, accumulate, collectives.world_size(process_group), channels_last)
        if self.channels_last:
            module_to_channels_last(backbone)  # before DDP builds its buckets from the parameters
        trained = torch.compile(backbone, backend=compile_backend) if compile_mode == "backbone" else backbone
        self.model = wrap_backbone(trained, device, process_group)
        self.distributed = self.model is not trained  # DDP-wrapped: no_sync applies
        self.optimizer = make_optimizer(_trainable(backbone))
        self.scheduler = make_scheduler(self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.clip_grad_norm = clip_grad_norm

    def _forward(self, images):
        # DDP decides at forward time whether this backward all-reduces: skip it on
        # every micro-batch but the last of an accumulation window.
        skip_sync = not self.closes_window and self.distributed
        with self.model.no_sync() if skip_sync else contextlib.nullcontext():
            return self.model(images)

    def _backward_backbone(self, output, grad):
        if self.scaler is not None:
            grad = self.scaler.scale(grad)
        output.backward(grad)

    def _step(self):
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.clip_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(_trainable(self.module), self.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return norm

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """Optimizer, schedule and scaler state; equal on every rank."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def backbone_state_dict(self) -> dict:
        return self.module.state_dict()

    def load_backbone_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state, strict=True)


def build_engine(kind: str, backbone: nn.Module, *, device: torch.device, make_optimizer: OptimizerFactory,
                 make_scheduler: SchedulerFactory, amp: str = "none", clip_grad_norm: float = 0.0,
                 accumulate: int = 1, micro_batch_size: int = 1, zero_stage: int = 1,
                 user_json: Optional[str] = None, process_group=None, channels_last: bool = False,
                 compile_mode: str = "none", compile_backend: str = "inductor") -> BackboneEngine:
    """Wrap ``backbone`` (already on ``device``) in the engine named by ``train.engine``.

    ``make_optimizer(params)`` builds the backbone's torch optimizer and
    ``make_scheduler(optimizer)`` its per-step schedule; both engines use them, so
    DDP and DeepSpeed train with the same update rule.

    ``channels_last`` is the resolved ``train.channels_last``
    (``partialfc.models.memory_format.resolve_channels_last``), ``compile_mode`` is
    ``train.compile``. ``compile_backend`` is a private knob for tests (``aot_eager``
    checks the compiled path's numerics without inductor's C++ build); runs use inductor.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"train.amp must be one of {AMP_MODES}, got {amp!r}")
    if clip_grad_norm < 0:
        raise ValueError(f"optim.clip_grad_norm must be >= 0, got {clip_grad_norm!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of {COMPILE_MODES}, got {compile_mode!r}")
    common = dict(device=device, make_optimizer=make_optimizer, make_scheduler=make_scheduler, amp=amp,
                  clip_grad_norm=clip_grad_norm, accumulate=accumulate, process_group=process_group,
                  channels_last=channels_last, compile_mode=compile_mode, compile_backend=compile_backend)
    if kind == "ddp":
        return DDPEngine(backbone, **common)
    if kind == "deepspeed":
        from partialfc.distributed.deepspeed_engine import DeepSpeedEngine  # imports nothing of DeepSpeed yet

        return DeepSpeedEngine(backbone, micro_batch_size=micro_batch_size, zero_stage=zero_stage,
                               user_json=user_json, **common)
    raise ValueError(f"train.engine must be one of {ENGINES}, got {kind!r}")


__all__ = ["AMP_MODES", "BackboneEngine", "COMPILE_MODES", "DDPEngine", "ENGINES", "ZERO_STAGES", "build_engine"]
