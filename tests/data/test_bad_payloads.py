"""Payloads that are not decodable images: both loaders skip and count the same records
(skip_corrupt) or stop with the same one-line error; decompression bombs are refused
from the header, never decoded."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image, ImageFile

from data_helpers import (TEXT_PAYLOAD, bomb_png, garbage_body_jpeg, ir_payload, jpeg_bytes, smooth_face,
                          truncated_jpeg, write_rec)
from partialfc.data.decode import MAX_IMAGE_PIXELS, CorruptImageError, checked_image, decode_face
from partialfc.data.image_scan import undecodable_images, verdict_path
from partialfc.data.inspect import main as inspect_main
from partialfc.data.recordio import IndexedRecordReader, frame, unpack
from partialfc.data.recordio_source import RecordIOSource, build_recordio_source

BAD_KINDS = ("text", "garbage_body", "soi_then_zeros", "truncated", "bomb")


def bad_payload(kind, rng, bomb):
    return {"text": lambda: TEXT_PAYLOAD, "garbage_body": lambda: garbage_body_jpeg(rng),
            "soi_then_zeros": lambda: b"\xff\xd8" + b"\x00" * 100,
            "truncated": lambda: truncated_jpeg(rng), "bomb": lambda: bomb}[kind]()


def payload_set(directory, bad, count=16, bomb=None):
    """``count`` records, label = key; ``bad`` maps key -> payload kind (``bomb``: its bytes)."""
    rng = np.random.default_rng(3)
    records = []
    for key in range(count):
        kind = bad.get(key)
        data = bad_payload(kind, rng, bomb) if kind else jpeg_bytes(smooth_face(rng))
        records.append((key, frame(ir_payload(key, data))))
    prefix = str(directory / "payloads")
    write_rec(prefix, records)
    return prefix


def skipped_keys(report):
    """Record keys named by a report's messages (all of them while there are <= 5)."""
    return sorted(int(re.search(r"record (\d+)", m).group(1)) for m in report["skipped_examples"])


def dali_source(prefix, batch_size, skip_corrupt):
    return build_recordio_source(prefix, batch_size, 0, 1, 0, 1, "dali", skip_corrupt, None, "cpu",
                                 shuffle=False, flip=False)


@pytest.fixture
def mixed_set(tmp_path, bomb_png_bytes):
    bad = {1: "text", 4: "garbage_body", 6: "soi_then_zeros", 9: "truncated", 14: "bomb"}
    return payload_set(tmp_path, bad, bomb=bomb_png_bytes), sorted(bad)


def test_premise_pillow_refuses_every_bad_kind(bomb_png_bytes):
    rng = np.random.default_rng(3)
    for kind in BAD_KINDS:
        with pytest.raises(CorruptImageError, match="where"):
            decode_face(bad_payload(kind, rng, bomb_png_bytes), "where")


def test_torch_and_dali_skip_and_count_the_same_records(mixed_set, decoded_reference):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    prefix, bad_keys = mixed_set
    good = [k for k in range(16) if k not in bad_keys]
    torch_source = RecordIOSource(prefix, 4, 0, 1, seed=0, num_workers=0, skip_corrupt=True,
                                  shuffle=False, flip=False)
    torch_labels = [y for _, ys in torch_source.epoch(0) for y in ys.tolist()]
    assert len(torch_labels) == 16 and set(torch_labels) <= set(good)
    assert torch_source.report()["skipped_corrupt"] == 5
    assert skipped_keys(torch_source.report()) == bad_keys

    source = dali_source(prefix, 4, skip_corrupt=True)
    try:
        batches = [(x.clone(), y.clone()) for x, y in source.epoch(0)]
        report = source.report()
    finally:
        source.close()
    dali_labels = [y for _, ys in batches for y in ys.tolist()]
    assert dali_labels == good[:8]  # 11 good records: 2 full batches of 4
    assert report["skipped_corrupt"] == 5 and skipped_keys(report) == bad_keys
    assert any("exceeds the 16777216-pixel bound" in m for m in report["skipped_examples"])
    # The records DALI kept are decoded as the torch loader decodes them.
    with IndexedRecordReader(prefix + ".idx", prefix + ".rec") as reader:
        for images, labels in batches:
            for image, label in zip(images, labels.tolist()):
                body = unpack(reader.read_idx(label))[1]
                assert np.abs(image.numpy() - decoded_reference(body)).max() <= 2.0 / 128


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_strict_loaders_stop_with_one_line_naming_the_record(tmp_path, bomb_png_bytes, kind):
    prefix = payload_set(tmp_path, {5: kind}, count=8, bomb=bomb_png_bytes)
    expected = re.escape(prefix + ".rec: record 5")
    # A worker process: the error must come back as the record's line, not a traceback.
    strict = RecordIOSource(prefix, 8, 0, 1, seed=0, num_workers=1, shuffle=False)
    with pytest.raises(ValueError, match=expected) as caught:
        list(strict.epoch(0))
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    if kind == "bomb":
        assert "exceeds the 16777216-pixel bound" in str(caught.value)
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    with pytest.raises(ValueError, match=expected + r".*set data.skip_corrupt=true") as caught:
        dali_source(prefix, 4, skip_corrupt=False)
    assert "\n" not in str(caught.value)


def test_dali_error_that_slips_past_the_check_is_one_line(tmp_path, monkeypatch):
    """The safety net: were the CPU check to accept a payload DALI cannot decode."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    import partialfc.data.dali as dali_module

    prefix = payload_set(tmp_path, {2: "truncated"}, count=8)
    monkeypatch.setattr(dali_module, "undecodable_images", lambda *args, **kwargs: [])
    source = dali_source(prefix, 4, skip_corrupt=True)
    try:
        with pytest.raises(ValueError, match=re.escape(prefix + ".rec: record 2 at byte")) as caught:
            list(source.epoch(0))
    finally:
        source.close()
    assert "\n" not in str(caught.value) and "DALI failed to decode" in str(caught.value)


def test_bomb_is_refused_from_its_header_without_decoding(bomb_png_bytes, monkeypatch):
    # Under Pillow's own error threshold (179 MP) but over ours, and just over ours.
    smaller_bombs = {(10000, 10000): bomb_png(10000, 10000), (4097, 4096): bomb_png(4097, 4096)}

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("a pixel decoder ran")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(CorruptImageError, match=r"rec: record 7: image exceeds the 16777216"):
        decode_face(bomb_png_bytes, "rec: record 7")
    for (width, height), data in smaller_bombs.items():
        with pytest.raises(CorruptImageError, match=rf"record 7: image of {width}x{height} "
                                                    rf"pixels exceeds"):
            decode_face(data, "rec: record 7")
    # At the bound the header passes (checked_image hands over the unloaded image).
    at_bound = bomb_png(4096, 4096)
    assert checked_image(at_bound, "rec", lambda image: image.size) == (4096, 4096)
    assert 4096 * 4096 == MAX_IMAGE_PIXELS


def test_verdict_is_cached_and_invalidated(mixed_set, monkeypatch):
    import partialfc.data.image_scan as scan_module

    prefix, bad_keys = mixed_set
    keys, offsets = np.arange(16), np.array([int(line.split()[1]) for line in open(prefix + ".idx")])
    problems = undecodable_images(prefix + ".rec", prefix + ".idx", keys, offsets, workers=1)
    assert [key for key, _ in problems] == bad_keys
    saved = json.load(open(verdict_path(prefix + ".idx")))
    assert saved["checked"] == 16 and len(saved["problems"]) == 5

    def must_not_scan(*args, **kwargs):
        raise AssertionError("scanned again")

    monkeypatch.setattr(scan_module, "scan_images", must_not_scan)
    assert undecodable_images(prefix + ".rec", prefix + ".idx", keys, offsets) == problems
    os.utime(prefix + ".rec", ns=(1, 1))  # the .rec changed: the verdict is stale
    with pytest.raises(AssertionError, match="scanned again"):
        undecodable_images(prefix + ".rec", prefix + ".idx", keys, offsets)
    monkeypatch.undo()
    # A pool of workers finds the same records as the inline check.
    monkeypatch.setattr(scan_module, "_SERIAL_BELOW", 0)
    monkeypatch.setattr(scan_module, "_CHUNK", 3)
    assert scan_module.scan_images(prefix + ".rec", keys, offsets, workers=2) == problems


def test_inspect_decode_counts_bad_payloads(mixed_set, capsys):
    prefix, bad_keys = mixed_set
    assert inspect_main([prefix, "--json"]) == 0  # framing and labels are fine
    capsys.readouterr()
    assert inspect_main([prefix, "--decode", "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["corrupt"] == bad_keys
    assert "exceeds the 16777216-pixel bound" in summary["corrupt_reasons"][-1]


def _scan_on_rank(rank, world_size, prefix, offsets):
    """Each rank scans half; all get the whole verdict. Then all read it from the cache."""
    import torch.distributed as dist

    import partialfc.data.image_scan as scan_module

    keys = np.arange(len(offsets))
    first = undecodable_images(prefix + ".rec", prefix + ".idx", keys, offsets, workers=1)
    dist.barrier()  # the verdict file is written (by local rank 0) before anyone looks again

    def must_not_scan(*args, **kwargs):
        raise AssertionError("scanned again")

    scan_module.scan_images = must_not_scan
    return first, undecodable_images(prefix + ".rec", prefix + ".idx", keys, offsets)


def test_ranks_share_the_scan(mixed_set):
    from spawn import run_ranks

    prefix, bad_keys = mixed_set
    offsets = np.array([int(line.split()[1]) for line in open(prefix + ".idx")])
    results = run_ranks(_scan_on_rank, 2, prefix, offsets, timeout=180)
    for first, second in results:
        assert [key for key, _ in first] == bad_keys and second == first
