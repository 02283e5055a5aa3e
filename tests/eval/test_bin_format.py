"""The .bin reader/writer, and refusal of pickles that try to build anything but the format."""
from __future__ import annotations

import builtins
import io
import os
import pickle
import random
import zlib

import numpy as np
import pytest
from PIL import Image

from eval_helpers import encode_jpeg, encode_png, random_images
from partialfc.eval.bin_format import (
    MAX_IMAGE_PIXELS,
    UnsafePickleError,
    decode_images,
    parse_bin,
    read_bin,
    write_bin,
)


def test_round_trip_and_decode(tmp_path):
    rng = np.random.default_rng(0)
    images = random_images(rng, 6, 112, 112)
    bins = [encode_png(image) for image in images]
    issame = [True, False, True]
    path = tmp_path / "set.bin"
    write_bin(path, bins, issame)
    read_bins, read_issame = read_bin(path)
    assert read_bins == bins
    assert read_issame.dtype == np.bool_ and read_issame.tolist() == issame
    decoded = decode_images(read_bins)
    np.testing.assert_array_equal(decoded, images.transpose(0, 3, 1, 2))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]


def test_decode_resizes_jpeg_to_requested_size():
    rng = np.random.default_rng(1)
    image = np.full((120, 100, 3), 200, dtype=np.uint8)
    image[:, :, 0] = rng.integers(190, 210, size=(120, 100))
    decoded = decode_images([encode_jpeg(image)], (112, 112))
    assert decoded.shape == (1, 3, 112, 112)
    assert abs(decoded[0, 1].astype(float).mean() - 200) < 3


def test_python2_style_pickle_loads(tmp_path):
    # What Python 2 wrote for (["ab", "c"], [True]) at protocol 2: SHORT_BINSTRING, NEWTRUE.
    data = b"\x80\x02]q\x00(U\x02abq\x01U\x01cq\x02e]q\x03\x88a\x86q\x04."
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    bins, issame = read_bin(path)
    assert bins == [b"ab", b"c"] and issame.tolist() == [True]


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_python3_pickle_protocols_load(tmp_path, protocol):
    path = tmp_path / "p.bin"
    payload = ([b"\x00\xffxy", b"\x80q"], [False])
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    bins, issame = read_bin(path)
    assert bins == payload[0] and issame.tolist() == [False]


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): a side effect a test can observe."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"a", _WritesMarker(str(marker))], [True]), protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"evil\.bin: refusing to load pickle global \w+\.open"):
        read_bin(path)
    assert not marker.exists()
    # The same file really does run code under a plain pickle.load: the test is not vacuous.
    with open(path, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


def test_numpy_objects_are_refused(tmp_path):
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps(([np.zeros(3, np.uint8), b"x"], [True])))
    with pytest.raises(UnsafePickleError, match="numpy"):
        read_bin(path)


def test_codecs_stand_in_rejects_other_encodings(tmp_path):
    # _codecs.encode("abc", "rot13") by hand at protocol 2.
    data = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    path = tmp_path / "codec.bin"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"codec\.bin.*rot13"):
        read_bin(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        (([b"a", "b"], [True]), r"bins\[1\] is str"),
        (([b"a", b"b"], [1]), r"issame\[0\] is 1"),
        (({"bins": 1},), "expected a pickled"),
        (([], []), "no pairs"),
    ],
)
def test_malformed_content_names_the_field(tmp_path, payload, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(payload[0] if len(payload) == 1 else payload))
    with pytest.raises(ValueError, match=message):
        read_bin(path)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True]))[:-5])
    with pytest.raises(ValueError, match=r"cut\.bin: not a readable"):
        read_bin(path)


def test_undecodable_image_names_its_index():
    with pytest.raises(ValueError, match="set.bin: image 1: cannot decode"):
        decode_images([encode_png(np.zeros((4, 4, 3), np.uint8)), b"not an image"], (4, 4), "set.bin")


def test_damaged_pickles_are_value_errors_only():
    # Random byte edits of valid files at every protocol: whatever the C unpickler trips on
    # (a list called as a function, a 2**60-byte length, a buffer opcode at protocol 2),
    # the reader reports a ValueError naming the file.
    rng = random.Random(0)
    valid = [pickle.dumps(([b"ab" * 5, b"cd" * 5, b"ef", b"gh"], [True, False]), protocol=p) for p in range(6)]
    kinds = set()
    for _ in range(1500):
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(data))
            if rng.random() < 0.5:
                data[position] = rng.randrange(256)
            else:
                del data[position:position + rng.randint(1, 5)]
        try:
            parse_bin(bytes(data), "damaged.bin")
        except ValueError as error:
            assert str(error).startswith("damaged.bin: "), error
            kinds.add(str(error).split(":")[1].strip()[:30])
    assert len(kinds) > 3  # the edits really hit different failure paths


def test_buffer_opcodes_are_refused_before_unpickling(tmp_path):
    path = tmp_path / "buffer.bin"
    # BYTEARRAY8 spliced into a protocol-2 stream.
    path.write_bytes(b"\x80\x02]q\x00(\x96\x02\x00\x00\x00\x00\x00\x00\x00abe]q\x01\x88a\x86q\x02.")
    with pytest.raises(UnsafePickleError, match=r"buffer\.bin: refusing pickle opcode BYTEARRAY8 at byte 6"):
        read_bin(path)


def test_decompression_bombs_are_refused_before_decoding():
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 64
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")  # valid, a few KB, 17M pixels
    bound = rf"set.bin: image 1: image of {side}x{side} pixels exceeds the {MAX_IMAGE_PIXELS}-pixel bound"
    with pytest.raises(ValueError, match=bound):
        decode_images([encode_png(np.zeros((4, 4, 3), np.uint8)), buffer.getvalue()], (4, 4), "set.bin")
    # Past PIL's own limit, Image.open raises DecompressionBombError (not an OSError).
    Image.new("1", (1, 1)).save(buffer := io.BytesIO(), format="PNG")
    header = bytearray(buffer.getvalue())
    header[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width, height
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    with pytest.raises(ValueError, match=f"set.bin: image 0: image exceeds the {MAX_IMAGE_PIXELS}-pixel bound"):
        decode_images([bytes(header)], (4, 4), "set.bin")
