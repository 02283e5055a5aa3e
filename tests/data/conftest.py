"""Fixtures for the data tests (helpers live in data_helpers.py)."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from data_helpers import jpeg_bytes, smooth_face


@pytest.fixture
def face_tree(tmp_path):
    """Identity folders with 112x112 JPEGs, counts 7,3,5,1,6,2 (24 images) + junk.

    Returns (root, list of (path, label, rgb array)) in sorted identity / file order.
    """
    rng = np.random.default_rng(1234)
    root = tmp_path / "faces"
    counts = [7, 3, 5, 1, 6, 2]
    names = ["id_%02d" % i for i in range(len(counts))]
    samples = []
    for label, (name, count) in enumerate(zip(sorted(names), counts)):
        os.makedirs(root / name)
        for j in range(count):
            array = smooth_face(rng)
            path = root / name / ("img_%03d.jpg" % j)
            path.write_bytes(jpeg_bytes(array))
            samples.append((str(path), label, array))
    (root / names[0] / "notes.txt").write_text("not an image")
    return str(root), samples


@pytest.fixture
def decoded_reference():
    """Decode JPEG bytes with PIL directly and normalize with numpy: the reference."""

    def decode(data, flip=False):
        array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
        if flip:
            array = array[:, ::-1]
        return (array.transpose(2, 0, 1) - 127.5) / 128.0

    return decode


@pytest.fixture(scope="session")
def bomb_png_bytes():
    """A 225-megapixel PNG (~30 KB), built once per session."""
    from data_helpers import bomb_png

    return bomb_png()
