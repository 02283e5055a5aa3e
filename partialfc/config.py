"""Typed, frozen run configuration with a strict loader.

A config is a TOML file whose tables mirror the dataclasses below. Loading is strict:
an unknown table or key fails with the closest valid names (a typo never becomes a
silent new key), and every value is checked against its field's type.
``--set section.key=value`` overrides use the same checks; the value is parsed as a
TOML literal (``0.1``, ``true``, ``"text"``, ``[1, 2]``) and falls back to a plain
string. The resolved config is written to the run directory as TOML.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "iresnet50"
    """Registered backbone name (``partialfc.models.list_backbones()``)."""
    embedding_size: int = 512
    """Width of the embedding and of every class center."""
    dropout: float = 0.0
    """Dropout before the embedding FC (insightface uses 0 for large sets)."""


@dataclass(frozen=True)
class HeadConfig:
    margin: str = "arcface"
    """Margin preset: arcface, cosface, sphereface or combined."""
    scale: Optional[float] = None
    """Override of the preset's logit scale s (None keeps the preset's)."""
    m1: Optional[float] = None
    """Override of the multiplicative angular margin (SphereFace)."""
    m2: Optional[float] = None
    """Override of the additive angular margin (ArcFace)."""
    m3: Optional[float] = None
    """Override of the additive cosine margin (CosFace)."""
    sample_rate: float = 1.0
    """Fraction r of each rank's classes kept per step (positives always kept)."""
    num_subcenters: int = 1
    """K sub-centers per identity; K = 3 for the cleaning workflow."""
    impl: str = "auto"
    """Margin-softmax implementation: auto (by the table partialfc.kernels.AUTO_TABLE: triton on CUDA until a
    GPU measurement says gemm wins, chunked torch on CPU), gemm, triton, torch, naive."""
    chunk_size: Optional[int] = None
    """Classes per tile of the chunked paths (None, best left so: each impl's own -- torch 8192 center rows,
    gemm the classes whose B x chunk buffers fit 256 MiB, triton autotuned; triton needs a power of 2 >= 16)."""
    lr_scale: float = 1.0
    """Head learning rate as a multiple of the backbone's."""
    compute_dtype: str = "auto"
    """Embeddings fed to the margin softmax: fp32, or bf16 / fp16 (half the gather, tensor cores on CUDA);
    auto = bf16 on CUDA with train.amp = bf16, else fp32 (always fp32 on CPU; with fp16 amp too, because the
    head's gradient is not loss-scaled and fp16 would flush most of its small entries to zero)."""
    intra_weight: float = 0.0
    """Intra-loss (ArcFace paper): adds weight * mean theta_y / pi, the angle to the matched target center (0: off)."""
    inter_weight: float = 0.0
    """Inter-loss (ArcFace paper): subtracts weight * the mean angle / pi from each target center to the other kept
    centers (r < 1: a sample of them; 0: off)."""
    triplet_weight: float = 0.0
    """Batch-hard triplet hinge on angles over the global batch, added with this weight (0: off)."""
    triplet_margin: float = 0.35
    """Triplet margin in radians: acos(x, x_pos) + margin <= acos(x, x_neg)."""


@dataclass(frozen=True)
class DataConfig:
    format: str = "synthetic"
    """synthetic, image_folder or recordio."""
    path: str = ""
    """Image folder root, or RecordIO prefix (PREFIX.rec / PREFIX.idx / property dir)."""
    num_classes: int = 0
    """Number of identities; 0 reads it from the data (property file or folder count)."""
    batch_size: int = 128
    """Images per rank per step."""
    num_workers: int = 2
    """Loader worker processes (torch) or threads (DALI) per rank."""
    loader: str = "torch"
    """For recordio: dali or torch."""
    skip_corrupt: bool = False
    """Skip and count corrupt records instead of failing (recordio)."""
    num_samples: int = 0
    """Synthetic only: images per epoch (0: 32 per class)."""
    noise: float = 0.6
    """Synthetic only: per-image noise around the class prototype."""


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    """sgd or adamw (the head gets a row-sparse variant of the same)."""
    lr: float = 0.1
    """Learning rate at ``lr_reference_batch`` global images; scaled linearly with the global batch."""
    lr_reference_batch: int = 1024
    """Global batch size at which ``lr`` applies (insightface: 0.1 at 128 x 8)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 (sgd) or decoupled (adamw) weight decay."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: str = "poly"
    """Decay after warmup: poly or cosine (stepped per iteration)."""
    poly_power: float = 2.0
    """Power of the polynomial decay."""
    warmup_epochs: float = 0.0
    """Linear warmup length in epochs."""
    clip_grad_norm: float = 5.0
    """Max gradient norm of the backbone (0 disables clipping)."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    """Epochs to train."""
    max_steps: int = 0
    """Stop when the step counter reaches this (0: run all epochs); the lr schedule still spans all epochs.
    The counter counts optimizer steps whatever their global batch: a run resumed on another world size keeps
    counting, while its epoch position and lr schedule are re-expressed in steps of the new global batch."""
    amp: str = "none"
    """Autocast of the backbone body: none, fp16 (with a grad scaler) or bf16."""
    seed: int = 0
    """Seed of weights, data order and sampling."""
    output: str = "runs/default"
    """Run directory: resolved config, logs, checkpoints."""
    log_every: int = 10
    """Steps between log lines."""
    progress: str = "auto"
    """Progress bar on rank 0 (tqdm, on stderr): auto (when stderr is a terminal), on or off."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_last: int = 3
    """Checkpoints kept on disk."""
    resume: str = ""
    """'' (fresh; refused if output already holds a run), 'auto' (the newest complete checkpoint in output;
    fresh if there is none), 'never' (fresh; the old run's files are moved to output/superseded_<time>/) or a
    checkpoint directory."""
    device: str = "auto"
    """auto (cuda if available), cuda or cpu."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on cuda, gloo on cpu), nccl or gloo."""
    collective_timeout: float = 0.0
    """Minutes a collective may wait for a peer before the job is ended with a line naming the rank that
    stopped answering; 0 = default: 10 on CUDA, 5 on CPU. Must exceed rank 0's longest solo work (evaluation,
    checkpoint write); start-up (rendezvous to the first step) gets at least 10 min."""
    engine: str = "ddp"
    """Backbone engine: ddp, or deepspeed (ZeRO stage ``zero_stage``; the head stays outside)."""
    accumulate: int = 1
    """Micro-batches per optimizer step; data.batch_size must be divisible by it."""
    zero_stage: int = 1
    """DeepSpeed only: ZeRO stage 1 or 2 for the backbone."""
    deepspeed_config: str = ""
    """DeepSpeed only: a JSON file merged into the generated config ('' for none)."""
    channels_last: str = "auto"
    """Backbone weights and input batches in channels_last (NHWC) memory: auto (on for CUDA, off on CPU), on, off."""
    compile: str = "none"
    """torch.compile: none, or backbone (the backbone's forward and backward; the head stays eager)."""
    poll_every: int = 10
    """Steps between the checks that wait for the device: the stop-signal poll (one all-reduce; a SIGTERM or
    SIGUSR1 is acted on at the next poll, then every rank checkpoints and exits) and the label-range check of
    batches made on the device. The last step and every checkpoint step are always checked."""


@dataclass(frozen=True)
class EvalConfig:
    sets: list = field(default_factory=list)
    """Verification .bin files evaluated during training."""
    every: int = 0
    """Steps between evaluations (0: never)."""
    batch_size: int = 64
    """Evaluation batch size."""


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    """Collect Prometheus metrics (served only when port_base > 0)."""
    host: str = "127.0.0.1"
    """Interface of the metrics endpoint; loopback unless you mean to expose it."""
    port_base: int = 0
    """Rank with local rank L serves on port_base + L; 0 serves nothing."""
    tensorboard: bool = False
    """Write TensorBoard scalars to OUTPUT/tensorboard (rank 0)."""


@dataclass(frozen=True)
class Config:
    name: str = "run"
    """Experiment name (e.g. ms1mv3_r100), used in logs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


CHOICES = {
    ("head", "margin"): ("arcface", "cosface", "sphereface", "combined"),
    ("head", "impl"): ("auto", "gemm", "triton", "torch", "naive"),
    ("head", "compute_dtype"): ("auto", "fp32", "bf16", "fp16"),
    ("data", "format"): ("synthetic", "image_folder", "recordio"),
    ("data", "loader"): ("dali", "torch"),
    ("optim", "name"): ("sgd", "adamw"),
    ("optim", "schedule"): ("poly", "cosine"),
    ("train", "amp"): ("none", "fp16", "bf16"),
    ("train", "device"): ("auto", "cuda", "cpu"),
    ("train", "backend"): ("auto", "nccl", "gloo"),
    ("train", "engine"): ("ddp", "deepspeed"),
    ("train", "progress"): ("auto", "on", "off"),
    ("train", "zero_stage"): (1, 2),
    ("train", "channels_last"): ("auto", "on", "off"),
    ("train", "compile"): ("none", "backbone"),
}


@dataclass(frozen=True)
class Bound:
    """The range a number must lie in; ``None`` leaves that side open-ended."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False   # low < value instead of low <= value
    high_open: bool = False  # value < high instead of value <= high

    def admits(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"


# Numbers that would crash later (a division or modulo by zero) or be silently ignored.
# Checked when a value is given (file or --set); the defaults lie inside.
BOUNDS = {
    ("model", "embedding_size"): Bound(1),
    ("model", "dropout"): Bound(0, 1, high_open=True),
    ("head", "scale"): Bound(0, low_open=True),
    ("head", "sample_rate"): Bound(0, 1, low_open=True),
    ("head", "num_subcenters"): Bound(1),
    ("head", "chunk_size"): Bound(1),
    ("head", "lr_scale"): Bound(0, low_open=True),
    ("head", "intra_weight"): Bound(0),
    ("head", "inter_weight"): Bound(0),
    ("head", "triplet_weight"): Bound(0),
    ("head", "triplet_margin"): Bound(0, math.pi, high_open=True),
    ("data", "num_classes"): Bound(0),
    ("data", "batch_size"): Bound(1),
    ("data", "num_workers"): Bound(0),
    ("data", "num_samples"): Bound(0),
    ("data", "noise"): Bound(0),
    ("optim", "lr"): Bound(0),
    ("optim", "lr_reference_batch"): Bound(1),
    ("optim", "momentum"): Bound(0, 1, high_open=True),
    ("optim", "weight_decay"): Bound(0),
    ("optim", "eps"): Bound(0, low_open=True),
    ("optim", "poly_power"): Bound(0),
    ("optim", "warmup_epochs"): Bound(0),
    ("optim", "clip_grad_norm"): Bound(0),
    ("train", "epochs"): Bound(1),
    ("train", "max_steps"): Bound(0),
    ("train", "seed"): Bound(0),
    ("train", "log_every"): Bound(1),
    ("train", "checkpoint_every"): Bound(0),
    ("train", "keep_last"): Bound(0),
    ("train", "accumulate"): Bound(1),
    ("train", "collective_timeout"): Bound(0),
    ("train", "poll_every"): Bound(1),
    ("eval", "every"): Bound(0),
    ("eval", "batch_size"): Bound(1),
    ("metrics", "port_base"): Bound(0, 65535),
}


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _closest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f"; valid: {', '.join(sorted(options))}"


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    """Coerce ints to floats where a float is expected; otherwise require the type."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {"int": int, "float": float, "str": str, "bool": bool, "list": list}.get(
        getattr(hint, "__name__", str(hint)), hint
    )
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}{_closest(key, fields)}")
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _build(hints[key], value, path)
            continue
        value = _check_type(path, value, hints[key])
        choices = CHOICES.get((where, key))
        if choices is not None and value not in choices:
            raise ConfigError(f"{path} = {value!r} is not one of {choices}")
        bound = BOUNDS.get((where, key))
        if bound is not None and value is not None and not bound.admits(value):
            raise ConfigError(f"{path} = {value!r} must be {bound}")
        values[key] = value
    return cls(**values)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    schema = Config
    for depth, key in enumerate(keys):
        fields = {f.name: f for f in dataclasses.fields(schema)}
        if key not in fields:
            prefix = ".".join(keys[:depth])
            where = f" in [{prefix}]" if prefix else ""
            raise ConfigError(f"--set {dotted}: unknown key {key!r}{where}{_closest(key, fields)}")
        hint = typing.get_type_hints(schema)[key]
        if depth == len(keys) - 1:
            if dataclasses.is_dataclass(hint):
                raise ConfigError(f"--set {dotted}: {key!r} is a table, set one of its keys")
            node[key] = value
            return
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"--set {dotted}: {key!r} is not a table")
        node = node.setdefault(key, {})
        schema = hint


def load_config(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> Config:
    """Read a TOML config, apply ``key.path=value`` overrides, validate, return it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        _set_path(tree, key.strip(), _parse_value(text.strip()))
    try:
        return _build(Config, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def dump_config(config: Config) -> str:
    """The config as TOML (None fields are omitted: absent means None)."""
    tree = config_to_dict(config)
    lines = [f"name = {_toml_value(tree.pop('name'))}"]
    for section, values in tree.items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"
