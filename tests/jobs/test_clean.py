"""The cleaning job: the selection math, the whole command on a set with injected noise,
1 process vs 2 ranks, embedding reuse, dry run, and the errors that must write nothing.

The fixture builds everything the job reads, independently of the job: a face2rec2-style
RecordIO set whose images come from a few clearly separable prototypes, a tiny backbone
whose BatchNorm statistics are calibrated on those images (so different prototypes land
far apart, as after training), and a checkpoint whose centers are set directly: for
every identity one randomly placed sub-center is the mean embedding of its clean images
(the dominant one), another the mean of the images wrongly given its label.
"""
import hashlib
import io
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from spawn import run_ranks
from partialfc.checkpoint import FORMAT, HEAD_FORMAT
from partialfc.clean import main
from partialfc.cleaning.embed import gather_rows_to_rank0, index_path_for, sample_range
from partialfc.cleaning.select import DROP_ANGLE, DROP_MIN_SAMPLES, select_clean
from partialfc.data.inspect import main as inspect_main
from partialfc.data.recordio import IndexedRecordReader, IndexedRecordWriter, IRHeader, pack, unpack
from partialfc.models import build_backbone, save_backbone

NUM_CLASSES = 11          # class 10 has no image at all; class 9 only two
IMAGES_PER_CLASS = 8      # classes 0..8
NUM_NOISY = 10            # images moved to a wrong identity
K = 3
EMBEDDING_SIZE = 128
THRESHOLD_DEG = 70.0      # between the clean (< 50 deg) and the noisy (> 75 deg) clusters
MIN_SAMPLES = 3


# ---------------------------------------------------------------------------- selection math
def reference_selection(embeddings, labels, centers, threshold_deg, min_samples):
    """Per-identity loops, written independently of select.py."""
    num_classes = centers.shape[0]
    dominant = {}
    angle = np.zeros(len(labels))
    keep = np.zeros(len(labels), bool)
    for c in range(num_classes):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        if not rows:
            continue
        unit_centers = [w / np.linalg.norm(w) for w in centers[c].astype(np.float64)]
        nearest = []
        for i in rows:
            x = embeddings[i].astype(np.float64) / np.linalg.norm(embeddings[i])
            nearest.append(max(range(len(unit_centers)), key=lambda k: (float(x @ unit_centers[k]), -k)))
        counts = Counter(nearest)
        dominant[c] = min(counts, key=lambda k: (-counts[k], k))
        for i in rows:
            x = embeddings[i].astype(np.float64) / np.linalg.norm(embeddings[i])
            w = unit_centers[dominant[c]]
            # From the chord length |x - w| = 2 sin(theta / 2): another route to the angle.
            angle[i] = np.degrees(2 * np.arcsin(min(1.0, np.linalg.norm(x - w) / 2)))
            keep[i] = angle[i] <= threshold_deg
        if 0 < sum(keep[i] for i in rows) < min_samples:
            keep[rows] = False
    survivors = sorted({int(labels[i]) for i in range(len(labels)) if keep[i]})
    mapping = {old: new for new, old in enumerate(survivors)}
    new_labels = np.array([mapping[int(labels[i])] if keep[i] else -1 for i in range(len(labels))])
    return dominant, angle, keep, new_labels


@pytest.mark.parametrize("num, num_classes, k, dim, threshold, min_samples", [
    (301, 17, 3, 23, 75.0, 1), (97, 5, 2, 7, 60.0, 4), (211, 40, 4, 9, 88.0, 3)])
def test_select_matches_reference(num, num_classes, k, dim, threshold, min_samples):
    rng = np.random.default_rng(num)
    centers = rng.normal(size=(num_classes, k, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes - 1, num)  # the last class never appears
    # Half the samples near one sub-center of their class, the rest anywhere.
    embeddings = rng.normal(size=(num, dim)).astype(np.float32)
    near = rng.random(num) < 0.5
    embeddings[near] = centers[labels[near], rng.integers(0, k, near.sum())] * 3 + embeddings[near]
    selection = select_clean(embeddings, labels, centers, threshold, min_samples)
    dominant, angle, keep, new_labels = reference_selection(embeddings, labels, centers, threshold,
                                                            min_samples)
    assert {c: int(selection.dominant_subcenter[c]) for c in dominant} == dominant
    assert (selection.dominant_subcenter[[c for c in range(num_classes) if c not in dominant]] == -1).all()
    np.testing.assert_allclose(selection.angle_deg, angle, atol=2e-3)
    assert np.array_equal(selection.keep, keep)
    assert np.array_equal(selection.new_labels, new_labels)
    assert selection.num_new_classes == len(set(new_labels[keep].tolist()))
    assert 0 < keep.sum() < num  # the case exercises both outcomes
    by_angle = angle > threshold
    assert np.array_equal(selection.reason == DROP_ANGLE, by_angle)
    assert np.array_equal(selection.reason == DROP_MIN_SAMPLES, ~by_angle & ~keep)


def test_select_rejects_bad_input():
    rng = np.random.default_rng(0)
    embeddings, labels = rng.normal(size=(5, 4)), np.array([0, 1, 2, 1, 0])
    with pytest.raises(ValueError, match=r"cleaning needs sub-centers \(K >= 2\)"):
        select_clean(embeddings, labels, rng.normal(size=(3, 1, 4)))
    with pytest.raises(ValueError, match="label 7 is outside"):
        select_clean(embeddings, np.array([0, 1, 7, 1, 0]), rng.normal(size=(3, 2, 4)))
    with pytest.raises(ValueError, match="threshold_deg"):
        select_clean(embeddings, labels, rng.normal(size=(3, 2, 4)), threshold_deg=0)


def test_sample_ranges_tile_the_set():
    for num, world in [(10, 3), (2, 4), (7, 1)]:
        ranges = [sample_range(num, world, r) for r in range(world)]
        assert [i for r in ranges for i in r] == list(range(num))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    single = torch.arange(6.0).view(3, 2)
    assert gather_rows_to_rank0(single, [3]) is single


# ---------------------------------------------------------------------------- the fixture
def _prototype(rng):
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((112, 112), Image.BICUBIC), np.float64)


def _jpeg(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _decode(jpeg):
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32)


def _write_checkpoint(step_dir, backbone, centers):
    """The checkpoint layout of partialfc/checkpoint.py, written by hand, as two shards."""
    os.makedirs(step_dir)
    kwargs = {"embedding_size": EMBEDDING_SIZE}
    save_backbone(os.path.join(step_dir, "backbone.pt"), "mobilefacenet_tiny", kwargs, backbone.state_dict())
    torch.save({}, os.path.join(step_dir, "backbone_optimizer.pt"))  # part of a complete checkpoint; unused here
    num_classes, k, dim = centers.shape
    first = (num_classes + 1) // 2
    shards = []
    for rank, (start, count) in enumerate([(0, first), (first, num_classes - first)]):
        name = f"head_rank{rank:05d}.pt"
        torch.save({"format": HEAD_FORMAT, "class_start": start, "num_local": count,
                    "num_classes": num_classes, "num_subcenters": k, "embedding_size": dim,
                    "weight": torch.from_numpy(centers[start:start + count].reshape(-1, dim).copy()),
                    "optimizer_rows": {}}, os.path.join(step_dir, name))
        shards.append({"file": name, "class_start": start, "num_local": count})
    manifest = {"format": FORMAT, "step": 2, "position": {}, "world_size": 2, "num_classes": num_classes,
                "num_subcenters": k, "embedding_size": dim,
                "backbone": {"name": "mobilefacenet_tiny", "kwargs": kwargs}, "head_shards": shards,
                "config": {}}
    with open(os.path.join(step_dir, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(2024)
    prototypes = [_prototype(rng) for _ in range(NUM_CLASSES - 1)]
    true_labels = [c for c in range(9) for _ in range(IMAGES_PER_CLASS)] + [9, 9]
    jpegs = [_jpeg(np.clip(prototypes[c] + rng.normal(0, 4, prototypes[c].shape), 0, 255).astype(np.uint8))
             for c in true_labels]
    labels = np.array(true_labels)
    noisy = rng.choice(9 * IMAGES_PER_CLASS, NUM_NOISY, replace=False)
    for i in noisy:
        labels[i] = rng.choice([c for c in range(9) if c != true_labels[i]])

    # face2rec2 layout: header at key 0, images 1..N, then one record per identity.
    data_dir = root / "input"
    data_dir.mkdir()
    prefix = str(data_dir / "train")
    num = len(jpegs)
    with IndexedRecordWriter(prefix + ".idx", prefix + ".rec") as writer:
        writer.write_idx(0, pack(IRHeader(0, [num + 1, num + 1 + NUM_CLASSES], 0, 0), b""))
        for i, (jpeg, label) in enumerate(zip(jpegs, labels)):
            writer.write_idx(i + 1, pack(IRHeader(0, float(label), i + 1, 0), jpeg))
        for c in range(NUM_CLASSES):
            rows = np.flatnonzero(labels == c) + 1
            span = [rows.min(), rows.max() + 1] if rows.size else [0, 0]
            writer.write_idx(num + 1 + c, pack(IRHeader(0, [float(v) for v in span], 0, 0), b""))
    (data_dir / "property").write_text(f"{NUM_CLASSES},112,112\n")

    # Backbone: BatchNorm statistics calibrated on the images (cumulative average).
    torch.manual_seed(7)
    backbone = build_backbone("mobilefacenet_tiny", embedding_size=EMBEDDING_SIZE)
    pixels = torch.from_numpy((np.stack([_decode(j) for j in jpegs]) - 127.5) / 128.0).permute(0, 3, 1, 2)
    for module in backbone.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    backbone.train()
    with torch.no_grad():
        backbone(pixels)
        backbone.eval()
        embeddings = torch.nn.functional.normalize(backbone(pixels), dim=1).numpy()

    centers = rng.normal(size=(NUM_CLASSES, K, EMBEDDING_SIZE)).astype(np.float32)
    dominant = rng.integers(0, K, NUM_CLASSES)
    is_noisy = np.zeros(num, bool)
    is_noisy[noisy] = True
    for c in range(NUM_CLASSES - 1):
        clean_rows = (labels == c) & ~is_noisy
        centers[c, dominant[c]] = embeddings[clean_rows].mean(0)
        if (labels[is_noisy] == c).any():  # the wrong faces gather at a minor sub-center
            centers[c, (dominant[c] + 1) % K] = embeddings[(labels == c) & is_noisy].mean(0)
    _write_checkpoint(str(root / "ckpt_k3" / "step_00000002"), backbone, centers)
    (root / "ckpt_k3" / "latest").write_text("step_00000002\n")
    _write_checkpoint(str(root / "ckpt_k1"), backbone, centers[:, :1].copy())
    _write_checkpoint(str(root / "ckpt_c12"), backbone, np.concatenate([centers, centers[:1]]))

    unit = centers / np.linalg.norm(centers, axis=2, keepdims=True)
    cos = np.einsum("nd,nd->n", embeddings, unit[labels, dominant[labels]])
    return {"root": root, "prefix": prefix, "data_dir": str(data_dir), "labels": labels,
            "jpegs": jpegs, "noisy_keys": set((noisy + 1).tolist()), "keys": np.arange(1, num + 1),
            "angles": np.degrees(np.arccos(np.clip(cos, -1, 1))), "checkpoint": str(root / "ckpt_k3")}


def _is_reader_cache(name):
    """The index cache and the DALI decode verdict readers leave beside an index."""
    return name.endswith((".idx.npy", ".idx.verified.json"))


def _file_digests(directory):
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory)) if not _is_reader_cache(name)}


def _run(noisy_set, out_dir, *extra):
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "clean")
    code = main([noisy_set["checkpoint"], "--data", noisy_set["prefix"], "--out", out, "--threshold-deg",
                 str(THRESHOLD_DEG), "--min-samples", str(MIN_SAMPLES), "--workers", "0", "--quiet",
                 "--batch-size", "16", *extra])
    return code, out


def _read_csv(path):
    with open(path) as handle:
        header = handle.readline().strip().split(",")
        return header, [line.strip().split(",") for line in handle if line.strip()]


@pytest.fixture(scope="module")
def single_run(noisy_set):
    before = _file_digests(noisy_set["data_dir"])
    code, out = _run(noisy_set, str(noisy_set["root"] / "out1"))
    assert code == 0
    assert _file_digests(noisy_set["data_dir"]) == before  # the input is only read
    return out


# ---------------------------------------------------------------------------- the job
def test_finds_injected_noise(noisy_set, single_run):
    _, rows = _read_csv(single_run + ".dropped.csv")
    by_angle = {int(r[0]) for r in rows if r[2] == "angle"}
    injected = noisy_set["noisy_keys"]
    precision = len(by_angle & injected) / max(1, len(by_angle))
    recall = len(by_angle & injected) / len(injected)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # Identity 9 (two clean images) falls under --min-samples 3; identity 10 has no image.
    assert {int(r[0]) for r in rows if r[2] == "min_samples"} == {73, 74}
    # Angles agree with a direct computation (PIL decode, plain forward, known dominant center).
    for key, _, _, angle in rows:
        assert abs(float(angle) - noisy_set["angles"][int(key) - 1]) < 0.05


def test_outputs_read_back_and_match_the_report(noisy_set, single_run):
    report = json.load(open(single_run + ".report.json"))
    _, dropped = _read_csv(single_run + ".dropped.csv")
    _, mapping_rows = _read_csv(single_run + ".labels.csv")
    mapping = {int(old): int(new) for old, new in mapping_rows}
    dropped_keys = {int(r[0]) for r in dropped}
    labels, jpegs = noisy_set["labels"], noisy_set["jpegs"]
    kept_keys = [int(k) for k in noisy_set["keys"] if int(k) not in dropped_keys]

    with IndexedRecordReader(single_run + ".idx", single_run + ".rec") as reader:
        assert list(reader.keys) == list(range(len(kept_keys)))
        new_labels = []
        for new_key, old_key in enumerate(kept_keys):
            header, body = unpack(reader.read_idx(new_key))
            assert body == jpegs[old_key - 1]  # original image bytes
            assert (header.id, header.id2) == (new_key, old_key)
            assert header.label == mapping[int(labels[old_key - 1])]
            new_labels.append(int(header.label))
    survivors = sorted({int(labels[k - 1]) for k in kept_keys})
    assert mapping == {c: (survivors.index(c) if c in survivors else -1) for c in range(NUM_CLASSES)}
    assert sorted(set(new_labels)) == list(range(len(survivors)))
    prop = open(os.path.join(os.path.dirname(single_run), "property")).read().strip()
    assert prop == f"{len(survivors)},112,112"

    assert report["images_before"] == len(noisy_set["keys"]) == len(kept_keys) + len(dropped)
    assert report["images_after"] == len(kept_keys)
    assert report["identities_before"] == NUM_CLASSES - 1
    assert report["identities_after"] == len(survivors)
    assert report["dropped_images"] == dict(Counter(r[2] for r in dropped), **{
        k: 0 for k in ("angle", "min_samples") if k not in {r[2] for r in dropped}})
    assert report["dropped_identities"]["min_samples"] == 1
    assert report["num_classes_before"] == NUM_CLASSES and report["threshold_deg"] == THRESHOLD_DEG
    quantiles = report["angle_deg_quantiles"]
    np.testing.assert_allclose([quantiles["p0"], quantiles["p50"], quantiles["p100"]],
                               np.quantile(noisy_set["angles"], [0, 0.5, 1]), atol=0.05)
    assert open(single_run + ".angles.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    written = {n for n in os.listdir(os.path.dirname(single_run)) if not _is_reader_cache(n)}
    assert written == {"property"} | {"clean." + s for s in ("rec", "idx", "labels.csv", "dropped.csv",
                                                               "angles.png", "report.json")}


def test_inspect_reads_the_cleaned_set(single_run, capsys):
    """What clean writes must pass its own inspect, decode included."""
    report = json.load(open(single_run + ".report.json"))
    capsys.readouterr()
    assert inspect_main([single_run, "--decode", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == report["images_after"]
    assert summary["num_classes"] == summary["property_num_classes"] == report["identities_after"]
    assert summary["corrupt"] == summary["bad_labels"] == [] and summary["problems"] == []


def test_dali_reads_the_cleaned_set(single_run):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    from partialfc.data.recordio_source import build_recordio_source

    with IndexedRecordReader(single_run + ".idx", single_run + ".rec") as reader:
        expected = [int(unpack(reader.read_at(i))[0].label) for i in range(len(reader))]
    batch = 5
    source = build_recordio_source(single_run, batch, 0, 1, 0, 1, "dali", False, None, "cpu",
                                   shuffle=False, flip=False)
    try:
        seen = [y for _, ys in source.epoch(0) for y in ys.tolist()]
    finally:
        source.close()
    assert seen == expected[: len(expected) // batch * batch]


def _clean_on_rank(rank, world_size, checkpoint, prefix, out):
    torch.set_num_threads(1)
    return main([checkpoint, "--data", prefix, "--out", out, "--threshold-deg", str(THRESHOLD_DEG),
                 "--min-samples", str(MIN_SAMPLES), "--workers", "0", "--quiet", "--batch-size", "16"])


def test_two_ranks_give_the_same_dropped_set(noisy_set, single_run):
    out_dir = noisy_set["root"] / "out2"
    out_dir.mkdir()
    out = str(out_dir / "clean")
    assert run_ranks(_clean_on_rank, 2, noisy_set["checkpoint"], noisy_set["prefix"], out) == [0, 0]
    one, two = _read_csv(single_run + ".dropped.csv")[1], _read_csv(out + ".dropped.csv")[1]
    assert [r[:3] for r in one] == [r[:3] for r in two]
    np.testing.assert_allclose([float(r[3]) for r in one], [float(r[3]) for r in two], atol=1e-3)
    assert open(single_run + ".rec", "rb").read() == open(out + ".rec", "rb").read()
    assert json.load(open(out + ".report.json"))["world_size"] == 2


def test_reuse_embeddings_and_dry_run(noisy_set, single_run, tmp_path):
    embeddings = str(tmp_path / "emb.npy")
    code, out = _run(noisy_set, str(tmp_path / "a"), "--embeddings", embeddings)
    assert code == 0 and os.path.exists(index_path_for(embeddings))
    assert np.array_equal(np.load(index_path_for(embeddings)), noisy_set["keys"])
    # Make the saved rows different from what the backbone would give: reuse must read them.
    saved = np.load(embeddings)
    rows = np.load(embeddings)
    rows[0] = -rows[0]
    np.save(embeddings, rows)
    code, dry = _run(noisy_set, str(tmp_path / "b"), "--embeddings", embeddings, "--dry-run")
    assert code == 0
    assert sorted(os.listdir(tmp_path / "b")) == ["clean.angles.png", "clean.report.json"]
    report = json.load(open(dry + ".report.json"))
    full = json.load(open(single_run + ".report.json"))
    first_is_noise = 1 in noisy_set["noisy_keys"]
    assert report["dry_run"] and report["images_before"] == full["images_before"]
    # Flipping row 0 turns a clean image into one at ~180 deg (or keeps a noisy one dropped).
    assert report["dropped_images"]["angle"] == full["dropped_images"]["angle"] + (0 if first_is_noise else 1)
    np.save(embeddings, saved)

    # Interrupted while writing records: no final file appears, the staging dir is gone.
    import partialfc.cleaning.write as write_module

    real_write = write_module.write_recordio

    def write_then_interrupt(rec_path, idx_path, *args, **kwargs):
        real_write(rec_path, idx_path, *args, **kwargs)
        assert os.path.getsize(rec_path) > 0
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(write_module, "write_recordio", write_then_interrupt)
        code, _ = _run(noisy_set, str(tmp_path / "d"), "--embeddings", embeddings)
    assert code == 130 and os.listdir(tmp_path / "d") == []

    np.save(index_path_for(embeddings), noisy_set["keys"][::-1])
    code, _ = _run(noisy_set, str(tmp_path / "c"), "--embeddings", embeddings)
    assert code == 2 and os.listdir(tmp_path / "c") == []


@pytest.mark.parametrize("case, message", [
    ("k1", "cleaning needs sub-centers"),
    ("classes", "the data has 11 classes"),
    ("missing", "record file is missing"),
    ("missing_idx", "copy.idx is missing (expected next to"),
    ("same_dir", "would be overwritten"),
])
def test_errors_write_nothing(noisy_set, tmp_path, capsys, case, message):
    checkpoint, prefix = noisy_set["checkpoint"], noisy_set["prefix"]
    out_dir = str(tmp_path / "out")
    os.makedirs(out_dir)
    out = os.path.join(out_dir, "clean")
    if case == "k1":
        checkpoint = str(noisy_set["root"] / "ckpt_k1")
    elif case == "classes":
        checkpoint = str(noisy_set["root"] / "ckpt_c12")
    elif case == "missing":
        shutil.copy(prefix + ".idx", tmp_path / "copy.idx")
        prefix = str(tmp_path / "copy")
    elif case == "missing_idx":
        shutil.copy(prefix + ".rec", tmp_path / "copy.rec")
        prefix = str(tmp_path / "copy")
    else:
        out = os.path.join(noisy_set["data_dir"], "clean")
    before = _file_digests(noisy_set["data_dir"])
    code = main([checkpoint, "--data", prefix, "--out", out, "--quiet", "--workers", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert os.listdir(out_dir) == []
    assert _file_digests(noisy_set["data_dir"]) == before


def _copy_of_input(noisy_set, directory):
    os.makedirs(directory)
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(os.path.join(noisy_set["data_dir"], name), os.path.join(directory, name))
    return os.path.join(directory, "train")


@pytest.mark.parametrize("damage", ["truncated", "undecodable"])
def test_damaged_set_is_one_line_and_writes_nothing(noisy_set, tmp_path, capsys, damage):
    prefix = _copy_of_input(noisy_set, str(tmp_path / "input"))
    with IndexedRecordReader(prefix + ".idx", prefix + ".rec", use_cache=False) as reader:
        offset = {int(k): int(o) for k, o in zip(reader.keys, reader.offsets)}
    if damage == "truncated":  # cut in the middle of image record 40 (and all after it)
        with open(prefix + ".rec", "r+b") as handle:
            handle.truncate(offset[40] + 300)
        expected = f"{prefix}.rec: record 40 at byte {offset[40]}: bad framing"
    else:  # record 5's JPEG body zeroed: framing intact, the image does not decode
        with open(prefix + ".rec", "r+b") as handle:
            handle.seek(offset[5] + 8 + 24 + 2)
            handle.write(b"\x00" * 200)
        expected = f"{prefix}.rec: record 5: cannot decode image"
    out_dir = tmp_path / "out"
    code = main([noisy_set["checkpoint"], "--data", prefix, "--out", str(out_dir / "clean"), "--quiet",
                 "--workers", "1", "--batch-size", "16"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not out_dir.exists() or os.listdir(out_dir) == []


def test_an_empty_result_is_refused_and_nested_outputs_are_created(noisy_set, tmp_path, capsys):
    embeddings = str(tmp_path / "emb.npy")
    out_dir = tmp_path / "out"
    # Every image beyond 1 degree (an undertrained model looks like this): refused, nothing written.
    code, _ = _run(noisy_set, str(out_dir), "--embeddings", embeddings, "--threshold-deg", "1")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"cleaning would drop all {len(noisy_set['keys'])} images ({len(noisy_set['keys'])} beyond 1 deg" in err
    assert "nothing written; the checkpoint may be undertrained" in err
    assert os.listdir(out_dir) == []
    # Every identity under --min-samples: refused the same way.
    code, _ = _run(noisy_set, str(out_dir), "--embeddings", embeddings, "--min-samples", "1000")
    assert code == 2 and "cleaning would drop all" in capsys.readouterr().err
    assert os.listdir(out_dir) == []
    # A dry run still reports it (no set is written).
    code, dry = _run(noisy_set, str(out_dir), "--embeddings", embeddings, "--threshold-deg", "1", "--dry-run")
    assert code == 0 and json.load(open(dry + ".report.json"))["images_after"] == 0
    # --out in folders that do not exist yet: created; the result reads back.
    nested = str(tmp_path / "new" / "deeper" / "clean")
    code = main([noisy_set["checkpoint"], "--data", noisy_set["prefix"], "--out", nested, "--quiet",
                 "--embeddings", embeddings, "--threshold-deg", str(THRESHOLD_DEG)])
    assert code == 0
    capsys.readouterr()
    assert inspect_main([nested, "--json"]) == 0


def test_consolidated_checkpoint_cleans_like_its_step_directory(noisy_set, single_run, tmp_path):
    """`checkpoint consolidate`'s single file carries the centers and the backbone: clean
    takes it like the step directory it came from and drops the same images."""
    from partialfc.checkpoint import consolidate

    consolidated = consolidate(noisy_set["checkpoint"], tmp_path / "model.pt")
    out = str(tmp_path / "out" / "clean")
    code = main([str(consolidated), "--data", noisy_set["prefix"], "--out", out, "--threshold-deg",
                 str(THRESHOLD_DEG), "--min-samples", str(MIN_SAMPLES), "--workers", "0", "--quiet",
                 "--batch-size", "16"])
    assert code == 0
    assert open(out + ".dropped.csv").read() == open(single_run + ".dropped.csv").read()
    assert open(out + ".labels.csv").read() == open(single_run + ".labels.csv").read()


def test_without_matplotlib_the_set_is_written_without_the_histogram(noisy_set, single_run, tmp_path, monkeypatch):
    """matplotlib is an extra (eval): a core install still cleans, only the plot is left out."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    code, out = _run(noisy_set, str(tmp_path / "out"))
    assert code == 0
    assert not os.path.exists(out + ".angles.png")
    assert open(out + ".dropped.csv").read() == open(single_run + ".dropped.csv").read()
