"""How the backbone is trained data-parallel: plain DDP or DeepSpeed ZeRO-1/2.

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
import copy
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
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


# ---------------------------------------------------------------------- DeepSpeed config
# Keys we derive from our own config; a user JSON may repeat them only with equal values.
_DERIVED = (("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",), ("train_batch_size",),
            ("gradient_clipping",), ("fp16", "enabled"), ("bf16", "enabled"), ("torch_autocast", "enabled"),
            ("torch_autocast", "dtype"), ("zero_optimization", "stage"))
# The optimizer and schedule are ours (built by make_optimizer / make_scheduler).
_FORBIDDEN = ("optimizer", "scheduler")


def _merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _lookup(tree: dict, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def deepspeed_config(*, micro_batch_size: int, accumulate: int, world_size: int, clip_grad_norm: float,
                     amp: str, zero_stage: int, user_json: Optional[str] = None) -> dict:
    """The DeepSpeed config generated from ours, with an optional user JSON merged in.

    The user file may add any DeepSpeed option (bucket sizes, overlap_comm, ...); it may
    not change what our config already sets, nor define an optimizer or scheduler.

    Mixed precision maps to DeepSpeed's ``torch_autocast``: parameters, ZeRO's master
    copy and BatchNorm stay fp32, convolutions and linears compute in ``amp``'s dtype and
    their gradients are reduced in it; fp16 adds the torch GradScaler that DeepSpeed's
    ZeRO-1/2 optimizer drives. DeepSpeed's native ``bf16``/``fp16`` modes stay off: they
    cast every parameter but not the buffers, which breaks BatchNorm (``expected scalar
    type BFloat16 but found Float``) and is not the mixed precision our backbones use.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"train.amp must be one of {AMP_MODES}, got {amp!r}")
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES} for the backbone, got {zero_stage!r}")
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"data.batch_size must be a positive int, got {micro_batch_size!r}")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulate,
        "train_batch_size": micro_batch_size * accumulate * world_size,
        "gradient_clipping": float(clip_grad_norm),
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": amp != "none", "dtype": "float16" if amp == "fp16" else "bfloat16"},
        "zero_optimization": {"stage": zero_stage},
        # Our torch optimizer (SGD / AdamW) is not on DeepSpeed's list; ZeRO-1/2 only
        # partitions its flat state, which is safe for any elementwise optimizer.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if not user_json:
        return config
    path = Path(user_json)
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"DeepSpeed config {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"DeepSpeed config {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise ValueError(f"DeepSpeed config {str(path)!r}: expected a JSON object, got {type(user).__name__}")
    for key in _FORBIDDEN:
        if key in user:
            raise ValueError(f"DeepSpeed config {str(path)!r}: {key!r} is set by partialfc's [optim] section; "
                             f"remove it from the JSON")
    for key_path in _DERIVED:
        theirs = _lookup(user, key_path)
        ours = _lookup(config, key_path)
        if theirs is not None and theirs != ours:
            raise ValueError(f"DeepSpeed config {str(path)!r}: {'.'.join(key_path)} = {theirs!r} disagrees with "
                             f"the value {ours!r} derived from the partialfc config; set it there instead")
    return _merge(config, user)


class DeepSpeedEngine(BackboneEngine):
    """DeepSpeed ZeRO stage 1 or 2 around the backbone only, with our torch optimizer."""

    def __init__(self, backbone: nn.Module, *, device: torch.device, make_optimizer: OptimizerFactory,
                 make_scheduler: SchedulerFactory, amp: str, clip_grad_norm: float, accumulate: int,
                 micro_batch_size: int, zero_stage: int = 1, user_json: Optional[str] = None,
                 process_group=None, channels_last: bool = False, compile_mode: str = "none",
                 compile_backend: str = "inductor") -> None:
        import deepspeed  # optional dependency, imported only when chosen

        if process_group is not None and process_group is not dist.group.WORLD:
            raise ValueError("train.engine = deepspeed trains over the default process group only")
        if not dist.is_initialized():
            raise ValueError("train.engine = deepspeed needs torch.distributed to be initialized "
                             "(run under torchrun; one process works with --nproc_per_node=1)")
        # channels_last: the input only; see the module docstring for why not the weights.
        super().__init__(backbone, accumulate, dist.get_world_size(), channels_last)
        if self.world_size == 1:  # one process without torchrun: DeepSpeed asserts these exist
            for key, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
        self.config = deepspeed_config(micro_batch_size=micro_batch_size, accumulate=accumulate,
                                       world_size=self.world_size, clip_grad_norm=clip_grad_norm, amp=amp,
                                       zero_stage=zero_stage, user_json=user_json)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        client_optimizer = make_optimizer(_trainable(backbone))
        scheduler = make_scheduler(client_optimizer)
        # DeepSpeed steps the schedule itself, and skips it with a step skipped by an fp16 overflow.
        self.ds_engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=backbone, optimizer=client_optimizer, lr_scheduler=scheduler, config=self.config,
            dist_init_required=False)
        self.module = self.ds_engine.module
        if compile_mode == "backbone":
            self.ds_engine.compile(backend=compile_backend)
        self.device = device
        self.clip_grad_norm = float(clip_grad_norm)

    def _forward(self, images):
        return self.ds_engine(images)  # fp32 parameters; bf16 compute comes from autocast

    def _backward_backbone(self, output, grad):
        # DeepSpeed averages over ranks: W * grad makes that average our sum. The loss
        # was already divided by k, so DeepSpeed must not divide by its accumulation steps.
        surrogate = (output.float() * (grad.float() * self.world_size)).sum()
        self.ds_engine.backward(surrogate, scale_wrt_gas=False)
        if not self.closes_window:
            self.ds_engine.step()  # only advances DeepSpeed's micro-step count here

    def _step(self):
        if not self.ds_engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's micro-step count disagrees with train.accumulate")
        scaler = self.scaler
        scale = scaler.get_scale() if scaler is not None else 1.0
        if scaler is not None:
            # DeepSpeed (0.19) ZeRO-1/2 with autocast fp16 clips by the norm of the still
            # scaled gradients (the GradScaler unscales later, inside the optimizer step):
            # clipping at clip * scale is clipping the true gradients at clip.
            self.optimizer.clip_grad = self.clip_grad_norm * scale
        self.ds_engine.step()
        if scaler is not None and not self.ds_engine.was_step_applied():
            # ... and it skips a step whose gradients overflowed without backing off the
            # GradScaler, so every later step would overflow too. Back off here, as
            # GradScaler.update() would have.
            scaler.update(new_scale=scale * scaler.get_backoff_factor())
        norm = self.ds_engine.get_global_grad_norm()
        if norm is None or self.clip_grad_norm <= 0:
            return None
        norm = norm if torch.is_tensor(norm) else torch.tensor(float(norm))
        return norm / scale  # the scaled gradients' norm, for fp16 (scale is 1 otherwise)

    @property
    def step_was_skipped(self) -> bool:
        """True when fp16 loss scaling found an overflow and skipped the last step."""
        return not self.ds_engine.was_step_applied()

    def zero_grad(self):
        self.ds_engine.zero_grad()

    # -------------------------------------------------------------- checkpoint state
    # ZeRO-1/2 keep each optimizer state (and, in mixed precision, the fp32 master
    # weights) as flat partitions spread over the ranks. DeepSpeed's own checkpoints
    # store those partitions pickled, per rank, tied to this world size. Instead, the
    # tensor-fragment API (deepspeed.utils.safe_get/set_full_*) assembles each
    # parameter's full fp32 tensor: the result is a plain torch optimizer state dict,
    # loadable with weights_only=True, by either engine, on any world size.
    def _zero_optimizer(self):
        zero = self.optimizer
        if not hasattr(zero, "single_partition_of_fp32_groups") or not hasattr(zero, "bit16_groups"):
            raise NotImplementedError(f"checkpointing DeepSpeed's {type(zero).__name__} is not supported "
                                      "(partialfc drives ZeRO stage 1 or 2)")
        return zero

    def _groups(self):
        """(base param group, its flat fp32 partition, the module parameters in it) per group."""
        zero = self._zero_optimizer()
        base = zero.optimizer
        return [(group, zero.single_partition_of_fp32_groups[i], zero.bit16_groups[i])
                for i, group in enumerate(base.param_groups)]

    @property
    def scaler(self):
        """The torch GradScaler DeepSpeed's ZeRO optimizer runs for autocast fp16, else None
        (the counterpart of ``DDPEngine.scaler``)."""
        return getattr(self.optimizer, "torch_autocast_gradscaler", None)

    def _param_indices(self) -> dict:
        return {id(p): i for i, p in enumerate(_trainable(self.module))}

    def state_dict(self) -> dict:
        """Collective. The backbone optimizer as ``torch.optim.Optimizer.state_dict()`` would
        give it for the unwrapped module, plus the schedule and DeepSpeed's step counters."""
        from deepspeed.utils import safe_get_full_optimizer_state

        index = self._param_indices()
        base = self._zero_optimizer().optimizer
        state, groups = {}, []
        for group, flat, params in self._groups():
            flat_state = base.state.get(flat, {})
            # Tensors the size of the partition are per-element state (momentum, Adam's
            # moments); anything else (Adam's step) is one value for the whole group.
            per_element = [k for k, v in flat_state.items() if torch.is_tensor(v) and v.shape == flat.shape]
            shared = {k: (v.detach().clone().cpu() if torch.is_tensor(v) else v)
                      for k, v in flat_state.items() if k not in per_element}
            for param in params:
                entry = dict(shared)
                for key in per_element:
                    entry[key] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
                if flat_state:
                    state[index[id(param)]] = entry
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [index[id(p)] for p in params]})
        engine = self.ds_engine
        return {"optimizer": {"state": state, "param_groups": groups},
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "deepspeed": {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                              "skipped_steps": int(engine.skipped_steps)}}

    def load_state_dict(self, state: dict) -> None:
        """Scatter a torch-format optimizer state (from either engine, any world size) into
        ZeRO's partitions on this rank."""
        from deepspeed.utils import safe_set_full_optimizer_state
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        saved = state["optimizer"]
        saved_groups = saved["param_groups"]
        groups = self._groups()
        if len(saved_groups) != len(groups):
            raise ValueError(f"backbone optimizer state has {len(saved_groups)} parameter groups, this engine has "
                             f"{len(groups)}")
        zero = self._zero_optimizer()
        base = zero.optimizer
        index = self._param_indices()
        restored = 0
        for (group, flat, members), saved_group in zip(groups, saved_groups):
            wanted = [index[id(p)] for p in members]
            if sorted(saved_group["params"]) != sorted(wanted):
                raise ValueError("backbone optimizer state does not match this model's parameters "
                                 f"(group holds {len(saved_group['params'])} tensors, expected {len(wanted)})")
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            entries = [saved["state"].get(i) for i in wanted]
            if all(e is None for e in entries):
                continue  # saved before the first step: nothing to restore
            if any(e is None for e in entries):
                raise ValueError("backbone optimizer state covers only part of a parameter group")
            flat_state = base.state.setdefault(flat, {})
            first = entries[0]
            for key, value in first.items():
                if _per_element(value, members[0]):
                    flat_state.setdefault(key, torch.zeros_like(flat))
                else:  # one value per group (Adam's step count)
                    flat_state[key] = value.clone().to(flat.device) if torch.is_tensor(value) else value
            # A fresh engine has no optimizer state yet (it appears at the first step);
            # point this group's fragment mappings at the tensors just created, then scatter.
            lazy_init_hp_params_optimizer_state(members, flat, base.state)
            for param, entry in zip(members, entries):
                for key, value in entry.items():
                    if _per_element(value, param):
                        safe_set_full_optimizer_state(param, value.to(flat.device, torch.float32), key)
            restored += 1
        if restored == len(groups):
            # Every group is linked: DeepSpeed's own link after its first step is not needed
            # (a group restored from nothing is left for DeepSpeed to link then).
            zero._hp_optimizer_states_linked = True
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        counters = state.get("deepspeed")
        if counters:  # for DeepSpeed's own logging; the schedule above is what trains
            engine = self.ds_engine
            engine.global_steps = counters["global_steps"]
            engine.global_samples = counters["global_samples"]
            engine.skipped_steps = counters["skipped_steps"]
            engine.micro_steps = counters["global_steps"] * self.accumulate

    def backbone_state_dict(self) -> dict:
        """Collective. The module's state with every trainable parameter as ZeRO's fp32 master copy."""
        from deepspeed.utils import safe_get_full_fp32_param

        names = {id(p): n for n, p in self.module.named_parameters()}
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        for param in _trainable(self.module):
            full = safe_get_full_fp32_param(param)
            if full is not None:
                state[names[id(param)]] = full.detach().cpu().clone()
        return state

    def load_backbone_state_dict(self, state: dict) -> None:
        """Load the module, then overwrite ZeRO's fp32 partitions, which the next step
        would otherwise copy back over the loaded weights."""
        from deepspeed.utils import safe_set_full_fp32_param

        self.module.load_state_dict(state, strict=True)
        names = {id(p): n for n, p in self.module.named_parameters()}
        for param in _trainable(self.module):
            safe_set_full_fp32_param(param, state[names[id(param)]].to(param.device, torch.float32))

    def train(self, mode: bool = True) -> None:
        self.ds_engine.train(mode)


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
        return DeepSpeedEngine(backbone, micro_batch_size=micro_batch_size, zero_stage=zero_stage,
                               user_json=user_json, **common)
    raise ValueError(f"train.engine must be one of {ENGINES}, got {kind!r}")


__all__ = ["BackboneEngine", "COMPILE_MODES", "DDPEngine", "DeepSpeedEngine", "ENGINES", "build_engine",
           "deepspeed_config"]
