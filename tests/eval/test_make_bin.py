"""make_bin: LFW pairs.txt + image folder -> .bin that reads back as the right pairs."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from eval_helpers import encode_jpeg, encode_png, random_images
from partialfc.eval import make_bin
from partialfc.eval.bin_format import decode_images, read_bin


@pytest.fixture
def lfw_like(tmp_path):
    """Three identities; alice has 2 JPEGs, bob 1 PNG (stored as .jpg, LFW naming), carol 1 BMP."""
    rng = np.random.default_rng(0)
    images = {}
    layout = [("alice", 1, "jpeg"), ("alice", 2, "jpeg"), ("bob", 1, "png"), ("carol", 1, "bmp")]
    for name, number, kind in layout:
        folder = tmp_path / "faces" / name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = random_images(rng, 1, 112, 112)[0]
        if kind == "bmp":  # smooth, so the JPEG re-encoding can be checked against it
            ramp = np.linspace(0, 255, 112).astype(np.uint8)
            pixels = np.stack([np.tile(ramp, (112, 1)), np.tile(ramp[:, None], (1, 112)),
                               np.full((112, 112), 90, np.uint8)], axis=2)
        if kind == "jpeg":
            data = encode_jpeg(pixels)
        elif kind == "png":
            data = encode_png(pixels)
        else:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="BMP")
            data = buffer.getvalue()
        (folder / f"{name}_{number:04d}.jpg").write_bytes(data)
        images[(name, number)] = (pixels, data)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t2\nalice\t1\t2\nbob\t1\tcarol\t1\n\nalice 2 bob 1\n")
    return tmp_path, images


def test_build_bin_round_trip(lfw_like, capsys):
    root, images = lfw_like
    out = root / "mine.bin"
    assert make_bin.main([str(root / "faces"), str(root / "pairs.txt"), str(out)]) == 0
    assert "2 different" in capsys.readouterr().out
    bins, issame = read_bin(out)
    assert issame.tolist() == [True, False, False]
    order = [("alice", 1), ("alice", 2), ("bob", 1), ("carol", 1), ("alice", 2), ("bob", 1)]
    # JPEG and PNG bytes are kept as they are; the BMP is re-encoded as JPEG.
    for data, key in zip(bins, order):
        if key[0] != "carol":
            assert data == images[key][1]
        else:
            assert data[:2] == b"\xff\xd8"
    decoded = decode_images(bins)
    np.testing.assert_array_equal(decoded[2], images[("bob", 1)][0].transpose(2, 0, 1))
    carol_error = np.abs(decoded[3].astype(int) - images[("carol", 1)][0].transpose(2, 0, 1)).mean()
    assert carol_error < 3  # lossy, but the same picture


def test_parse_errors_name_file_and_line(tmp_path):
    pairs = tmp_path / "p.txt"
    pairs.write_text("alice 1 2\nalice one 2\n")
    with pytest.raises(ValueError, match=r"p\.txt:2: image number must be an int, got 'one'"):
        make_bin.parse_pairs(str(pairs))
    pairs.write_text("alice 1\n")
    with pytest.raises(ValueError, match=r"p\.txt:1: expected"):
        make_bin.parse_pairs(str(pairs))


def test_missing_image_is_named(lfw_like):
    root, _ = lfw_like
    (root / "pairs.txt").write_text("alice 1 7\n")
    with pytest.raises(ValueError, match=r"missing: .*alice_0007\.jpg"):
        make_bin.build_bin(str(root / "faces"), str(root / "pairs.txt"), str(root / "x.bin"))
