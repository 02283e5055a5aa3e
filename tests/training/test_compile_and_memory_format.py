"""``train.compile = backbone`` and ``train.channels_last`` through both engines.

The compiled path uses ``compile_backend="aot_eager"`` (build_engine's private knob):
it runs dynamo's capture and AOTAutograd's forward/backward split -- everything
``inductor`` does except generating C++/Triton code -- so it checks the engine's
wiring (what is compiled, DDP and no_sync around it, gradients reaching the
optimizer) in seconds instead of minutes of C++ builds on a CI core. Its numerics
equal eager's, so the first steps must match the eager run closely.

DeepSpeed (one gloo rank): channels_last input plus the engine's compile hook must
reproduce the eager NCHW DDP run.
"""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from spawn import run_ranks

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))

EMBEDDING = 16
STEPS = 3


def _backbone():
    from partialfc.models import build_backbone

    torch.manual_seed(0)
    return build_backbone("mobilefacenet_tiny", embedding_size=EMBEDDING)


def _engine(kind, model, **kwargs):
    from partialfc.distributed.engines import build_engine

    return build_engine(kind, model, device=torch.device("cpu"),
                        make_optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
                        make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0),
                        clip_grad_norm=2.0, micro_batch_size=4, **kwargs)


def _train(engine, steps=STEPS, accumulate=1):
    """Losses of ``steps`` steps on fixed random batches; a random linear loss per step."""
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        images = torch.randn(4, 3, 112, 112, generator=generator)
        weights = torch.randn(4, EMBEDDING, generator=generator)
        engine.train(True)
        engine.zero_grad()
        total = 0.0
        for image_part, weight_part in zip(images.chunk(accumulate), weights.chunk(accumulate)):
            loss = (engine.forward(image_part) * weight_part).sum()
            engine.backward(loss)
            total += float(loss.detach())
        engine.clip_and_step()
        losses.append(total)
    return losses


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_compiled_backbone_matches_eager_ddp():
    from torch._dynamo.eval_frame import OptimizedModule

    torch._dynamo.reset()
    eager_model = _backbone()
    compiled_model = copy.deepcopy(eager_model)
    eager = _engine("ddp", eager_model)
    compiled = _engine("ddp", compiled_model, compile_mode="backbone", compile_backend="aot_eager")
    assert isinstance(compiled.model, OptimizedModule)  # the training forward goes through dynamo
    assert compiled.module is compiled_model  # evaluation, saving and export see the plain module
    assert list(compiled.backbone_state_dict()) == list(eager.backbone_state_dict())
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    eager_losses, compiled_losses = _train(eager), _train(compiled)
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames_before  # something was compiled
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_flat(compiled_model), _flat(eager_model), rtol=1e-5, atol=1e-6)


def test_compile_rejects_unknown_mode():
    with pytest.raises(ValueError, match=r"train.compile must be one of \('none', 'backbone'\), got 'all'"):
        _engine("ddp", _backbone(), compile_mode="all")


def _deepspeed_rank(rank, world_size):
    engine = _engine("deepspeed", _backbone(), channels_last=True, compile_mode="backbone",
                     compile_backend="aot_eager", accumulate=2)
    reference = _engine("ddp", _backbone(), accumulate=2)  # eager, NCHW
    seen = []
    forward = engine._forward  # what the engine hands DeepSpeed, outside the compiled region
    engine._forward = lambda images: seen.append(images.is_contiguous(memory_format=torch.channels_last)
                                                 and not images.is_contiguous()) or forward(images)
    return {"deepspeed": _train(engine, accumulate=2), "reference": _train(reference, accumulate=2),
            "is_compiled": engine.ds_engine.is_compiled, "channels_last_input": seen,
            "weights": (_flat(engine.module), _flat(reference.module))}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_compiled_channels_last_matches_eager_ddp():
    (result,) = run_ranks(_deepspeed_rank, 1, timeout=600)
    assert result["is_compiled"]
    assert result["channels_last_input"] == [True] * 2 * STEPS
    torch.testing.assert_close(torch.tensor(result["deepspeed"]), torch.tensor(result["reference"]),
                               rtol=1e-4, atol=1e-4)
    weights, expected = result["weights"]
    torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-5)
