"""ONNX export: the onnxruntime embedding matches torch, on batch sizes other than the traced one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval_helpers import save_tiny_backbone
from partialfc import export

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_cli_export_matches_torch_with_dynamic_batch(tmp_path, capsys):
    model = save_tiny_backbone(tmp_path / "backbone.pt", seed=3)
    out = tmp_path / "model.onnx"
    assert export.main([str(tmp_path / "backbone.pt"), "--onnx", str(out)]) == 0
    assert "onnxruntime matches torch" in capsys.readouterr().out

    graph = onnx.load(str(out))
    assert graph.opset_import[0].version == 17
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: dynamic batch

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch_size in (1, 5):
        pixels = rng.integers(0, 256, (batch_size, 3, 112, 112)).astype(np.float32)
        images = (pixels - 127.5) / 128.0
        (got,) = session.run(None, {session.get_inputs()[0].name: images})
        with torch.no_grad():
            expected = model(torch.from_numpy(images)).numpy()
        assert got.shape == (batch_size, 16)
        assert np.abs(expected).max() > 0.1  # calibrated BN: a real signal, not ~0
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_export_restores_mode_and_refuses_missing_folder(tmp_path):
    model = save_tiny_backbone(tmp_path / "b.pt")
    model.train()
    model.amp_dtype = torch.bfloat16  # as a backbone trained with mixed precision would be
    export.export_onnx(model, tmp_path / "m.onnx")
    assert model.training and model.amp_dtype == torch.bfloat16
    casts = [node for node in onnx.load(str(tmp_path / "m.onnx")).graph.node if node.op_type == "Cast"]
    assert all(attr.i != onnx.TensorProto.BFLOAT16 for node in casts for attr in node.attribute)
    model.amp_dtype = None
    assert export.verify_onnx(model, tmp_path / "m.onnx", batch_size=2) < 1e-4
    assert model.training
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(ValueError, match="output folder does not exist"):
        export.export_onnx(model, tmp_path / "nope" / "m.onnx")
    with pytest.raises(ValueError, match="opset must be an int >= 11, got 9"):
        export.export_onnx(model, tmp_path / "m.onnx", opset=9)
