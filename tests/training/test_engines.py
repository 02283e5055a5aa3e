"""DDP and DeepSpeed ZeRO-1/2 backbone engines, and gradient accumulation.

The reference is a single process without any engine: the whole global batch, the
head's full center matrix (the ranks' shards stacked), ``loss.backward()``, torch's
clip and SGD. Two gloo ranks with either engine must reproduce its losses, gradient
norms and weights -- which fails if the backbone's gradients were averaged over ranks
instead of summed, or if DeepSpeed's rescaling leaked into the head.

The DDP engine's ``state_dict`` (through bytes, weights-only) resumes step-exactly.

BatchNorm runs in eval mode in these tests (its parameters still train): in train mode
each rank, and each micro-batch, normalizes with its own batch statistics, so a split
batch is *by construction* not the same computation as the whole batch.
"""
from __future__ import annotations

import importlib.util
import io
import json
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
def _train_on_rank(kind, zero_stage, accumulate, steps, capture_grads=False):
    """Train ``steps`` optimizer steps; each rank's batch is split into ``accumulate`` micro-batches."""
    from partialfc.distributed.engines import build_engine
    from partialfc.optim import RowSparseSGD

    rank = torch.distributed.get_rank()
    backbone = _backbone()
    head = _head()
    head_optimizer = RowSparseSGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    head_schedule = _schedule(head_optimizer)
    micro = BATCH // accumulate
    engine = build_engine(kind, backbone, device=torch.device("cpu"), make_optimizer=_sgd,
                          make_scheduler=_schedule, clip_grad_norm=CLIP, accumulate=accumulate,
                          micro_batch_size=micro, zero_stage=zero_stage)
    engine.train(False)
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
    return {"losses": losses, "norms": norms, "backbone": _flat(engine.module), "head": head.weight.detach().clone(),
            "grads": grads, "lr": engine.optimizer.param_groups[0]["lr"]}


def _engines_worker(rank, world_size, runs):
    return {name: _train_on_rank(kind, stage, 1, STEPS) for name, (kind, stage) in runs.items()}


def _accumulation_worker(rank, world_size, kind, stage):
    results = {k: _train_on_rank(kind, stage, k, 2, capture_grads=True) for k in (1, 2)}
    if kind == "ddp":  # the DeepSpeed engine has no checkpoint state yet
        results["resume"] = _resume_matches_continuing(kind, stage)
    return results


def _one_step(engine, images, labels):
    engine.zero_grad()
    head = _head()
    loss = head(engine.forward(images), labels)
    engine.backward(loss)
    engine.clip_and_step()
    return float(loss.detach())


def _resume_matches_continuing(kind, stage):
    """An engine rebuilt from ``state_dict`` continues exactly like the original."""
    from partialfc.distributed.engines import build_engine

    rank = torch.distributed.get_rank()
    batches = _batches(rank, WORLD, BATCH, 4)
    common = dict(device=torch.device("cpu"), make_optimizer=_sgd, make_scheduler=_schedule, clip_grad_norm=CLIP,
                  micro_batch_size=BATCH, zero_stage=stage)
    original = build_engine(kind, _backbone(), **common)
    original.train(False)
    for images, labels in batches[:2]:
        _one_step(original, images, labels)
    buffer = io.BytesIO()  # through bytes, as through a checkpoint file: copies, weights-only
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    backbone = _backbone()
    backbone.load_state_dict(original.module.state_dict())  # weights travel in the model checkpoint
    resumed = build_engine(kind, backbone, **common)
    resumed.train(False)
    resumed.load_state_dict(state)
    continued = [_one_step(original, *batch) for batch in batches[2:]]
    replayed = [_one_step(resumed, *batch) for batch in batches[2:]]
    return continued, replayed, _flat(original.module), _flat(resumed.module)


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


@pytest.mark.parametrize("kind,stage", [("ddp", 1), pytest.param("deepspeed", 2, marks=needs_deepspeed)])
def test_accumulation_and_resume(kind, stage):
    results = run_ranks(_accumulation_worker, WORLD, kind, stage)
    for rank_result in results:
        if "resume" in rank_result:
            continued, replayed, original_weights, resumed_weights = rank_result["resume"]
            assert replayed == pytest.approx(continued, rel=1e-6)
            assert continued[0] != pytest.approx(continued[1], rel=1e-3)  # the steps did change the model
            torch.testing.assert_close(resumed_weights, original_weights)
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


# ---------------------------------------------------------------------- config and errors
def test_deepspeed_config_from_ours_and_user_json(tmp_path):
    from partialfc.distributed.engines import deepspeed_config

    config = deepspeed_config(micro_batch_size=7, accumulate=3, world_size=5, clip_grad_norm=2.0, amp="bf16",
                              zero_stage=2)
    assert config["train_batch_size"] == 7 * 3 * 5
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (7, 3)
    assert config["gradient_clipping"] == 2.0
    assert (config["fp16"]["enabled"], config["bf16"]["enabled"]) == (False, True)
    assert config["zero_optimization"] == {"stage": 2}

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "bf16": {"enabled": True}}))
    merged = deepspeed_config(micro_batch_size=7, accumulate=3, world_size=5, clip_grad_norm=2.0, amp="bf16",
                              zero_stage=2, user_json=str(user))
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["train_batch_size"] == 105

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
