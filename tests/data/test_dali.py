"""DALI CPU pipeline over RecordIO: agrees with the native reader, shards, bad data."""
import struct

import numpy as np
import pytest
import torch

from data_helpers import MAGIC_WORD, ir_payload, jpeg_bytes, simple_frame, smooth_face, write_rec
from partialfc.data.pack import pack_dataset
from partialfc.data.recordio import frame
from partialfc.data.recordio_source import build_recordio_source

pytest.importorskip("nvidia.dali")

# JPEG decoders (PIL's libjpeg vs DALI's) may round the IDCT differently: 2 levels.
DECODER_ATOL = 2.0 / 128


def collect(source, epoch=0, start=0):
    return [(x.clone(), y.clone()) for x, y in source.epoch(epoch, start)]


def build(prefix, loader, batch_size, rank=0, world_size=1, **kwargs):
    return build_recordio_source(prefix, batch_size, rank, world_size, 17, 1, loader,
                                 kwargs.pop("skip_corrupt", False), None, "cpu", **kwargs)


def test_dali_and_native_reader_agree(face_tree, tmp_path):
    root, samples = face_tree
    prefix = str(tmp_path / "train")
    pack_dataset(root, prefix, workers=1, progress=False)
    torch_source = build(prefix, "torch", 6, shuffle=False, flip=False)
    dali_source = build(prefix, "dali", 6, shuffle=False, flip=False)
    assert len(torch_source) == len(dali_source) == 4
    pairs = list(zip(collect(torch_source), collect(dali_source)))
    assert len(pairs) == 4
    for (x_torch, y_torch), (x_dali, y_dali) in pairs:
        assert y_dali.dtype == torch.int64 and x_dali.dtype == torch.float32
        assert x_dali.shape == (6, 3, 112, 112)
        assert torch.equal(y_torch, y_dali)
        assert (x_torch - x_dali).abs().max() <= DECODER_ATOL
    labels = torch.cat([y for _, (_, y) in pairs]).tolist()
    assert labels == [label for _, label, _ in samples]
    dali_source.close()


def unique_label_set(tmp_path, count, header=False, multi_part_key=None):
    """One image per identity (label = key order), optionally face2rec2 header + ids."""
    rng = np.random.default_rng(5)
    prefix = str(tmp_path / "uniq")
    first = 1 if header else 0
    records, encoded = [], []
    if header:
        records.append((0, simple_frame(ir_payload(0, b"", flag_labels=[count + 1, 2 * count + 1]))))
    for label in range(count):
        data = jpeg_bytes(smooth_face(rng))
        if label == multi_part_key:
            # A JPEG comment whose text holds the magic word at a 4-aligned payload offset
            # (payload = 24-byte IRHeader + 8 floats here, then FFD8 FFFE len): a 3-part record.
            comment = b"\x00\x00" + struct.pack("<I", MAGIC_WORD) * 2 + b"x"
            data = data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]
        encoded.append(data)
        payload = ir_payload(0, data, flag_labels=[label, 100 + label]) if header or label == multi_part_key \
            else ir_payload(label, data)
        framed = frame(payload)
        if label == multi_part_key:
            assert (struct.unpack_from("<I", framed, 4)[0] >> 29) == 1
        records.append((first + label, framed))
    if header:
        records += [(count + 1 + c, simple_frame(ir_payload(0, b"", flag_labels=[1 + c, 2 + c])))
                    for c in range(count)]
    write_rec(prefix, records)
    return prefix, encoded


def test_two_rank_shards_are_disjoint_and_cover(tmp_path):
    prefix, _ = unique_label_set(tmp_path, 30, header=True, multi_part_key=7)
    seen = []
    for rank in range(2):
        source = build(prefix, "dali", 5, rank=rank, world_size=2, initial_fill=8)
        assert len(source) == 3 and source.num_classes == 30  # from the header range
        labels = torch.cat([y for _, y in collect(source, epoch=1)]).tolist()
        assert len(labels) == len(set(labels)) == 15
        seen.append(set(labels))
        source.close()
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(30))


def test_header_multi_part_and_flip_pixels(tmp_path, decoded_reference):
    prefix, encoded = unique_label_set(tmp_path, 12, header=True, multi_part_key=3)
    source = build(prefix, "dali", 4, initial_fill=4)
    flipped = 0
    for images, labels in collect(source):
        for image, label in zip(images, labels.tolist()):
            error_plain = np.abs(image.numpy() - decoded_reference(encoded[label])).max()
            error_flip = np.abs(image.numpy() - decoded_reference(encoded[label], True)).max()
            assert min(error_plain, error_flip) <= DECODER_ATOL
            flipped += error_flip < error_plain
    assert 0 < flipped < 12
    source.close()


def test_resume_replays_same_batches(tmp_path):
    prefix, _ = unique_label_set(tmp_path, 20)
    source = build(prefix, "dali", 4, initial_fill=6)
    full = collect(source, epoch=2)
    resumed = collect(source, epoch=2, start=3)
    assert len(resumed) == 2
    for (x1, y1), (x2, y2) in zip(full[3:], resumed):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(full, collect(source, epoch=3)))
    source.close()


def test_corrupt_framing_and_bad_labels(tmp_path):
    prefix, _ = unique_label_set(tmp_path, 10)
    offsets = [int(line.split()[1]) for line in open(prefix + ".idx")]
    with open(prefix + ".rec", "r+b") as handle:
        handle.seek(offsets[6])
        handle.write(b"BAD!")
    with pytest.raises(ValueError, match=r"uniq\.rec: record 6 at byte \d+: bad framing"):
        build(prefix, "dali", 3)
    source = build(prefix, "dali", 3, skip_corrupt=True, shuffle=False)
    labels = torch.cat([y for _, y in collect(source)]).tolist()
    assert labels == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert source.report()["skipped_corrupt"] == 1
    source.close()
    # Labels 8 and 9 against property's 8 classes: skipped (replaced) or an error.
    with open(tmp_path / "property", "w") as handle:
        handle.write("8,112,112\n")
    source = build(prefix, "dali", 3, skip_corrupt=True, shuffle=False)
    labels = torch.cat([y for _, y in collect(source)]).tolist()
    assert max(labels) < 8 and labels[:6] == [0, 1, 2, 3, 4, 5]
    assert source.report()["skipped_corrupt"] == 3
    source.close()
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    clean, _ = unique_label_set(clean_dir, 10)
    (clean_dir / "property").write_text("8,112,112\n")
    strict = build(clean, "dali", 5, shuffle=False)
    with pytest.raises(ValueError, match=r"uniq\.rec at index \d+: label 8 is outside "
                                         r"\[0, num_classes=8\)"):
        collect(strict)
    strict.close()
