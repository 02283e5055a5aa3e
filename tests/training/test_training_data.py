"""Training on real files: an image folder packed to RecordIO, read by DALI (CPU) and by
the torch loader, on 2 gloo ranks through the real entrypoint."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from test_training import ROOT, losses, train

NUM_CLASSES, PER_CLASS = 6, 12


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from partialfc.data.synthetic import synthetic_image

    root = tmp_path_factory.mktemp("faces")
    folder = root / "images"
    for label in range(NUM_CLASSES):
        person = folder / f"id_{label:03d}"
        person.mkdir(parents=True)
        for i in range(PER_CLASS):
            image = synthetic_image(3, label, label * 1000 + i, 0.4)
            pixels = (image.permute(1, 2, 0).numpy() * 128 + 127.5).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(person / f"{i}.jpg", quality=92)
    prefix = root / "train"
    subprocess.run([sys.executable, "-m", "partialfc.data.pack", str(folder), str(prefix), "--workers", "1",
                    "--quiet"], check=True, cwd=ROOT, capture_output=True, timeout=300)
    return folder, prefix


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_two_rank_training_on_packed_recordio(tmp_path, packed, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (extra 'dali')")
    _, prefix = packed
    output = tmp_path / loader
    train(output, "data.format=recordio", f"data.path={prefix}", f"data.loader={loader}",
          f"data.num_classes={NUM_CLASSES}", "data.num_workers=1", "data.batch_size=8", "train.max_steps=8",
          "train.epochs=3")
    recorded = losses(output)
    assert [s for s, _ in recorded] == list(range(1, 9))
    assert all(np.isfinite(loss) for _, loss in recorded)
    assert min(loss for _, loss in recorded[-3:]) < recorded[0][1]


def test_training_on_image_folder(tmp_path, packed):
    folder, _ = packed
    output = tmp_path / "folder"
    train(output, "data.format=image_folder", f"data.path={folder}", "data.num_classes=0", "data.num_workers=1",
          "train.max_steps=4", "train.epochs=2")
    assert [s for s, _ in losses(output)] == [1, 2, 3, 4]


def test_label_beyond_num_classes_is_refused(tmp_path, packed):
    _, prefix = packed
    result = train(tmp_path / "bad", "data.format=recordio", f"data.path={prefix}", "data.loader=torch",
                   "data.num_classes=4", "train.max_steps=2", check=False)
    assert result.returncode != 0
    assert "error" in result.stderr and ("4" in result.stderr)
