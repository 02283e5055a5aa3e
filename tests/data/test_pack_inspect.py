"""The pack and inspect tools: contents, CLI exit codes and messages, atomic output."""
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_helpers import bomb_png, ir_payload, jpeg_bytes, simple_frame, smooth_face, write_rec
from partialfc.data import pack as pack_module
from partialfc.data.inspect import main as inspect_main
from partialfc.data.pack import main as pack_main
from partialfc.data.recordio import IndexedRecordReader, unpack

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_module(module, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_pack_folder_keeps_jpegs_and_labels(face_tree, tmp_path, capsys):
    root, samples = face_tree
    # One non-112 PNG in the last identity: must be re-encoded to a 112x112 JPEG.
    png_path = os.path.join(root, "id_05", "zz_big.png")
    Image.fromarray(np.full((150, 130, 3), 200, np.uint8)).save(png_path)
    prefix = str(tmp_path / "out" / "train")
    os.makedirs(tmp_path / "out")
    assert pack_main([root, prefix, "--workers", "2", "--quiet"]) == 0
    assert "skipped 1 non-image" in capsys.readouterr().out
    assert open(tmp_path / "out" / "property").read().strip() == "6,112,112"
    with IndexedRecordReader(prefix + ".idx", prefix + ".rec") as reader:
        assert reader.keys.tolist() == list(range(len(samples) + 1))
        for key, (path, label, _) in enumerate(samples):
            header, body = unpack(reader.read_idx(key))
            assert header.label == label and header.flag == 0
            assert body == open(path, "rb").read()  # kept byte for byte
        header, body = unpack(reader.read_idx(len(samples)))
        image = Image.open(io.BytesIO(body))
        assert header.label == 5 and image.format == "JPEG" and image.size == (112, 112)
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".tmp")]


def test_pack_from_lst_with_multi_labels(face_tree, tmp_path):
    root, samples = face_tree
    lst = tmp_path / "train.lst"
    rows = [(10 + n, samples[i][1], 0.5 * i, os.path.relpath(samples[i][0], root))
            for n, i in enumerate((3, 0, 8))]
    lst.write_text("".join("%d\t%d\t%g\t%s\n" % row for row in rows))
    prefix = str(tmp_path / "lst")
    assert pack_main([root, prefix, "--list", str(lst), "--workers", "1", "--quiet"]) == 0
    with IndexedRecordReader(prefix + ".idx", prefix + ".rec") as reader:
        assert reader.keys.tolist() == [10, 11, 12]
        for key, label, extra, _ in rows:
            header, _ = unpack(reader.read_idx(key))
            assert header.flag == 2 and list(header.label) == [label, extra]


def test_interrupted_pack_leaves_nothing(face_tree, tmp_path, monkeypatch):
    root, _ = face_tree
    original = pack_module.encode_item
    calls = []

    def interrupted_after_five(args):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return original(args)

    monkeypatch.setattr(pack_module, "encode_item", interrupted_after_five)
    out = tmp_path / "out"
    os.makedirs(out)
    assert pack_main([root, str(out / "train"), "--workers", "1", "--quiet"]) == 130
    assert os.listdir(out) == []


def inspect_json(capsys, *args):
    capsys.readouterr()
    code = inspect_main([*args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_inspect_counts_and_corrupt_record(face_tree, tmp_path, capsys):
    root, samples = face_tree
    prefix = str(tmp_path / "train")
    assert pack_main([root, prefix, "--workers", "1", "--quiet"]) == 0
    code, summary = inspect_json(capsys, prefix)
    assert code == 0
    assert summary["num_images"] == 24 and summary["num_classes"] == 6
    assert summary["histogram"] == {"1": 1, "2": 1, "3": 1, "5": 1, "6": 1, "7": 1}
    assert summary["corrupt"] == []
    # Break record 4's magic and make record 9's JPEG undecodable.
    with IndexedRecordReader(prefix + ".idx", prefix + ".rec") as reader:
        offsets = {int(k): int(o) for k, o in zip(reader.keys, reader.offsets)}
    data = bytearray(open(prefix + ".rec", "rb").read())
    data[offsets[4]:offsets[4] + 4] = b"JUNK"
    data[offsets[9] + 8 + 24 + 2:offsets[9] + 8 + 24 + 40] = b"\x00" * 38
    open(prefix + ".rec", "wb").write(bytes(data))
    code, summary = inspect_json(capsys, prefix)
    assert code == 1 and summary["corrupt"] == [4]
    assert "train.rec: record 4: bad magic" in summary["corrupt_reasons"][0]
    code, summary = inspect_json(capsys, prefix, "--decode")
    assert code == 1 and summary["corrupt"] == [4, 9]


def test_inspect_header_layout_excludes_header(tmp_path, capsys):
    prefix = str(tmp_path / "ins")
    image = Image.new("RGB", (112, 112))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    records = [(0, simple_frame(ir_payload(0, b"", flag_labels=[4, 6])))]
    records += [(k, simple_frame(ir_payload(lab, buffer.getvalue()))) for k, lab in [(1, 0), (2, 1), (3, 1)]]
    records += [(4, simple_frame(ir_payload(0, b"", flag_labels=[1, 2]))),
                (5, simple_frame(ir_payload(0, b"", flag_labels=[2, 4])))]
    write_rec(prefix, records)
    assert inspect_main([prefix, "--decode"]) == 0
    out = capsys.readouterr().out
    assert "num_images: 3" in out and "num_classes: 2" in out


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    assert pack_main([str(tmp_path / "no_such_dir"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no_such_dir" in err and "missing" in err
    assert inspect_main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "nothing.rec" in err and "missing" in err
    prefix = str(tmp_path / "x")
    open(prefix + ".rec", "wb").write(struct.pack("<II", 0xCED7230A, 0))
    open(prefix + ".idx", "w").write("0\tzero\n")
    assert inspect_main([prefix]) == 2
    assert "x.idx: line 1" in capsys.readouterr().err


def test_cli_help():
    for main in (pack_main, inspect_main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
    # One real ``python -m`` run: entry point, exit code, no traceback.
    result = run_module("partialfc.data.inspect", "/nonexistent/prefix")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "prefix.rec: record file is missing" in result.stderr


def test_inspect_reports_labels_training_refuses(tmp_path, capsys):
    """Negative, fractional and too-large labels (against the header's class count,
    then against property's) and an empty set: exit 1 with the records named."""
    jpeg = jpeg_bytes(smooth_face(np.random.default_rng(0)))
    prefix = str(tmp_path / "labels")
    labels = {1: 0, 2: -1, 3: 2, 4: 3, 5: 1.5, 6: 1}  # header: identities 7..9, so 3 classes
    records = [(0, simple_frame(ir_payload(0, b"", flag_labels=[7, 10])))]
    records += [(key, simple_frame(ir_payload(label, jpeg))) for key, label in labels.items()]
    write_rec(prefix, records)
    code, summary = inspect_json(capsys, prefix)
    assert code == 1 and summary["corrupt"] == []
    assert summary["bad_labels"] == [2, 4, 5]
    assert summary["num_classes_for_training"] == 3
    assert summary["num_classes_source"] == "header record"
    assert summary["bad_label_reasons"][1] == (f"{prefix}.rec: record 4: label 3 is outside "
                                               f"[0, num_classes=3) (num_classes from header record)")
    # The training loader refuses exactly these records.
    from partialfc.data.recordio_source import RecordDataset

    dataset = RecordDataset(prefix)
    refused = []
    for sample_id in range(dataset.num_images):
        try:
            dataset.fetch(sample_id)
        except ValueError:
            refused.append(dataset.key(sample_id))
    dataset.close()
    assert refused == summary["bad_labels"]
    (tmp_path / "property").write_text("2,112,112\n")  # property wins, as in training
    code, summary = inspect_json(capsys, prefix)
    assert code == 1 and summary["bad_labels"] == [2, 3, 4, 5]
    assert inspect_main([prefix]) == 1
    captured = capsys.readouterr()
    assert "labels training refuses: 4" in captured.out
    assert "problem: 4 records with labels training refuses" in captured.err

    empty = str(tmp_path / "empty" / "set")
    os.makedirs(os.path.dirname(empty))
    write_rec(empty, [(0, simple_frame(ir_payload(0, b"", flag_labels=[1, 1])))])
    code, summary = inspect_json(capsys, empty)
    assert code == 1 and summary["num_images"] == 0
    assert "no image records" in summary["problems"][0]


def test_pack_creates_the_output_folders_and_skips_a_bomb(face_tree, tmp_path, capsys):
    root, samples = face_tree
    with open(os.path.join(root, "id_02", "huge.png"), "wb") as handle:
        handle.write(bomb_png())
    prefix = str(tmp_path / "out" / "dir" / "train")
    assert pack_main([root, prefix, "--workers", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "huge.png: image exceeds the 16777216-pixel bound" in captured.err
    assert "skipped 2 non-image files" in captured.out
    code, summary = inspect_json(capsys, prefix, "--decode")
    assert code == 0 and summary["num_images"] == len(samples)
    open(tmp_path / "file", "w").close()
    assert pack_main([root, str(tmp_path / "file" / "train"), "--quiet"]) == 2
    assert "cannot create the output directory" in capsys.readouterr().err
