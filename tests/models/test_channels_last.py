"""channels_last backbones (``train.channels_last``) compute what NCHW ones compute.

Through the DDP engine in one process (no group: the engine's own conversion of the
module and of each input is what is tested): the same initial weights, one run NCHW,
one channels_last, must give equal embeddings (BatchNorm in train and in eval mode),
equal parameter gradients and equal weights after an optimizer step, to float
tolerance (oneDNN picks other blockings, hence other summation orders, for NHWC).
The channels_last run is checked to really be channels_last (weights, and the input
the first convolution sees), so a conversion that silently does nothing fails here.

A channels_last module also exports to ONNX and matches onnxruntime, and the
resolution of ``auto`` follows the device.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from partialfc.distributed.engines import build_engine
from partialfc.models import build_backbone
from partialfc.models.memory_format import (
    images_to_channels_last,
    is_channels_last,
    resolve_channels_last,
)

# One of each family, small: IResNet with one block per stage has every layer type of
# iresnet50/100 (stem, strided blocks with downsample, neck), which repeat the same blocks;
# mobilefacenet_tiny has every layer type of the full MobileFaceNet at a quarter width.
def _iresnet_one_block(embedding_size):
    from partialfc.models.iresnet import IResNet

    return IResNet([1, 1, 1, 1], embedding_size=embedding_size)


def _mobilefacenet_tiny(embedding_size):
    return build_backbone("mobilefacenet_tiny", embedding_size=embedding_size)


BACKBONES = {"iresnet": _iresnet_one_block, "mobilefacenet_tiny": _mobilefacenet_tiny}


def _engine(model, channels_last):
    return build_engine("ddp", model, device=torch.device("cpu"),
                        make_optimizer=lambda p: torch.optim.SGD(p, lr=1e-4, momentum=0.9, weight_decay=5e-4),
                        make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0),
                        clip_grad_norm=0.0, channels_last=channels_last)


def _first_conv(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _close(a, b, what, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _relative_error(value, expected):
    return ((value - expected).norm() / expected.norm()).item()


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _flat_grad(module):
    return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_channels_last_engine_matches_nchw(name):
    torch.manual_seed(0)
    embedding_size = 24
    reference = BACKBONES[name](embedding_size)
    converted = copy.deepcopy(reference)
    engines = {False: _engine(reference, False), True: _engine(converted, True)}
    seen_formats = []
    _first_conv(converted).register_forward_pre_hook(lambda _m, args: seen_formats.append(is_channels_last(args[0])))
    assert is_channels_last(_first_conv(converted).weight)
    assert not is_channels_last(_first_conv(reference).weight)

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 112, 112, generator=generator)  # odd batch: BN statistics over 3 rows
    grad_out = torch.randn(3, embedding_size, generator=generator)  # random dL/d embedding

    # Gradients are compared as a whole vector (relative L2 error). In train mode, BatchNorm
    # over 3 images amplifies rounding, and torch's CPU channels_last BatchNorm kernel is a
    # few times less accurate in fp32 than the NCHW one (measured per layer against
    # float64); chained over a deep net that reaches ~2e-3 (mobilefacenet). A layout bug
    # (a transposed weight, a wrong stride) errs by O(1). The float64 test below shows
    # both formats agree to rounding when rounding is negligible.
    for train_mode, grad_tolerance in ((False, 1e-3), (True, 1e-2)):
        outputs, grads, updates = {}, {}, {}
        for channels_last, engine in engines.items():
            engine.train(train_mode)
            engine.zero_grad()
            embeddings = engine.forward(images.clone())
            engine.backward((embeddings * grad_out).sum())
            outputs[channels_last] = embeddings.detach()
            grads[channels_last] = _flat_grad(engine.module)
            before = _flat(engine.module)
            engine.clip_and_step()
            updates[channels_last] = _flat(engine.module) - before
        mode = "train" if train_mode else "eval"
        for what, values, tolerance in (("embeddings", outputs, 1e-4), ("gradients", grads, grad_tolerance),
                                        ("SGD updates", updates, grad_tolerance)):
            error = _relative_error(values[True], values[False])
            assert error < tolerance, f"{name} {mode}-mode {what}: relative L2 error {error:.2e}"
    assert seen_formats == [True, True], "the engine did not hand the backbone a channels_last batch"

    with torch.no_grad():  # a channels_last module also takes a plain NCHW batch (evaluation code)
        converted.eval()
        reference.eval()
        error = _relative_error(converted(images), reference(images))
        assert error < 1e-3, f"{name} eval-mode embeddings, NCHW input: relative L2 error {error:.2e}"


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_channels_last_gradients_exact_in_float64(name):
    """Train-mode BatchNorm, float64: the formats must agree to rounding, not just closely."""
    from partialfc.models.memory_format import module_to_channels_last

    torch.manual_seed(0)
    reference = BACKBONES[name](16).double().train()
    converted = module_to_channels_last(copy.deepcopy(reference))
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 112, 112, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(3, 16, generator=generator, dtype=torch.float64)
    outputs = []
    for model, batch in ((reference, images), (converted, images_to_channels_last(images))):
        # body + neck directly: Backbone.forward runs the neck in float32 by design.
        embeddings = model.forward_neck(model.forward_body(batch))
        (embeddings * grad_out).sum().backward()
        outputs.append(embeddings.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-12)
    expected = _flat_grad(reference)
    torch.testing.assert_close(_flat_grad(converted) / expected.abs().max(), expected / expected.abs().max(),
                               rtol=0, atol=1e-10)


def test_channels_last_module_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from partialfc.export import export_onnx, verify_onnx
    from partialfc.models.memory_format import module_to_channels_last

    torch.manual_seed(0)
    model = module_to_channels_last(build_backbone("mobilefacenet_tiny", embedding_size=24))
    model.train()
    with torch.no_grad():  # move the running statistics away from (0, 1) so eval mode is not trivial
        model(torch.randn(4, 3, 112, 112))
    path = tmp_path / "cl.onnx"
    export_onnx(model, path)
    assert verify_onnx(model, path) < 1e-4
    assert is_channels_last(_first_conv(model).weight)  # export leaves the module as it was


@pytest.mark.parametrize("setting,device,expected", [
    ("auto", "cpu", False), ("auto", "cuda", True), ("on", "cpu", True), ("off", "cuda", False)])
def test_resolve_channels_last(setting, device, expected):
    assert resolve_channels_last(setting, torch.device(device)) is expected


def test_resolve_channels_last_rejects_unknown_setting():
    with pytest.raises(ValueError, match="train.channels_last must be one of .* got 'yes'"):
        resolve_channels_last("yes", "cpu")


def test_images_to_channels_last_needs_a_batch():
    with pytest.raises(ValueError, match=r"expected a \(B, C, H, W\) image batch, got shape \(3, 112, 112\)"):
        images_to_channels_last(torch.zeros(3, 112, 112))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (channels_last is the CUDA default)")
def test_channels_last_engine_matches_nchw_cuda_bf16():
    torch.manual_seed(0)
    reference = build_backbone("iresnet18", embedding_size=32, amp_dtype="bf16").cuda()
    converted = copy.deepcopy(reference)
    engines = {False: _engine(reference, False), True: _engine(converted, True)}
    images = torch.randn(8, 3, 112, 112, device="cuda")
    outputs = {}
    for channels_last, engine in engines.items():
        engine.train(True)
        embeddings = engine.forward(images)
        engine.backward(embeddings.square().mean())
        outputs[channels_last] = embeddings.detach()
    _close(outputs[True], outputs[False], "bf16 embeddings", rtol=3e-2, atol=3e-2)
