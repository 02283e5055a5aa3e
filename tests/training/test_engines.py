"""DDP and DeepSpeed ZeRO-1/2 backbone engines, and gradient accumulation.

The reference is a single process without any engine: the whole global batch, the
head's full center matrix (the ranks' shards stacked), ``loss.backward()``, torch's
clip and SGD. Two gloo ranks with either engine must reproduce its losses, gradient
norms and weights -- which fails if the backbone's gradients were averaged over ranks
instead of summed, or if DeepSpeed's rescaling leaked into the head.

Each engine's ``state_dict`` (through bytes, weights-only) resumes step-exactly, under
either engine.

BatchNorm runs in eval mode in these tests (its parameters still train): in train mode
each rank, and each micro-batch, normalizes with its own batch statistics, so a split
batch is *by construction* not the same computation as the whole batch.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os

import pytest
import torch

from spawn import run_ranks

from partialfc.distributed.shards import class_shard

# DeepSpeed builds nothing for our set-up (torch optimizer, no fused ops); keep any
# JIT build it might still try out of the source tree, in a reusable cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))

WORLD = 2
CLASSES = 13
EMBEDDING = 24
BATCH = 4          # images per rank per optimizer step
STEPS = 3
LR, MOMENTUM, DECAY, CLIP = 0.2, 0.9, 5e-4, 1.5
SCALE = 16.0


# find_spec, not import: importing deepspeed costs seconds, and every spawned rank
# imports this module.
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed")


# ---------------------------------------------------------------------- builders
def _backbone():
    from partialfc.models import build_backbone

    torch.manual_seed(3)
    model = build_backbone("mobilefacenet_tiny", embedding_size=EMBEDDING)
    model.eval()  # see the module docstring
    return model


def _head(shard_of=None):
    from partialfc.head import CombinedMargin, PartialFC

    margin = CombinedMargin.preset("arcface", scale=SCALE)
    return PartialFC(margin, EMBEDDING, CLASSES, sample_rate=1.0, seed=5, shard_of=shard_of, impl="torch")


def _schedule(optimizer):
    from partialfc.optim import build_scheduler

    return build_scheduler(optimizer, total_steps=10, warmup_steps=2, schedule="poly")


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=DECAY)


def _batches(rank, world_size, batch_size, steps):
    from partialfc.data.synthetic import SyntheticSource

    source = SyntheticSource(CLASSES, batch_size, rank, world_size, seed=11, num_samples=200, noise=0.8)
    return [batch for _, batch in zip(range(steps), source.epoch(0))]


def _global_batches(steps):
    """What the 2 ranks see together, in the order of their global batch (rank slices)."""
    per_rank = [_batches(rank, WORLD, BATCH, steps) for rank in range(WORLD)]
    return [(torch.cat([per_rank[r][s][0] for r in range(WORLD)]), torch.cat([per_rank[r][s][1] for r in range(WORLD)]))
            for s in range(steps)]


def _flat(module):
    return torch.cat([p.detach().float().reshape(-1) for p in module.parameters()])


def _dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


# ---------------------------------------------------------------------- per-rank runs
def _train_on_rank(kind, zero_stage, accumulate, steps, capture_grads=False, amp="none", init_scale=None,
                   batchnorm_train=False):
    """Train ``steps`` optimizer steps; each rank's batch is split into ``accumulate`` micro-batches."""
    from partialfc.distributed.engines import build_engine
    from partialfc.optim import RowSparseSGD

    rank = torch.distributed.get_rank()
    backbone = _backbone()
    backbone.amp_dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    head = _head()
    head_optimizer = RowSparseSGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    head_schedule = _schedule(head_optimizer)
    micro = BATCH // accumulate
    engine = build_engine(kind, backbone, device=torch.device("cpu"), make_optimizer=_sgd,
                          make_scheduler=_schedule, clip_grad_norm=CLIP, accumulate=accumulate,
                          micro_batch_size=micro, zero_stage=zero_stage, amp=amp)
    engine.train(batchnorm_train)
    start = _flat(engine.module)
    if amp == "fp16" and init_scale is not None:
        engine.scaler._init_scale = init_scale  # before its first use; no public setter
    losses, norms, grads = [], [], []
    for images, labels in _batches(rank, WORLD, BATCH, steps):
        engine.zero_grad()
        head_optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for part in range(accumulate):
            window = slice(part * micro, (part + 1) * micro)
            loss = head(engine.forward(images[window]), labels[window])
            engine.backward(loss)
            step_loss += float(loss.detach()) / accumulate
        if capture_grads:
            backbone_grads = None
            if kind == "ddp":
                backbone_grads = torch.cat([p.grad.reshape(-1) for p in engine.module.parameters() if p.requires_grad])
            grads.append((_dense(head.weight.grad).clone(), backbone_grads))
        norm = engine.clip_and_step()
        head_optimizer.step()
        head_schedule.step()
        losses.append(step_loss)
        norms.append(float(norm))
    scaler = engine.scaler
    return {"losses": losses, "norms": norms, "backbone": _flat(engine.module), "head": head.weight.detach().clone(),
            "grads": grads, "lr": engine.optimizer.param_groups[0]["lr"], "start": start,
            "scale": scaler.get_scale() if scaler is not None else None}


def _engines_worker(rank, world_size, runs):
    return {name: _train_on_rank(kind, stage, 1, STEPS) for name, (kind, stage) in runs.items()}


def _amp_worker(rank, world_size, amp):
    # BatchNorm in train mode: eval mode with fresh running statistics gives gradient
    # norms ~4e5 on this tiny model, beyond fp16. Both engines normalize per rank alike.
    runs = {name: _train_on_rank(kind, stage, 1, STEPS, amp=amp, init_scale=2.0**8, batchnorm_train=True)
            for name, (kind, stage) in {"ddp": ("ddp", 1), "zero2": ("deepspeed", 2)}.items()}
    if amp == "fp16":  # a scale that overflows fp16 at once must back off until steps apply
        runs["overflowing"] = _train_on_rank("deepspeed", 1, 1, 8, amp=amp, init_scale=2.0**12,
                                             batchnorm_train=True)
    return runs


def _accumulation_worker(rank, world_size, kind, stage):
    return {k: _train_on_rank(kind, stage, k, 2, capture_grads=True) for k in (1, 2)}


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=DECAY)


def _one_step(engine, images, labels):
    engine.zero_grad()
    head = _head()
    loss = head(engine.forward(images), labels)
    engine.backward(loss)
    engine.clip_and_step()
    return float(loss.detach())


def _resume_worker(rank, world_size, saved_by, resumed_by, optimizer):
    """Train 2 steps with ``saved_by`` = (kind, stage), save its state through bytes
    (weights-only, as through a checkpoint file), rebuild ``resumed_by`` from a
    differently initialized backbone, load, and continue both for 2 steps."""
    from partialfc.distributed.engines import build_engine

    batches = _batches(rank, WORLD, BATCH, 4)
    make_optimizer = {"sgd": _sgd, "adamw": _adamw}[optimizer]

    def engine(kind_stage, backbone):
        kind, stage = kind_stage
        built = build_engine(kind, backbone, device=torch.device("cpu"), make_optimizer=make_optimizer,
                             make_scheduler=_schedule, clip_grad_norm=CLIP, micro_batch_size=BATCH,
                             zero_stage=stage)
        built.train(False)
        return built

    def through_bytes(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    original = engine(saved_by, _backbone())
    for images, labels in batches[:2]:
        _one_step(original, images, labels)
    weights, state = through_bytes(original.backbone_state_dict()), through_bytes(original.state_dict())
    torch.manual_seed(99)  # other initial weights: a stale copy anywhere would show
    from partialfc.models import build_backbone

    resumed = engine(resumed_by, build_backbone("mobilefacenet_tiny", embedding_size=EMBEDDING).eval())
    resumed.load_backbone_state_dict(weights)
    resumed.load_state_dict(state)
    continued = [_one_step(original, *batch) for batch in batches[2:]]
    replayed = [_one_step(resumed, *batch) for batch in batches[2:]]
    return {"continued": continued, "replayed": replayed, "original": _flat(original.module),
            "resumed": _flat(resumed.module), "lr": (original.optimizer.param_groups[0]["lr"],
                                                     resumed.optimizer.param_groups[0]["lr"])}


# ---------------------------------------------------------------------- reference
def _reference():
    """One process, no engine: the whole global batch, the stacked centers, plain torch."""
    from partialfc.optim import RowSparseSGD

    backbone = _backbone()
    head = _head()  # no group: all classes; replace its centers by the ranks' shards
    with torch.no_grad():
        head.weight.copy_(torch.cat([_head(shard_of=(r, WORLD)).weight for r in range(WORLD)]))
    backbone_optimizer = _sgd(backbone.parameters())
    head_optimizer = RowSparseSGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    schedules = [_schedule(backbone_optimizer), _schedule(head_optimizer)]
    losses, norms = [], []
    for images, labels in _global_batches(STEPS):
        backbone_optimizer.zero_grad()
        head_optimizer.zero_grad()
        loss = head(backbone(images), labels)
        loss.backward()
        grads = [p.grad.reshape(-1) for p in backbone.parameters() if p.requires_grad]
        norm = torch.cat(grads).norm()  # computed here, not by clip_grad_norm_
        factor = min(1.0, CLIP / (float(norm) + 1e-6))
        for grad in grads:
            grad.mul_(factor)
        backbone_optimizer.step()
        head_optimizer.step()
        for schedule in schedules:
            schedule.step()
        losses.append(float(loss.detach()))
        norms.append(float(norm))
    return {"losses": losses, "norms": norms, "backbone": _flat(backbone), "head": head.weight.detach()}


def _check_against_reference(name, result, reference, rank):
    assert result["losses"] == pytest.approx(reference["losses"], rel=2e-4, abs=1e-5), name
    assert result["norms"] == pytest.approx(reference["norms"], rel=2e-4), name
    assert any(n > CLIP for n in reference["norms"])  # clipping is exercised
    torch.testing.assert_close(result["backbone"], reference["backbone"], rtol=1e-3, atol=2e-5, msg=name)
    shard = class_shard(CLASSES, WORLD, rank)
    rows = reference["head"][shard.class_start:shard.class_start + shard.num_local]
    torch.testing.assert_close(result["head"], rows, rtol=1e-3, atol=2e-5, msg=name)


# ---------------------------------------------------------------------- tests
def test_ddp_engine_matches_single_process():
    reference = _reference()
    results = run_ranks(_engines_worker, WORLD, {"ddp": ("ddp", 1)})
    for rank, result in enumerate(results):
        _check_against_reference("ddp", result["ddp"], reference, rank)


@needs_deepspeed
def test_deepspeed_zero1_zero2_match_ddp_and_reference():
    reference = _reference()
    runs = {"ddp": ("ddp", 1), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2)}
    results = run_ranks(_engines_worker, WORLD, runs)
    for rank, result in enumerate(results):
        for name in runs:
            _check_against_reference(name, result[name], reference, rank)
        # DeepSpeed steps the schedule itself: the same number of steps as ours.
        assert result["zero2"]["lr"] == pytest.approx(result["ddp"]["lr"])
        assert result["zero1"]["losses"] == pytest.approx(result["ddp"]["losses"], rel=1e-5)


@needs_deepspeed
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_deepspeed_mixed_precision_matches_ddp(amp):
    """DeepSpeed's autocast path trains like DDP's at the same amp setting. Catches
    clipping by the loss-scaled norm (norms off by the scale) and a GradScaler that
    never backs off (no step ever applies)."""
    for result in run_ranks(_amp_worker, WORLD, amp):
        ddp, zero2 = result["ddp"], result["zero2"]
        # ZeRO reduces convolution/linear gradients in the amp dtype, DDP in fp32. The
        # step-3 loss differs by 1.98 % (bf16) on one AMD EPYC and by less on others (CPU
        # bf16 kernels round differently per instruction set); the bugs caught here are ~100 %.
        assert zero2["losses"] == pytest.approx(ddp["losses"], rel=5e-2), amp
        assert zero2["norms"] == pytest.approx(ddp["norms"], rel=0.15), amp  # a loss-scaled norm is 256x
        assert all(math.isfinite(n) for n in ddp["norms"]) and any(n > CLIP for n in ddp["norms"])  # clipped
        # Weights: within a quarter of how far training moved them (measured: 13 % for
        # bf16, whose gradient reduction keeps 8 mantissa bits; 6 % for fp16). Clipping
        # by the scaled norm or a never-applied step is off by ~100 %.
        moved = (ddp["backbone"] - ddp["start"]).norm()
        assert (zero2["backbone"] - ddp["backbone"]).norm() < 0.25 * moved, amp
        if amp == "fp16":
            overflowing = result["overflowing"]
            assert overflowing["scale"] < 2.0**12
            assert (overflowing["backbone"] - overflowing["start"]).abs().max() > 0


@pytest.mark.parametrize("kind,stage", [("ddp", 1), pytest.param("deepspeed", 2, marks=needs_deepspeed)])
def test_accumulation(kind, stage):
    results = run_ranks(_accumulation_worker, WORLD, kind, stage)
    for rank_result in results:
        whole, halves = rank_result[1], rank_result[2]
        for (head_whole, backbone_whole), (head_halves, backbone_halves) in zip(whole["grads"], halves["grads"]):
            # A half batch runs other conv kernels (oneDNN blocks by batch size), and the
            # margin's 1/sin(theta) and the scale amplify that: tolerance relative to the
            # largest entry. A missing or doubled 1/k is off by 100 %.
            assert head_whole.abs().max() > 0
            torch.testing.assert_close(head_halves, head_whole, rtol=1e-4, atol=5e-4 * head_whole.abs().max())
            if kind == "ddp":  # ZeRO keeps the backbone's gradients in its own partitions
                torch.testing.assert_close(backbone_halves, backbone_whole, rtol=1e-4,
                                           atol=5e-4 * backbone_whole.abs().max())
        # The loss of the second step sees the weights the first step produced.
        assert halves["losses"] == pytest.approx(whole["losses"], rel=1e-5)
        assert halves["norms"] == pytest.approx(whole["norms"], rel=1e-4)
        torch.testing.assert_close(halves["backbone"], whole["backbone"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[0][2]["backbone"], results[1][2]["backbone"])  # ranks agree


@pytest.mark.parametrize("saved_by,resumed_by,optimizer", [
    (("ddp", 1), ("ddp", 1), "sgd"),
    pytest.param(("deepspeed", 2), ("deepspeed", 2), "adamw", marks=needs_deepspeed, id="zero2-zero2-adamw"),
    # Across engines with SGD only: AdamW turns the engines' different summation order
    # in near-zero gradients into +-lr steps, so two engines never agree past one step.
    pytest.param(("deepspeed", 1), ("ddp", 1), "sgd", marks=needs_deepspeed, id="zero1-ddp-sgd"),
    pytest.param(("ddp", 1), ("deepspeed", 2), "sgd", marks=needs_deepspeed, id="ddp-zero2-sgd"),
])
def test_engine_state_resumes_step_exactly(saved_by, resumed_by, optimizer):
    """Either engine's state (weights-only bytes) continues the run exactly, under
    either engine: the state is one format, full tensors per parameter."""
    for result in run_ranks(_resume_worker, WORLD, saved_by, resumed_by, optimizer):
        assert result["replayed"] == pytest.approx(result["continued"], rel=1e-6)
        assert result["continued"][0] != pytest.approx(result["continued"][1], rel=1e-3)  # steps change the model
        torch.testing.assert_close(result["resumed"], result["original"], rtol=1e-5, atol=1e-7)
        assert result["lr"][0] == result["lr"][1]


# ---------------------------------------------------------------------- config and errors
def test_deepspeed_config_from_ours_and_user_json(tmp_path):
    from partialfc.distributed.deepspeed_engine import deepspeed_config

    config = deepspeed_config(micro_batch_size=7, accumulate=3, world_size=5, clip_grad_norm=2.0, amp="bf16",
                              zero_stage=2)
    assert config["train_batch_size"] == 7 * 3 * 5
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (7, 3)
    assert config["gradient_clipping"] == 2.0
    # Mixed precision through torch autocast; DeepSpeed's own casting modes stay off.
    assert (config["fp16"]["enabled"], config["bf16"]["enabled"]) == (False, False)
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    fp16 = deepspeed_config(micro_batch_size=7, accumulate=3, world_size=5, clip_grad_norm=2.0, amp="fp16",
                            zero_stage=2)
    assert fp16["torch_autocast"] == {"enabled": True, "dtype": "float16"}
    fp32 = deepspeed_config(micro_batch_size=7, accumulate=3, world_size=5, clip_grad_norm=2.0, amp="none",
                            zero_stage=2)
    assert fp32["torch_autocast"]["enabled"] is False
    assert config["zero_optimization"] == {"stage": 2}

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True},
                                "torch_autocast": {"enabled": True}}))
    merged = deepspeed_config(micro_batch_size=7, accumulate=3, world_size=5, clip_grad_norm=2.0, amp="bf16",
                              zero_stage=2, user_json=str(user))
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["train_batch_size"] == 105
    user.write_text(json.dumps({"bf16": {"enabled": True}}))  # DeepSpeed's casting mode breaks BatchNorm
    with pytest.raises(ValueError, match=r"ds\.json.*bf16\.enabled = True"):
        deepspeed_config(micro_batch_size=7, accumulate=3, world_size=5, clip_grad_norm=2.0, amp="bf16",
                         zero_stage=2, user_json=str(user))

    user.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    with pytest.raises(ValueError, match=r"ds\.json.*gradient_accumulation_steps = 4"):
        deepspeed_config(micro_batch_size=7, accumulate=3, world_size=5, clip_grad_norm=2.0, amp="none",
                         zero_stage=1, user_json=str(user))
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="'optimizer'"):
        deepspeed_config(micro_batch_size=7, accumulate=1, world_size=1, clip_grad_norm=0.0, amp="none",
                         zero_stage=1, user_json=str(user))
    user.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        deepspeed_config(micro_batch_size=7, accumulate=1, world_size=1, clip_grad_norm=0.0, amp="none",
                         zero_stage=1, user_json=str(user))
    with pytest.raises(ValueError, match="ZeRO stage"):
        deepspeed_config(micro_batch_size=7, accumulate=1, world_size=1, clip_grad_norm=0.0, amp="none", zero_stage=3)


def test_engine_errors():
    from partialfc.distributed.engines import build_engine

    common = dict(device=torch.device("cpu"), make_optimizer=_sgd, make_scheduler=_schedule)
    with pytest.raises(ValueError, match="'horovod'"):
        build_engine("horovod", _backbone(), **common)
    with pytest.raises(ValueError, match="accumulate.*0"):
        build_engine("ddp", _backbone(), accumulate=0, **common)
    with pytest.raises(ValueError, match="'fp8'"):
        build_engine("ddp", _backbone(), amp="fp8", **common)
    engine = build_engine("ddp", _backbone(), accumulate=2, **common)
    head = _head()
    images, labels = _batches(0, 1, 4, 1)[0]
    engine.backward(head(engine.forward(images), labels))
    with pytest.raises(RuntimeError, match="after 1 micro-batches"):
        engine.clip_and_step()
    engine.forward(images)
    with pytest.raises(RuntimeError, match="twice"):
        engine.forward(images)
