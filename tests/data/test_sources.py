"""Torch-loader sources (RecordIO and image folder): order, shards, resume, pixels, bad data."""
import os
import re
import struct

import numpy as np
import pytest
import torch

from data_helpers import ir_payload, jpeg_bytes, simple_frame, smooth_face, write_rec
from partialfc.data.image_folder import ImageFolderSource
from partialfc.data.pack import pack_dataset
from partialfc.data.recordio import DataFileError, MissingDataFileError
from partialfc.data.recordio_source import RecordIOSource, build_recordio_source


@pytest.fixture
def packed(face_tree, tmp_path):
    root, samples = face_tree
    prefix = str(tmp_path / "train")
    pack_dataset(root, prefix, workers=1, progress=False)
    return prefix, samples


def collect(source, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in source.epoch(epoch, start)]


def test_batches_match_independent_decode(packed, decoded_reference):
    prefix, samples = packed
    source = RecordIOSource(prefix, 5, rank=1, world_size=2, seed=7, num_workers=0)
    assert len(source) == (24 // 2) // 5 and source.num_classes == 6
    plan, flips = source.plan(3)
    batches = collect(source, 3)
    assert len(batches) == len(source)
    for (images, labels), ids, flip_row in zip(batches, plan, flips):
        assert images.dtype == torch.float32 and images.shape == (5, 3, 112, 112)
        assert labels.dtype == torch.int64
        assert labels.tolist() == [samples[i][1] for i in ids]
        for image, i, flip in zip(images, ids, flip_row):
            expected = decoded_reference(open(samples[i][0], "rb").read(), flip)
            np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)
    assert flips.any() and not flips.all()


def test_order_is_a_function_of_seed_epoch_rank(packed):
    prefix, _ = packed
    ranks = [RecordIOSource(prefix, 4, rank=r, world_size=3, seed=11, num_workers=0) for r in range(3)]
    assert {len(s) for s in ranks} == {2}
    plans = [s.plan(0)[0] for s in ranks]
    ids = np.concatenate([p.ravel() for p in plans])
    assert len(set(ids.tolist())) == ids.size == 24  # disjoint; 24 = 3 ranks * 2 * 4 covers all
    # Reference shard rule: seeded permutation, every world_size-th entry.
    order = np.random.default_rng([11, 0]).permutation(24)
    for rank, plan in enumerate(plans):
        np.testing.assert_array_equal(plan.ravel(), order[rank::3][:8])
    again = RecordIOSource(prefix, 4, rank=1, world_size=3, seed=11, num_workers=0)
    np.testing.assert_array_equal(again.plan(0)[0], plans[1])
    assert not np.array_equal(again.plan(1)[0], plans[1])
    other_seed = RecordIOSource(prefix, 4, rank=1, world_size=3, seed=12, num_workers=0)
    assert not np.array_equal(other_seed.plan(0)[0], plans[1])


def test_resume_and_workers_give_identical_batches(packed):
    prefix, _ = packed
    serial = RecordIOSource(prefix, 3, rank=0, world_size=2, seed=5, num_workers=0)
    parallel = RecordIOSource(prefix, 3, rank=0, world_size=2, seed=5, num_workers=2)
    full = collect(serial, 2)
    resumed = collect(parallel, 2, start=2)
    assert len(resumed) == len(full) - 2
    for (x1, y1), (x2, y2) in zip(full[2:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="start_batch 9"):
        next(serial.epoch(0, 9))


def test_image_folder_equals_packed_recordio(face_tree, packed):
    root, samples = face_tree
    prefix, _ = packed
    folder = ImageFolderSource(root, 4, rank=1, world_size=2, seed=3, num_workers=0, num_classes=None)
    record = build_recordio_source(prefix, 4, 1, 2, 3, 0, "torch", False, None, "cpu")
    assert folder.num_classes == record.num_classes == 6 and len(folder) == len(record) == 3
    assert folder.skipped_files == 1
    for (x1, y1), (x2, y2) in zip(collect(folder, 1), collect(record, 1)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="6 identity folders but num_classes=4"):
        ImageFolderSource(root, 4, 0, 1, 0, 0, num_classes=4)
    with pytest.raises(ValueError, match="empty shard"):
        ImageFolderSource(root, 13, 0, 2, 0, 0, None)


def corrupt_set(tmp_path, labels, broken_key=None, undecodable_key=None):
    rng = np.random.default_rng(9)
    prefix = str(tmp_path / "bad")
    frames = []
    for key, label in enumerate(labels):
        data = jpeg_bytes(smooth_face(rng))
        if key == undecodable_key:
            data = b"\xff\xd8" + b"\x00" * 100
        frames.append((key, simple_frame(ir_payload(label, data))))
    write_rec(prefix, frames)
    if broken_key is not None:
        offset = sum(len(f) for _, f in frames[:broken_key])
        with open(prefix + ".rec", "r+b") as handle:
            handle.seek(offset)
            handle.write(b"BAD!")
    return prefix


def test_corrupt_records_raise_or_are_skipped(tmp_path):
    prefix = corrupt_set(tmp_path, [k % 3 for k in range(12)], broken_key=5, undecodable_key=8)
    strict = RecordIOSource(prefix, 12, 0, 1, seed=0, num_workers=0)
    with pytest.raises(ValueError, match=r"bad\.rec: record 5: bad magic"):
        collect(strict, 0)
    lenient = RecordIOSource(prefix, 12, 0, 1, seed=0, num_workers=0, skip_corrupt=True)
    (images, labels), = collect(lenient, 0)
    assert images.shape[0] == labels.shape[0] == 12
    report = lenient.report()
    assert report["skipped_corrupt"] == 2
    assert any("record 5" in m for m in report["skipped_examples"])
    assert any("record 8" in m and "cannot decode" in m for m in report["skipped_examples"])
    assert open(prefix + ".rec", "rb").read()[:4] == struct.pack("<I", 0xCED7230A)  # input untouched


def test_label_outside_property_range(tmp_path):
    prefix = corrupt_set(tmp_path, [0, 1, 2, 7, 1, 0])
    with open(tmp_path / "property", "w") as handle:
        handle.write("3,112,112\n")
    source = RecordIOSource(prefix, 6, 0, 1, seed=0, num_workers=0)
    assert source.num_classes == 3
    with pytest.raises(ValueError, match=r"bad\.rec: record 3: label 7 is outside \[0, num_classes=3\)"
                                         r" \(num_classes from .*property\)"):
        collect(source, 0)
    os.remove(tmp_path / "property")
    assert RecordIOSource(prefix, 6, 0, 1, seed=0, num_workers=0).num_classes == 8  # label scan


def test_missing_idx_and_bad_arguments(tmp_path):
    prefix = corrupt_set(tmp_path, [0, 1])
    with pytest.raises(ValueError, match="data.loader must be"):
        build_recordio_source(prefix, 1, 0, 1, 0, 0, "mxnet", False, None, "cpu")
    with pytest.raises(ValueError, match="empty shard"):
        build_recordio_source(prefix, 2, 0, 2, 0, 0, "torch", False, None, "cpu")
    with pytest.raises(ValueError, match="rank 2 is not in"):
        build_recordio_source(prefix, 1, 2, 2, 0, 0, "torch", False, None, "cpu")
    os.remove(prefix + ".idx")
    # A ValueError (the trainer prints those as one line) that says how to recover.
    for loader in ("torch", "dali"):
        with pytest.raises(MissingDataFileError, match=re.escape(
                f"{prefix}.idx is missing (expected next to {prefix}.rec); rebuild it with: "
                f"python -m partialfc.data.reindex {prefix}")) as caught:
            build_recordio_source(prefix, 1, 0, 1, 0, 0, loader, False, None, "cpu")
        assert isinstance(caught.value, ValueError)
    os.remove(prefix + ".rec")
    with pytest.raises(ValueError, match=r"bad\.rec: record file is missing"):
        build_recordio_source(prefix, 1, 0, 1, 0, 0, "torch", False, None, "cpu")
    with pytest.raises(ValueError, match=r"no_such_root: image folder root is missing"):
        ImageFolderSource(str(tmp_path / "no_such_root"), 1, 0, 1, 0, 0)


def test_unreadable_property_and_missing_key_are_one_line_errors(tmp_path):
    prefix = corrupt_set(tmp_path, [0, 1, 2, 0])
    os.mkdir(tmp_path / "property")  # exists, cannot be read as a file
    with pytest.raises(DataFileError, match=r"property: cannot read"):
        RecordIOSource(prefix, 2, 0, 1, seed=0, num_workers=0)
    os.rmdir(tmp_path / "property")
    # The header promises image keys 1..4 but the index lost key 3: skipped and counted,
    # or one line naming it (it was a bare KeyError before).
    rng = np.random.default_rng(2)
    header = simple_frame(ir_payload(0, b"", flag_labels=[5, 7]))
    images = [(k, simple_frame(ir_payload(k % 2, jpeg_bytes(smooth_face(rng))))) for k in (1, 2, 3, 4)]
    write_rec(prefix, [(0, header)] + images)
    lines = open(prefix + ".idx").read().splitlines()
    open(prefix + ".idx", "w").write("\n".join(line for line in lines if not line.startswith("3\t")) + "\n")
    lenient = RecordIOSource(prefix, 4, 0, 1, seed=0, num_workers=0, skip_corrupt=True)
    assert [len(y) for _, y in lenient.epoch(0)] == [4]
    assert lenient.report()["skipped_corrupt"] == 1
    assert "bad.idx: no record with key 3" in lenient.report()["skipped_examples"][0]
    strict = RecordIOSource(prefix, 4, 0, 1, seed=0, num_workers=0)
    with pytest.raises(ValueError, match=r"bad\.idx: no record with key 3$"):
        list(strict.epoch(0))


def test_train_cli_prints_one_line_for_a_missing_index(tmp_path, capsys):
    import signal

    from partialfc.train import main as train_main

    prefix = corrupt_set(tmp_path, [0, 1, 2, 0])
    os.remove(prefix + ".idx")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        code = train_main([os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.toml"),
                           "--set", f"train.output={tmp_path / 'run'}", "--set", "data.format=recordio",
                           "--set", f"data.path={prefix}", "--set", "data.loader=torch",
                           "--set", "data.num_classes=0", "--set", "data.batch_size=2"])
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (f"error [rank 0]: {prefix}.idx is missing (expected next to {prefix}.rec); "
                           f"rebuild it with: python -m partialfc.data.reindex {prefix}")
