"""configs/recordio_example.toml (the README's RecordIO example) loads and reads what pack writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from partialfc.config import load_config
from partialfc.data import build_source
from partialfc.data.pack import pack_dataset

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "recordio_example.toml"


def test_example_config_is_a_recordio_run_with_its_own_name():
    config = load_config(EXAMPLE)
    assert config.data.format == "recordio" and config.data.path == "data/faces"
    assert config.data.num_classes == 0  # read from the property file pack writes
    assert config.name != load_config(EXAMPLE.parent / "demo.toml").name
    assert config.train.output != "runs/demo"


def test_example_config_trains_from_a_packed_folder(tmp_path):
    rng = np.random.default_rng(0)
    for identity in ("ann", "bob", "cid"):
        folder = tmp_path / "faces" / identity
        folder.mkdir(parents=True)
        for index in range(4):
            pixels = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=95)
    prefix = tmp_path / "data" / "faces"  # the example's layout: pack creates data/
    pack_dataset(str(tmp_path / "faces"), str(prefix), progress=False)

    config = load_config(EXAMPLE, [f"data.path={prefix}", "data.batch_size=4", "data.num_workers=0"])
    source = build_source(config.data, rank=0, world_size=1, seed=0)
    try:
        assert source.num_classes == 3 and len(source) == 3
        images, labels = next(iter(source.epoch(0)))
        assert tuple(images.shape) == (4, 3, 112, 112) and set(labels.tolist()) <= {0, 1, 2}
    finally:
        source.close()
