"""Export a trained backbone to ONNX for deployment.

The backbone is exported in eval mode (BatchNorm folded to its running statistics,
dropout off) for 112 x 112 RGB input normalized as ``(x - 127.5) / 128`` and a
dynamic batch dimension. The TorchScript-based exporter (``dynamo=False``) is used:
it handles these plain conv nets without extra dependencies. After writing, the
file is checked with ``onnx.checker`` and, when onnxruntime is installed, run once
against the torch model so a bad export fails here, not in production.

CLI::

    python -m partialfc.export CHECKPOINT --onnx OUT.onnx [--opset 17] [--no-verify]

CHECKPOINT is anything ``partialfc.models.inference.load_model`` takes (run directory,
checkpoints root, step directory, ``backbone.pt``, consolidated file); a bad one is one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from partialfc.atomic_io import atomic_output_path
from partialfc.data.pixels import normalize_pixels

__all__ = ["export_onnx", "verify_onnx", "main"]

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
IMAGE_SIZE = 112


def _example_input(batch_size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 255.0
    return normalize_pixels(images).to(device)


def export_onnx(model: nn.Module, out_path: str | os.PathLike, opset: int = 17) -> None:
    """Write ``model`` (eval mode, on CPU) to ``out_path`` atomically and run the ONNX checker.

    Mixed precision (a backbone's ``amp_dtype``) is switched off while tracing. The
    model's training mode, device and ``amp_dtype`` are restored afterwards.
    """
    import onnx  # deferred: only export needs it

    if not isinstance(opset, int) or opset < 11:
        raise ValueError(f"opset must be an int >= 11, got {opset!r}")
    parameter = next(model.parameters(), None)
    original_device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    # Mixed precision is a training-time choice; the exported graph stays float32.
    amp_dtype = getattr(model, "amp_dtype", None)
    if amp_dtype is not None:
        model.amp_dtype = None
    model.eval().cpu()
    try:
        with atomic_output_path(out_path) as temp_path:
            with torch.no_grad(), warnings.catch_warnings():
                # Input-shape checks in forward() are constants for a fixed 112 x 112 export.
                warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
                warnings.simplefilter("ignore", category=DeprecationWarning)
                torch.onnx.export(
                    model,
                    (_example_input(2, torch.device("cpu")),),
                    temp_path,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
            onnx.checker.check_model(temp_path)  # a path also works for models over 2 GB
    finally:
        model.to(original_device).train(was_training)
        if amp_dtype is not None:
            model.amp_dtype = amp_dtype


def verify_onnx(model: nn.Module, onnx_path: str | os.PathLike, batch_size: int = 3) -> float:
    """Run the ONNX file with onnxruntime and the torch model on one input.

    Returns the largest absolute difference divided by the largest absolute torch
    output, so the number means the same for any embedding scale. ``batch_size``
    differs from the export batch on purpose: it exercises the dynamic axis.
    """
    import onnxruntime  # deferred: optional dependency

    session = onnxruntime.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    images = _example_input(batch_size, torch.device("cpu"))
    (onnx_embeddings,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch_embeddings = model(images.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    if onnx_embeddings.shape != torch_embeddings.shape:
        raise ValueError(
            f"{os.fspath(onnx_path)}: ONNX output shape {onnx_embeddings.shape} "
            f"!= torch {torch_embeddings.shape}"
        )
    scale = max(float(np.max(np.abs(torch_embeddings))), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(onnx_embeddings - torch_embeddings))) / scale


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.export",
        description="Export a backbone to ONNX (eval mode, 3x112x112 input, dynamic batch).",
    )
    parser.add_argument("checkpoint", help="run dir, checkpoints root, step dir, backbone.pt or "
                                           "consolidated checkpoint file")
    parser.add_argument("--onnx", required=True, help="output .onnx path")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the onnxruntime comparison with the torch model")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max difference relative to the largest embedding component (default 1e-4)")
    return parser.parse_args(argv)


def _require(module: str, hint: str = "") -> None:
    """A missing optional dependency is a one-line instruction, not an ImportError traceback."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ValueError(f"ONNX export needs the {module!r} package: "
                         f"pip install 'partialfc[eval]'{hint}") from None


def _run(args: argparse.Namespace) -> int:
    from partialfc.models import load_backbone  # deferred: keeps `--help` fast

    _require("onnx")
    if not args.no_verify:
        _require("onnxruntime", " (or pass --no-verify to skip the onnxruntime check)")
    model = load_backbone(args.checkpoint)
    export_onnx(model, args.onnx, args.opset)
    message = f"wrote {args.onnx} (opset {args.opset})"
    if not args.no_verify:
        difference = verify_onnx(model, args.onnx)
        if not difference <= args.tolerance:
            raise ValueError(
                f"{args.onnx}: onnxruntime output differs from torch by {difference:.3g} "
                f"(> tolerance {args.tolerance})"
            )
        message += f"; onnxruntime matches torch, max relative diff {difference:.2e}"
    print(message)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from partialfc.eval.cli_errors import run_cli

    args = _parse_args(argv)
    return run_cli("export", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
