"""The DeepSpeed ZeRO-1/2 engine for the backbone (``train.engine = deepspeed``).

Split from ``engines.py``, which holds the engine contract (the two-pass backward, why
DeepSpeed is fed ``world_size * dL/d embeddings``, accumulation, memory format and
compilation) and the DDP engine. This module holds what only DeepSpeed needs: the
generated DeepSpeed config merged with a user JSON, the autocast mapping of
``train.amp``, the fp16 workarounds, and the checkpoint state gathered from ZeRO's
partitions into torch's own optimizer format. ``deepspeed`` itself is imported when an
engine is built.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from partialfc.distributed.engines import (
    AMP_MODES, ZERO_STAGES, BackboneEngine, OptimizerFactory, SchedulerFactory, _per_element, _trainable,
)

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


__all__ = ["DeepSpeedEngine", "deepspeed_config"]
