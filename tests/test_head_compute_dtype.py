"""head.compute_dtype: "auto" follows train.amp on CUDA and stays fp32 on CPU (issue 15)."""
from __future__ import annotations

import pytest
import torch

from partialfc.config import ConfigError, load_config
from partialfc.builders import build_head, head_compute_dtype


@pytest.mark.parametrize("setting, amp, device, expected", [
    ("auto", "bf16", "cuda", torch.bfloat16),
    ("auto", "fp16", "cuda", torch.float32),  # the head's gradient is not loss-scaled: no fp16 by default
    ("auto", "none", "cuda", torch.float32),
    ("auto", "bf16", "cpu", torch.float32),
    ("fp32", "bf16", "cuda", torch.float32),  # an explicit setting always wins
    ("bf16", "none", "cpu", torch.bfloat16),
    ("fp16", "bf16", "cuda", torch.float16),
])
def test_resolution(setting, amp, device, expected):
    assert head_compute_dtype(setting, amp, device) == expected


def test_config_default_is_auto_and_build_head_resolves_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nembedding_size = 16\n[train]\namp = "bf16"\n')
    cfg = load_config(path)
    assert cfg.head.compute_dtype == "auto"
    assert build_head(cfg, 10, device_type="cuda").compute_dtype == torch.bfloat16
    assert build_head(cfg, 10).compute_dtype == torch.float32  # CPU
    with pytest.raises(ConfigError, match="compute_dtype"):
        load_config(path, ["head.compute_dtype=fp8"])
