"""Strict config loading: typos name the closest keys, types are checked, --set works,
and every shipped config builds (model + one head shard of an 8-rank job)."""
from __future__ import annotations

import glob
import os
import tomllib

import pytest
import torch

from partialfc.config import ConfigError, dump_config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml")))


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_unknown_key_names_closest(tmp_path):
    path = write(tmp_path, "[head]\nsample_rat = 0.1\n")
    with pytest.raises(ConfigError, match=r"head\.sample_rat.*did you mean sample_rate"):
        load_config(path)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"'optimizer'.*optim"):
        load_config(write(tmp_path, "[optimizer]\nlr = 0.1\n"))


def test_misspelled_set_key(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match=r"--set train\.epohcs.*epochs"):
        load_config(path, ["train.epohcs=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.epochs"])


def test_types_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got 'ten'"):
        load_config(write(tmp_path, '[train]\nepochs = "ten"\n'))
    with pytest.raises(ConfigError, match=r"head\.margin = 'arc' is not one of"):
        load_config(write(tmp_path, '[head]\nmargin = "arc"\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[head\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_set_overrides_and_int_to_float(tmp_path):
    cfg = load_config(write(tmp_path, "[optim]\nlr = 1\n"),
                      ["train.epochs=3", "head.margin=cosface", "optim.betas=[0.8, 0.9]", "train.output=runs/x"])
    assert cfg.train.epochs == 3 and cfg.head.margin == "cosface"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.9] and cfg.train.output == "runs/x"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_round_trips(path):
    cfg = load_config(path)
    again = tomllib.loads(dump_config(cfg))
    assert again["head"]["sample_rate"] == cfg.head.sample_rate
    assert again["model"]["backbone"] == cfg.model.backbone


# The production configs (demo and the RecordIO example have their own tests).
@pytest.mark.parametrize("path", [p for p in CONFIGS if "demo" not in p and "example" not in p],
                         ids=os.path.basename)
def test_shipped_config_builds_for_rank_of_eight(path):
    from partialfc.distributed.shards import class_shard
    from partialfc.head import PartialFC
    from partialfc.models import build_backbone
    from partialfc.builders import backbone_kwargs, build_margin

    cfg = load_config(path)
    with torch.device("meta"):  # shapes only: iresnet100 and 2 M-class shards without the memory
        backbone = build_backbone(cfg.model.backbone, **backbone_kwargs(cfg))
        head = PartialFC(build_margin(cfg.head), cfg.model.embedding_size, cfg.data.num_classes,
                         sample_rate=cfg.head.sample_rate, num_subcenters=cfg.head.num_subcenters,
                         impl=cfg.head.impl, shard_of=(7, 8))
    shard = class_shard(cfg.data.num_classes, 8, 7)
    assert head.class_start == shard.class_start and head.num_local == shard.num_local
    assert head.weight.shape == (shard.num_local * cfg.head.num_subcenters, cfg.model.embedding_size)
    assert sum(p.numel() for p in backbone.parameters()) > 60e6  # iresnet100
    assert cfg.data.batch_size == 128 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
    assert cfg.train.epochs == 20 and cfg.optim.warmup_epochs == 2


# Each of these crashed much later (ZeroDivisionError in the step loop or the lr
# scaling) or was silently ignored (a negative checkpoint interval, zero epochs).
@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every = 0 must be >= 1"),
    ("train.accumulate=0", "train.accumulate = 0 must be >= 1"),
    ("optim.lr_reference_batch=0", "optim.lr_reference_batch = 0 must be >= 1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every = -1 must be >= 0"),
    ("train.epochs=0", "train.epochs = 0 must be >= 1"),
    ("train.max_steps=-5", "train.max_steps = -5 must be >= 0"),
    ("data.batch_size=0", "data.batch_size = 0 must be >= 1"),
    ("head.sample_rate=0", "head.sample_rate = 0.0 must be in (0, 1]"),
    ("head.sample_rate=1.5", "head.sample_rate = 1.5 must be in (0, 1]"),
    ("head.lr_scale=0", "head.lr_scale = 0.0 must be > 0"),
    ("optim.lr=-0.1", "optim.lr = -0.1 must be >= 0"),
    ("optim.lr=nan", "optim.lr = nan must be >= 0"),
    ("optim.momentum=1", "optim.momentum = 1.0 must be in [0, 1)"),
    ("metrics.port_base=70000", "metrics.port_base = 70000 must be in [0, 65535]"),
])
def test_out_of_range_values_are_refused_by_name(tmp_path, override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, ""), [override])
    assert str(caught.value).endswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_out_of_range_value_in_the_file_names_the_file(tmp_path):
    path = write(tmp_path, "[train]\nlog_every = 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: train\.log_every = 0 must be >= 1$"):
        load_config(path)


def test_edge_values_inside_the_range_are_accepted(tmp_path):
    cfg = load_config(write(tmp_path, ""), ["train.log_every=1", "train.accumulate=1", "train.checkpoint_every=0",
                                            "train.epochs=1", "head.sample_rate=1", "optim.lr=0",
                                            "optim.momentum=0", "metrics.port_base=65535", "head.chunk_size=1"])
    assert cfg.train.log_every == 1 and cfg.head.sample_rate == 1.0 and cfg.metrics.port_base == 65535
