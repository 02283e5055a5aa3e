"""Tests for partialfc.models: registry, IResNet, MobileFaceNet, backbone files.

Forward passes use iresnet18 / mobilefacenet with batch 2 only; the large
IResNets are built on the meta device so their parameters are counted without
allocating or running them.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partialfc.models import (
    build_backbone,
    list_backbones,
    load_backbone,
    register_backbone,
    save_backbone,
)
from partialfc.models import registry as registry_module
from partialfc.models.inference import BACKBONE_FORMAT

REPO_ROOT = Path(__file__).resolve().parents[2]

IRESNET_LAYERS = {
    "iresnet18": [2, 2, 2, 2],
    "iresnet34": [3, 4, 6, 3],
    "iresnet50": [3, 4, 14, 3],
    "iresnet100": [3, 13, 30, 3],
    "iresnet200": [6, 26, 60, 6],
}

# Total parameters (trainable + the frozen features-BN scale) with E=512.
# Obtained once by building each model on the meta device and summing
# p.numel() over model.parameters() (torch 2.13); they agree with
# iresnet_param_count() below and with insightface's published ~43.6 M (r50)
# and ~65.2 M (r100).
EXPECTED_PARAMS_E512 = {
    "iresnet18": 24_025_600,
    "iresnet34": 34_139_328,
    "iresnet50": 43_590_848,
    "iresnet100": 65_156_160,
    "iresnet200": 118_833_920,
    "mobilefacenet": 1_200_512,
}


def count_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_on_meta(name, **kwargs):
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


def iresnet_param_count(layers, embedding_size):
    """Closed-form parameter count of IResNet, from the architecture description."""
    def bn(c):
        return 2 * c

    total = 3 * 64 * 9 + bn(64) + 64  # stem conv, BN, PReLU
    in_ch = 64
    for blocks, width in zip(layers, (64, 128, 256, 512)):
        for index in range(blocks):
            total += bn(in_ch) + in_ch * width * 9 + bn(width) + width + width * width * 9 + bn(width)
            if index == 0:
                total += in_ch * width + bn(width)  # 1x1 downsample, every stage strides
            in_ch = width
    total += bn(512) + 512 * 49 * embedding_size + embedding_size + bn(embedding_size)
    return total


def mobilefacenet_param_count(embedding_size, blocks=(5, 1, 6, 1, 2)):
    """Closed-form parameter count of MobileFaceNet (width_mult=1)."""
    def conv(in_ch, out_ch, kernel, groups=1, prelu=True):
        return kernel * kernel * (in_ch // groups) * out_ch + 2 * out_ch + (out_ch if prelu else 0)

    total = conv(3, 64, 3) + conv(64, 64, 3, groups=64)
    in_ch = 64
    for (t, out_ch), repeats in zip([(2, 64), (4, 128), (2, 128), (4, 128), (2, 128)], blocks):
        for _ in range(repeats):
            hidden = in_ch * t
            total += conv(in_ch, hidden, 1) + conv(hidden, hidden, 3, groups=hidden)
            total += conv(hidden, out_ch, 1, prelu=False)
            in_ch = out_ch
    total += conv(in_ch, 512, 1) + conv(512, 512, 7, groups=512, prelu=False)
    return total + 512 * embedding_size + 2 * embedding_size


def randomize_(model, seed=0):
    """Give every parameter and BN statistic non-trivial values (BN stats stay valid)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith("running_mean") or name.endswith("bias"):
                tensor.copy_(0.1 * noise)
            elif tensor.dim() == 1:  # BN scales and PReLU slopes
                tensor.copy_(1.0 + 0.2 * noise if "prelu" not in name else 0.25 + 0.1 * noise)
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(noise / fan_in ** 0.5)
    return model


def record_output(module, store, key, attribute):
    """Forward hook saving ``getattr(output, attribute)``; returns None so the output is kept."""
    def hook(_module, _inputs, output):
        store[key] = getattr(output, attribute)

    module.register_forward_hook(hook)


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def iresnet18_eval():
    torch.manual_seed(0)
    return randomize_(build_backbone("iresnet18", embedding_size=77)).eval()


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


def test_list_backbones_has_all_builtins():
    assert set(EXPECTED_PARAMS_E512) <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'iresnet5O'.*'iresnet50'"):
        build_backbone("iresnet5O")
    with pytest.raises(TypeError, match="must be a str"):
        build_backbone(50)


def test_unknown_kwarg_is_named():
    with pytest.raises(TypeError, match=r"'embeding_size'.*did you mean 'embedding_size'"):
        build_backbone("iresnet18", embeding_size=128)
    with pytest.raises(TypeError, match="'width_mult'"):
        build_backbone("iresnet18", width_mult=0.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"embedding_size": 0}, "embedding_size"),
        ({"embedding_size": 12.0}, "embedding_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"amp_dtype": "fp8"}, "amp_dtype"),
        ({"amp_dtype": torch.bfloat16}, "amp_dtype"),
    ],
)
def test_bad_common_kwarg_values(kwargs, field):
    for name in ("iresnet18", "mobilefacenet"):
        with pytest.raises(ValueError, match=field):
            build_on_meta(name, **kwargs)


def test_bad_mobilefacenet_kwargs():
    with pytest.raises(ValueError, match="blocks"):
        build_on_meta("mobilefacenet", blocks=(1, 2, 3))
    with pytest.raises(ValueError, match="width_mult"):
        build_on_meta("mobilefacenet", width_mult=0)


def test_register_custom_and_duplicate(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_backbone("tiny_test_net")
    def tiny_test_net(embedding_size: int = 4):
        return nn.Linear(3, embedding_size)

    assert "tiny_test_net" in list_backbones()
    assert build_backbone("tiny_test_net", embedding_size=5).out_features == 5
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny_test_net")(lambda: nn.Identity())
    with pytest.raises(TypeError, match="non-empty str"):
        register_backbone("")


def test_import_does_no_work():
    code = (
        "import sys, partialfc.models as m; "
        "print(any(k in sys.modules for k in ('partialfc.models.iresnet', 'partialfc.models.mobilefacenet')))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------
# Architecture: parameter counts, layout, forward against a reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS_E512))
def test_param_counts(name):
    model = build_on_meta(name)
    total = count_params(model)
    assert total == EXPECTED_PARAMS_E512[name]
    if name in IRESNET_LAYERS:
        assert total == iresnet_param_count(IRESNET_LAYERS[name], 512)
    else:
        assert total == mobilefacenet_param_count(512)
    # Only the frozen features-BN scale (E values) is excluded from training.
    assert total - count_params(model, trainable_only=True) == 512


def test_iresnet100_is_about_65m():
    assert 64e6 <= count_params(build_on_meta("iresnet100")) <= 66e6


@pytest.mark.parametrize("embedding_size", [1, 77, 128])
def test_param_counts_follow_embedding_size(embedding_size):
    assert count_params(build_on_meta("iresnet34", embedding_size=embedding_size)) == iresnet_param_count(
        IRESNET_LAYERS["iresnet34"], embedding_size
    )
    blocks = (1, 2, 1, 3, 1)
    model = build_on_meta("mobilefacenet", embedding_size=embedding_size, blocks=blocks)
    assert count_params(model) == mobilefacenet_param_count(embedding_size, blocks)


def test_mobilefacenet_width_mult_shrinks():
    assert count_params(build_on_meta("mobilefacenet", width_mult=0.5)) < count_params(
        build_on_meta("mobilefacenet")
    )


def test_batchnorm_layers_present_and_features_scale_frozen():
    # Inversion matches batch statistics at every BN layer: check they exist.
    for name, layers in IRESNET_LAYERS.items():
        model = build_on_meta(name)
        bn2d = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        # stem + 3 per block + 1 per stage downsample + neck
        assert len(bn2d) == 1 + 3 * sum(layers) + 4 + 1
        assert all(m.track_running_stats for m in bn2d)
    mobile = build_on_meta("mobilefacenet")
    # stem 2, 3 per bottleneck, final 1x1, GDC
    assert sum(isinstance(m, nn.BatchNorm2d) for m in mobile.modules()) == 2 + 3 * 15 + 1 + 1

    for name in ("iresnet18", "mobilefacenet"):
        model = build_backbone(name, embedding_size=16)
        assert isinstance(model.features, nn.BatchNorm1d)
        assert not model.features.weight.requires_grad
        assert torch.equal(model.features.weight, torch.ones(16))
        assert model.features.bias.requires_grad


def reference_iresnet_forward(state, layers, x):
    """IResNet eval forward written with torch.nn.functional from the state dict."""
    def bn(t, prefix):
        return F.batch_norm(t, state[prefix + "running_mean"], state[prefix + "running_var"],
                            state[prefix + "weight"], state[prefix + "bias"], False, 0.0, 1e-5)

    x = F.prelu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1."), state["prelu.weight"])
    for stage, blocks in enumerate(layers, start=1):
        for index in range(blocks):
            p = f"layer{stage}.{index}."
            stride = 2 if index == 0 else 1
            y = F.conv2d(bn(x, p + "bn1."), state[p + "conv1.weight"], padding=1)
            y = F.prelu(bn(y, p + "bn2."), state[p + "prelu.weight"])
            y = bn(F.conv2d(y, state[p + "conv2.weight"], stride=stride, padding=1), p + "bn3.")
            if p + "downsample.0.weight" in state:
                x = bn(F.conv2d(x, state[p + "downsample.0.weight"], stride=stride), p + "downsample.1.")
            x = x + y
    assert x.shape[1:] == (512, 7, 7)
    x = bn(x, "bn2.").flatten(1)
    x = F.linear(x, state["fc.weight"], state["fc.bias"])
    return bn(x, "features.")


def test_iresnet18_matches_functional_reference(iresnet18_eval):
    x = images()
    out = iresnet18_eval(x)
    assert out.shape == (2, 77) and out.dtype == torch.float32
    expected = reference_iresnet_forward(iresnet18_eval.state_dict(), IRESNET_LAYERS["iresnet18"], x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_mobilefacenet_forward_shapes():
    model = randomize_(build_backbone("mobilefacenet", embedding_size=33)).eval()
    seen = {}
    record_output(model.body, seen, "body", "shape")
    record_output(model.gdc, seen, "gdc", "shape")
    out = model(images())
    assert out.shape == (2, 33) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert seen == {"body": (2, 512, 7, 7), "gdc": (2, 512, 1, 1)}


def test_eval_mode_is_deterministic_and_per_sample(iresnet18_eval):
    x = images(batch=2, seed=3)
    first = iresnet18_eval(x)
    assert torch.equal(first, iresnet18_eval(x))
    # In eval mode BN uses running stats: a sample's embedding must not depend
    # on the rest of the batch.
    torch.testing.assert_close(iresnet18_eval(x[1:]), first[1:], rtol=1e-4, atol=1e-4)


def test_train_mode_updates_bn_stats_and_backward_skips_frozen_scale():
    model = build_backbone("mobilefacenet", embedding_size=8).train()
    before = model.body[0].bn.running_mean.clone()
    model(images()).square().sum().backward()
    assert not torch.equal(before, model.body[0].bn.running_mean)
    assert model.features.weight.grad is None
    assert model.fc.weight.grad is not None


def test_wrong_input_shape_is_rejected(iresnet18_eval):
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\).*\(2, 3, 96, 96\)"):
        iresnet18_eval(torch.zeros(2, 3, 96, 96))


# --------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------


@pytest.mark.parametrize("amp_dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_body_low_precision_neck_float32(amp_dtype, torch_dtype):
    torch.manual_seed(0)
    reference = randomize_(build_backbone("mobilefacenet", embedding_size=64)).eval()
    model = build_backbone("mobilefacenet", embedding_size=64, amp_dtype=amp_dtype).eval()
    model.load_state_dict(reference.state_dict())
    dtypes = {}
    record_output(model.body[2], dtypes, "body", "dtype")
    record_output(model.fc, dtypes, "fc", "dtype")
    x = images()
    out = model(x)
    assert dtypes == {"body": torch_dtype, "fc": torch.float32}
    assert out.dtype == torch.float32
    expected = reference(x)
    cosine = F.cosine_similarity(out, expected, dim=1)
    assert (cosine > 0.98).all(), cosine
    assert not torch.equal(out, expected)  # the body really ran in low precision


def test_iresnet18_bf16_returns_float32(iresnet18_eval):
    model = build_backbone("iresnet18", embedding_size=77, amp_dtype="bf16").eval()
    model.load_state_dict(iresnet18_eval.state_dict())
    x = images(batch=1)  # bf16 convolutions are slow on CPUs without native bf16
    out = model(x)
    assert out.dtype == torch.float32 and out.shape == (1, 77)
    assert (F.cosine_similarity(out, iresnet18_eval(x), dim=1) > 0.98).all()


def test_neck_stays_float32_under_outer_autocast():
    model = build_backbone("mobilefacenet", embedding_size=16).eval()
    dtypes = {}
    record_output(model.body[2], dtypes, "body", "dtype")
    record_output(model.fc, dtypes, "fc", "dtype")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
    assert dtypes == {"body": torch.bfloat16, "fc": torch.float32}
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------
# Backbone files
# --------------------------------------------------------------------------

SMALL_KWARGS = {"embedding_size": 24, "dropout": 0.1, "blocks": [1, 1, 1, 1, 1], "width_mult": 0.5}


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return randomize_(build_backbone("mobilefacenet", **SMALL_KWARGS), seed=5).eval()


def test_save_load_round_trip(tmp_path, small_model):
    path = tmp_path / "out" / "backbone.pt"
    save_backbone(path, "mobilefacenet", SMALL_KWARGS, small_model.state_dict())
    assert sorted(os.listdir(path.parent)) == ["backbone.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == BACKBONE_FORMAT and raw["name"] == "mobilefacenet"
    assert raw["kwargs"] == SMALL_KWARGS

    loaded = load_backbone(path)
    assert not loaded.training
    assert loaded.embedding_size == 24 and loaded.dropout.p == 0.1
    x = images()
    assert torch.equal(loaded(x), small_model(x))
    for key, value in small_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_three_path_forms(tmp_path, small_model):
    step = tmp_path / "ckpt" / "step_000120"
    save_backbone(step / "backbone.pt", "mobilefacenet", SMALL_KWARGS, small_model.state_dict())
    # A stale older step with different weights must not be picked.
    older = randomize_(build_backbone("mobilefacenet", **SMALL_KWARGS), seed=9)
    save_backbone(tmp_path / "ckpt" / "step_000060" / "backbone.pt", "mobilefacenet", SMALL_KWARGS,
                  older.state_dict())
    (tmp_path / "ckpt" / "latest").write_text("step_000120\n")
    x = images()
    expected = small_model(x)
    for path in (step / "backbone.pt", step, tmp_path / "ckpt", str(tmp_path / "ckpt")):
        assert torch.equal(load_backbone(path)(x), expected), path


@pytest.mark.parametrize("prefix", ["module.", "module._orig_mod."])
def test_wrapper_prefix_is_stripped(tmp_path, small_model, prefix):
    wrapped = {prefix + key: value for key, value in small_model.state_dict().items()}
    save_backbone(tmp_path / "b.pt", "mobilefacenet", SMALL_KWARGS, wrapped)
    x = images()
    assert torch.equal(load_backbone(tmp_path / "b.pt")(x), small_model(x))


def test_failed_save_keeps_old_file(tmp_path, small_model, monkeypatch):
    path = tmp_path / "b.pt"
    save_backbone(path, "mobilefacenet", SMALL_KWARGS, small_model.state_dict())
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_backbone(path, "mobilefacenet", SMALL_KWARGS, small_model.state_dict())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["b.pt"]


def test_save_rejects_bad_arguments(tmp_path, small_model):
    state = small_model.state_dict()
    with pytest.raises(ValueError, match="unknown backbone 'mobilefacenett'"):
        save_backbone(tmp_path / "b.pt", "mobilefacenett", SMALL_KWARGS, state)
    with pytest.raises(TypeError, match=r"kwargs\['amp_dtype'\]"):
        save_backbone(tmp_path / "b.pt", "mobilefacenet", {"amp_dtype": torch.bfloat16}, state)
    with pytest.raises(TypeError, match="str -> Tensor"):
        save_backbone(tmp_path / "b.pt", "mobilefacenet", {}, {"w": [1.0]})
    assert not (tmp_path / "b.pt").exists()


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_backbone(missing)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*'backbone\.pt'.*'latest'"):
        load_backbone(empty_dir)
    (empty_dir / "latest").write_text("step_9")
    with pytest.raises(FileNotFoundError, match=r"'step_9'.*step_9[/\\]backbone\.pt"):
        load_backbone(empty_dir)
    for bad in ("../elsewhere", "", "/abs/path"):
        (empty_dir / "latest").write_text(bad)
        with pytest.raises(ValueError, match="latest: expected the name of a step subdirectory"):
            load_backbone(empty_dir)


def write_payload(path, **overrides):
    payload = {"format": BACKBONE_FORMAT, "name": "mobilefacenet", "kwargs": dict(SMALL_KWARGS),
               "state_dict": build_backbone("mobilefacenet", **SMALL_KWARGS).state_dict()}
    payload.update(overrides)
    torch.save(payload, path)
    return path


def test_bad_files_give_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match="garbage.pt: not a partialfc-backbone/1 file"):
        load_backbone(garbage)

    pickled_module = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled_module)
    with pytest.raises(ValueError, match="module.pt: not a partialfc-backbone/1 file"):
        load_backbone(pickled_module)

    plain_state = tmp_path / "plain.pt"
    torch.save(build_backbone("mobilefacenet", **SMALL_KWARGS).state_dict(), plain_state)
    with pytest.raises(ValueError, match=r"plain.pt: field 'format' is None"):
        load_backbone(plain_state)

    with pytest.raises(ValueError, match=r"old.pt: field 'format' is 'partialfc-backbone/0'"):
        load_backbone(write_payload(tmp_path / "old.pt", format="partialfc-backbone/0"))
    with pytest.raises(ValueError, match=r"list.pt: expected a dict"):
        torch.save([1, 2], tmp_path / "list.pt")
        load_backbone(tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"kw.pt: field 'kwargs' must be a dict"):
        load_backbone(write_payload(tmp_path / "kw.pt", kwargs=[1]))


def test_unknown_name_or_kwarg_in_file(tmp_path):
    with pytest.raises(ValueError, match=r"name.pt: cannot build.*unknown backbone 'mobileface'.*'mobilefacenet'"):
        load_backbone(write_payload(tmp_path / "name.pt", name="mobileface"))
    with pytest.raises(TypeError, match=r"kwarg.pt: cannot build.*'depth'"):
        load_backbone(write_payload(tmp_path / "kwarg.pt", kwargs={"depth": 3}))


def test_state_dict_mismatch_names_keys(tmp_path):
    state = build_backbone("mobilefacenet", **SMALL_KWARGS).state_dict()
    del state["fc.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['fc.weight'\].*unexpected keys \['extra.weight'\]"):
        load_backbone(write_payload(tmp_path / "keys.pt", state_dict=state))

    other = build_backbone("mobilefacenet", **dict(SMALL_KWARGS, embedding_size=25)).state_dict()
    with pytest.raises(ValueError, match=r"shape of 'fc.weight' is \(25, 512\), the model expects \(24, 512\)"):
        load_backbone(write_payload(tmp_path / "shape.pt", state_dict=other))
