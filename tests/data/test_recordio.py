"""Native RecordIO: byte layout, multi-part records, corrupt records."""
import struct

import numpy as np
import pytest

from data_helpers import MAGIC_WORD, ir_payload, simple_frame, write_rec
from partialfc.data import recordio
from partialfc.data.recordio import (CorruptRecordError, IndexedRecordReader,
                                     IndexedRecordWriter, IRHeader, frame, pack, unpack)
from partialfc.data.recordio_source import RecordDataset, image_key_layout

MAGIC = struct.pack("<I", MAGIC_WORD)


def random_payload(rng, size):
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return data.replace(MAGIC, b"\x00\x00\x00\x00")


def test_independent_file_is_read(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "ind")
    sizes = [1, 2, 3, 4, 5, 97, 1000, 4093]
    expected = {}
    records = []
    for key, size in zip([5, 2, 9, 0, 11, 3, 7, 8], sizes):  # keys out of order, with gaps
        image = random_payload(rng, size)
        label = float(rng.integers(0, 1000))
        payload = ir_payload(label, image, record_id=key)
        expected[key] = (label, image)
        records.append((key, simple_frame(payload)))
    write_rec(prefix, records)
    with IndexedRecordReader(prefix + ".idx", prefix + ".rec", use_cache=False) as reader:
        assert sorted(int(k) for k in reader.keys) == sorted(expected)
        for key, (label, image) in expected.items():
            header, body = unpack(reader.read_idx(key))
            assert header.flag == 0 and header.label == label and header.id == key
            assert body == image
        with pytest.raises(KeyError, match="no record with key 4"):
            reader.read_idx(4)


def test_writer_bytes_match_independent_layout(tmp_path):
    rng = np.random.default_rng(1)
    prefix = str(tmp_path / "ours")
    payloads = [ir_payload(i, random_payload(rng, n)) for i, n in enumerate([0, 1, 6, 33, 800])]
    with IndexedRecordWriter(prefix + ".idx", prefix + ".rec") as writer:
        for key, payload in enumerate(payloads):
            writer.write_idx(key, payload)
    expected = b"".join(simple_frame(p) for p in payloads)
    assert open(prefix + ".rec", "rb").read() == expected
    offsets = np.cumsum([0] + [len(simple_frame(p)) for p in payloads[:-1]])
    assert open(prefix + ".idx").read() == "".join("%d\t%d\n" % kv for kv in enumerate(offsets))


def test_multi_part_records_split_only_at_aligned_magic(tmp_path):
    # Magic at aligned 0, 8, 16 (back to back) and at the very end; one unaligned copy.
    body = MAGIC + b"abcd" + MAGIC + b"xx" + b"yy" + MAGIC + b"z" + MAGIC + b"qrs" + b"wxyz" + MAGIC
    assert body.find(MAGIC, 17) == 21  # the unaligned one, kept as data
    framed = frame(body)
    parts = [b"", b"abcd", b"xxyy", body[20:32], b""]
    flags = [1, 2, 2, 2, 3]
    expected = b""
    for flag, chunk in zip(flags, parts):
        expected += struct.pack("<II", MAGIC_WORD, (flag << 29) | len(chunk)) + chunk
    expected += b"\x00" * (-len(body) % 4)
    assert framed == expected
    payload, end = recordio.read_framed(framed, 0, "mem")
    assert payload == body and end == len(framed)
    # Through files and a second record after it, with an odd-length tail.
    prefix = str(tmp_path / "multi")
    tail = MAGIC + b"12345"
    write_rec(prefix, [(0, frame(body)), (1, frame(tail)), (2, simple_frame(b"plain"))])
    with IndexedRecordReader(prefix + ".idx", prefix + ".rec") as reader:
        assert [reader.read_idx(k) for k in range(3)] == [body, tail, b"plain"]


def test_pack_unpack_multi_float_labels():
    raw = pack(IRHeader(0, [3.0, 7.5, -1.0], 42, 9), b"JPEG")
    assert len(raw) == 24 + 12 + 4
    assert struct.unpack("<IfQQ", raw[:24]) == (3, 0.0, 42, 9)
    header, body = unpack(raw)
    assert header.flag == 3 and list(header.label) == [3.0, 7.5, -1.0] and body == b"JPEG"
    assert recordio.label_of(header) == 3.0
    header, body = unpack(pack(IRHeader(5, 12.0, 1, 2), b"x"))
    assert header.flag == 0 and header.label == 12.0 and body == b"x"
    with pytest.raises(ValueError, match="shorter"):
        unpack(b"short")


@pytest.mark.parametrize("damage, message", [
    ("magic", "bad magic"), ("truncate", "truncated"), ("length", "past the end")])
def test_corrupt_records_name_file_and_key(tmp_path, damage, message):
    prefix = str(tmp_path / "bad")
    frames = [simple_frame(ir_payload(i, b"img%d" % i)) for i in range(3)]
    write_rec(prefix, [(k, f) for k, f in enumerate(frames)])
    data = bytearray(open(prefix + ".rec", "rb").read())
    second = len(frames[0])
    if damage == "magic":
        data[second:second + 4] = b"\x00\x01\x02\x03"
    elif damage == "length":
        data[second + 4:second + 8] = struct.pack("<I", 10 ** 6)
    else:
        data = data[: second + 4] if damage == "truncate" else data
        open(prefix + ".rec", "wb").write(bytes(data))
        with IndexedRecordReader(prefix + ".idx", prefix + ".rec") as reader:
            with pytest.raises(CorruptRecordError, match=r"bad\.rec: record 1: .*" + message):
                reader.read_idx(1)
        return
    open(prefix + ".rec", "wb").write(bytes(data))
    with IndexedRecordReader(prefix + ".idx", prefix + ".rec") as reader:
        assert unpack(reader.read_idx(0))[1] == b"img0"
        with pytest.raises(CorruptRecordError, match=r"bad\.rec: record 1: .*" + message):
            reader.read_idx(1)


def test_insightface_header_layout(tmp_path):
    # face2rec2: key 0 header (A, B); images 1..A-1; identity records A..B-1.
    prefix = str(tmp_path / "ins")
    image_labels = [0, 0, 1, 1, 1, 2]
    first_identity = len(image_labels) + 1
    end = first_identity + 3
    records = [(0, simple_frame(ir_payload(0, b"", flag_labels=[first_identity, end])))]
    records += [(i + 1, simple_frame(ir_payload(lab, b"jpg%d" % i))) for i, lab in enumerate(image_labels)]
    ranges = [(1, 3), (3, 6), (6, 7)]
    records += [(first_identity + c, simple_frame(ir_payload(0, b"", flag_labels=r)))
                for c, r in enumerate(ranges)]
    write_rec(prefix, records)
    with IndexedRecordReader(prefix + ".idx", prefix + ".rec") as reader:
        keys, header_range = image_key_layout(reader)
        assert keys.tolist() == list(range(1, first_identity)) and header_range == (7, 10)
    dataset = RecordDataset(prefix)
    assert dataset.num_images == 6 and dataset.num_classes == 3
    assert [dataset.fetch(i)[1] for i in range(6)] == image_labels
    dataset.close()
