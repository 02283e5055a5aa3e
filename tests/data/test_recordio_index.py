"""The ``.idx`` parser and its memory-mapped ``.npy`` cache."""
import os

import numpy as np
import pytest

from partialfc.data import recordio_index
from partialfc.data.recordio_index import load_index, parse_idx_bytes


def test_idx_parse_matches_python_parse(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    keys = rng.permutation(10 ** 6)[:3001].astype(np.int64)
    offsets = rng.integers(0, 2 ** 40, keys.size)
    lines = ["%d\t%d" % kv for kv in zip(keys, offsets)]
    lines[5] += "  "  # trailing spaces
    text = "\r\n".join(lines) + "\r\n\n"
    parsed_keys, parsed_offsets = parse_idx_bytes(text.encode(), "x.idx")
    reference = [tuple(int(v) for v in line.split()) for line in text.split("\n") if line.strip()]
    assert parsed_keys.tolist() == [k for k, _ in reference]
    assert parsed_offsets.tolist() == [o for _, o in reference]
    # Small chunks: results and line numbers must not depend on where chunks are cut.
    monkeypatch.setattr(recordio_index, "_PARSE_CHUNK", 37)
    chunked_keys, chunked_offsets = parse_idx_bytes(text.encode(), "x.idx")
    assert chunked_keys.tolist() == parsed_keys.tolist()
    assert chunked_offsets.tolist() == parsed_offsets.tolist()
    with pytest.raises(ValueError, match=r"x.idx: line 7: not an integer"):
        parse_idx_bytes(("1\t2\n" * 6 + "3\tz9\n").encode(), "x.idx")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"x.idx: line 2: not an integer"):
        parse_idx_bytes(b"1\t2\n3\tz9\n", "x.idx")
    with pytest.raises(ValueError, match=r"x.idx: line [12]: "):
        parse_idx_bytes(b"1\t2\t3\n4\n", "x.idx")  # right total count, wrong per line
    with pytest.raises(ValueError, match=r"x.idx: line 1: expected"):
        parse_idx_bytes(b"12\n", "x.idx")


def test_index_cache_is_used_and_invalidated(tmp_path):
    path = str(tmp_path / "a.idx")
    with open(path, "w") as handle:
        handle.write("0\t0\n1\t40\n")
    keys, offsets = load_index(path)
    assert os.path.exists(path + ".npy") and offsets.tolist() == [0, 40]
    keys, offsets = load_index(path)
    assert isinstance(offsets, np.memmap) or isinstance(offsets.base, np.memmap)
    with open(path, "w") as handle:
        handle.write("0\t0\n1\t48\n2\t96\n")
    os.utime(path, ns=(1, 1))
    keys, offsets = load_index(path)
    assert keys.tolist() == [0, 1, 2] and offsets.tolist() == [0, 48, 96]
    with pytest.raises(FileNotFoundError, match="missing.idx: index file is missing"):
        load_index(str(tmp_path / "missing.idx"))


def test_reindex_rebuilds_a_lost_index(tmp_path, capsys):
    """Offsets from the independent writer; one record is multi-part (aligned magic word)."""
    import struct

    from data_helpers import MAGIC_WORD, simple_frame, write_rec
    from partialfc.data.recordio import frame
    from partialfc.data.reindex import main as reindex_main

    rng = np.random.default_rng(8)
    payloads = [rng.integers(0, 255, size, dtype=np.uint8).tobytes() for size in (5, 40, 4, 333)]
    payloads[2] = b"abcd" + struct.pack("<I", MAGIC_WORD) + b"tail"  # three parts
    framed = [frame(p) for p in payloads]
    assert framed[0] == simple_frame(payloads[0]) and (struct.unpack_from("<I", framed[2], 4)[0] >> 29) == 1
    prefix = str(tmp_path / "set")
    write_rec(prefix, list(enumerate(framed)))
    expected = open(prefix + ".idx").read()
    assert reindex_main([prefix]) == 2  # an existing index is kept
    assert "set.idx already exists; pass --force" in capsys.readouterr().err
    os.remove(prefix + ".idx")
    assert reindex_main([prefix + ".rec"]) == 0
    assert open(prefix + ".idx").read() == expected
    assert "4 records" in capsys.readouterr().out
    # Cut inside the last record: an error naming it, and no index left behind.
    with open(prefix + ".rec", "r+b") as handle:
        handle.truncate(os.path.getsize(prefix + ".rec") - 100)
    assert reindex_main([prefix, "--force"]) == 2
    err = capsys.readouterr().err
    assert "set.rec: record 3: length 333 at byte" in err and "\n" not in err.strip()
    assert open(prefix + ".idx").read() == expected  # the old index is untouched
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]
