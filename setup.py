"""Packaging for partialfc.

``kernels/`` sits at the top of the repository (the layout asks for it) but is
installed as ``partialfc.kernels``: a bare top-level ``kernels`` module would clash
with an unrelated PyPI package of that name.

torch keeps an open range here for users with their own CUDA build. On a machine
without torch, install the pinned CPU wheel first (the Makefile does), or pip will
pull a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

PACKAGES = find_packages(include=["partialfc", "partialfc.*"]) + ["partialfc.kernels"]

setup(
    name="partialfc",
    version="0.1.0",
    description="Partial FC face-recognition trainer: sharded, sampled, sub-center margin softmax",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"partialfc.kernels": "kernels"},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "pillow>=9.0",
        "tqdm>=4.60",
        # The trainer serves Prometheus metrics by default (metrics.port_base): a core need.
        "prometheus-client>=0.17",
    ],
    extras_require={
        # Fused Triton kernel (CUDA at run time; TRITON_INTERPRET=1 on CPU for tests).
        "triton": ["triton>=3.0"],
        # DALI RecordIO pipeline; the CUDA 12 wheel also runs CPU pipelines.
        "dali": ["nvidia-dali-cuda120>=1.30"],
        "deepspeed": ["deepspeed>=0.14"],
        "metrics": ["tensorboard>=2.12"],  # metrics.tensorboard = true
        "eval": ["matplotlib>=3.6", "onnx>=1.14", "onnxruntime>=1.16"],
        "test": ["pytest>=7.0", "pytest-timeout>=2.1"],
    },
)
