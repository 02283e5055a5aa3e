"""The eval and export CLIs on every checkpoint form and on bad input.

Every form of CHECKPOINT a user has (run directory, checkpoints root, step directory,
``backbone.pt``, the ``checkpoint consolidate`` file) gives the same model; every bad
input (``.bin``, checkpoint, pairs list, option) is exactly one line on stderr that
names the file, exit status 2, no traceback, and nothing from a malicious file runs.
"""
from __future__ import annotations

import builtins
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from eval_helpers import TINY_BACKBONE_KWARGS, encode_png, random_images
from partialfc import CombinedMargin, PartialFC, export
from partialfc.checkpoint import consolidate, save_checkpoint
from partialfc.eval import ijb, make_bin, verification
from partialfc.eval.bin_format import MAX_IMAGE_PIXELS, write_bin
from partialfc.eval.verification import clear_bin_cache
from partialfc.models import build_backbone, save_backbone
from partialfc.models.inference import load_class_centers, load_model, read_head_header

NUM_CLASSES, NUM_SUBCENTERS, EMBEDDING_SIZE = 5, 3, 16


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_bin_cache()
    yield
    clear_bin_cache()


def one_error_line(capsys, main, argv) -> str:
    """Run a CLI in-process; it must fail with status 2 and exactly one stderr line."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert code == 2, (code, captured.out, captured.err)
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def pair_bin(path, rng, pairs: int = 10, size: int = 112):
    """Half same pairs (one image twice), half different."""
    bins, issame = [], []
    for index in range(pairs):
        first = encode_png(random_images(rng, 1, size, size)[0])
        same = index % 2 == 0
        bins += [first, first if same else encode_png(random_images(rng, 1, size, size)[0])]
        issame.append(same)
    write_bin(path, bins, issame)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory written by partialfc.checkpoint.save_checkpoint (K = 3 head) and its forms."""
    root = tmp_path_factory.mktemp("cli_run")
    torch.manual_seed(0)
    backbone = build_backbone("mobilefacenet", **TINY_BACKBONE_KWARGS).eval()
    head = PartialFC(CombinedMargin(scale=16.0, m1=1.0, m2=0.3, m3=0.0), EMBEDDING_SIZE, NUM_CLASSES,
                     num_subcenters=NUM_SUBCENTERS)
    step_dir = save_checkpoint(
        root, step=4, position={}, config_dict={}, backbone_name="mobilefacenet",
        backbone_kwargs=TINY_BACKBONE_KWARGS, backbone_state=backbone.state_dict(), head=head,
        engine_state=None, head_optimizer=torch.optim.SGD([head.weight], lr=0.1), keep_last=1)
    consolidated = consolidate(root, root / "consolidated.pt")
    forms = {"run dir": root, "checkpoints root": root / "checkpoints", "step dir": step_dir,
             "backbone.pt": step_dir / "backbone.pt", "consolidated": consolidated}
    centers = head.weight.detach().view(NUM_CLASSES, NUM_SUBCENTERS, EMBEDDING_SIZE).clone()
    return {"root": root, "forms": forms, "backbone": backbone, "centers": centers,
            "bin": pair_bin(root / "pairs.bin", np.random.default_rng(1))}


# ----------------------------------------------------------------------------- checkpoint forms
def test_every_checkpoint_form_loads_the_same_model_and_centers(run):
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = run["backbone"](images)
    for name, path in run["forms"].items():
        loaded = load_model(path, centers=True)
        with torch.no_grad():
            torch.testing.assert_close(loaded.backbone(images), expected, rtol=0, atol=0, msg=name)
        if name == "backbone.pt":
            assert loaded.centers is None  # a backbone file has no head
        else:
            torch.testing.assert_close(loaded.centers, run["centers"], rtol=0, atol=0, msg=name)
    assert load_model(run["forms"]["run dir"]).source == run["forms"]["step dir"]
    assert load_model(run["forms"]["consolidated"]).centers is None  # only when asked for


def test_a_stale_or_broken_latest_resolves_like_a_resume_would(run, tmp_path):
    """A crash between renaming a step into place and writing ``latest`` leaves it behind or
    naming nothing; the tools take the newest complete checkpoint, as training resumes."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run["root"] / "checkpoints", copy / "checkpoints")
    latest = copy / "checkpoints" / "latest"
    for stale in ("step_00000009\n", "step_00000002\n"):  # names a missing step / an older name
        latest.write_text(stale)
        assert load_model(copy).source == copy / "checkpoints" / "step_00000004"
    latest.unlink()
    assert load_model(copy).source == copy / "checkpoints" / "step_00000004"


def test_verification_accepts_every_checkpoint_form(run, capsys):
    outputs = set()
    for name, path in run["forms"].items():
        assert verification.main([str(path), str(run["bin"]), "--device", "cpu"]) == 0, name
        outputs.add(capsys.readouterr().out)
    assert len(outputs) == 1 and outputs.pop().startswith("pairs: accuracy ")


@pytest.mark.parametrize("form", ["run dir", "consolidated"])
def test_export_accepts_run_dir_and_consolidated_file(run, form, tmp_path, capsys):
    pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    assert export.main([str(run["forms"][form]), "--onnx", str(out), "--no-verify"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out


def test_invert_takes_class_centers_from_a_consolidated_file(run):
    from partialfc.invert import load_model as invert_load_model

    backbone, centers, where = invert_load_model(str(run["forms"]["consolidated"]), need_centers=True)
    torch.testing.assert_close(centers, run["centers"], rtol=0, atol=0)
    assert where == run["forms"]["consolidated"]
    with pytest.raises(ValueError, match="needs a checkpoint directory with head shards"):
        invert_load_model(str(run["forms"]["backbone.pt"]), need_centers=True)


def test_head_header_and_centers_for_jobs_that_need_the_head(run):
    forms = run["forms"]
    headers = {}
    for name in ("run dir", "step dir", "consolidated"):
        source, header = read_head_header(forms[name])
        headers[name] = {key: header[key] for key in ("num_classes", "num_subcenters", "embedding_size")}
        assert source == (forms["consolidated"] if name == "consolidated" else forms["step dir"])
        torch.testing.assert_close(load_class_centers(forms[name]), run["centers"], rtol=0, atol=0)
    assert all(h == {"num_classes": 5, "num_subcenters": 3, "embedding_size": 16} for h in headers.values())
    for call in (read_head_header, load_class_centers):
        with pytest.raises(ValueError, match="holds only a backbone, no class centers"):
            call(forms["backbone.pt"])


# ----------------------------------------------------------------------------- bad checkpoints
class _WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _bad_checkpoints(tmp_path, run):
    """(file, expected message fragment) per kind of bad checkpoint."""
    good = (run["forms"]["backbone.pt"]).read_bytes()
    marker = tmp_path / "pwned"
    cases = []

    def add(name, data, fragment):
        path = tmp_path / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            torch.save(data, path)
        cases.append((path, fragment))

    add("random.pt", np.random.default_rng(0).bytes(4096), "not a torch file")
    add("empty.pt", b"", "empty or truncated")
    add("truncated.pt", good[: len(good) // 2], "corrupt or truncated torch file")
    add("evil_zip.pt", {"format": "partialfc-backbone/1", "x": _WritesMarker(str(marker))},
        "refused, nothing in it was run")
    add("evil_legacy.pt", pickle.dumps({"x": _WritesMarker(str(marker))}, protocol=2),
        "refused, nothing in it was run")
    add("wrong_keys.pt", {"weights": torch.zeros(3), "epoch": 3}, "field 'format' is None")
    add("bare_state.pt", build_backbone("mobilefacenet_tiny").state_dict(), "bare state dict")
    other = tmp_path / "other_arch.pt"  # a backbone file whose weights are another architecture's
    save_backbone(other, "mobilefacenet", TINY_BACKBONE_KWARGS,
                  {f"x{index}.weight": torch.zeros(2) for index in range(9)})
    cases.append((other, "another architecture"))
    shape = tmp_path / "other_shape.pt"
    save_backbone(shape, "mobilefacenet", dict(TINY_BACKBONE_KWARGS, embedding_size=8),
                  build_backbone("mobilefacenet", **TINY_BACKBONE_KWARGS).state_dict())
    cases.append((shape, "shape of 'fc.weight'"))
    payload = torch.load(run["forms"]["consolidated"], weights_only=True)
    payload["centers"] = payload["centers"][:2]
    add("bad_consolidated.pt", payload, "'centers' has shape (2, 3, 16)")
    cases.append((tmp_path / "missing.pt", "does not exist"))
    (tmp_path / "empty_dir").mkdir()
    cases.append((tmp_path / "empty_dir", "holds neither 'backbone.pt'"))
    return cases, marker


def test_bad_checkpoints_are_one_line_and_run_nothing(run, tmp_path, capsys):
    cases, marker = _bad_checkpoints(tmp_path, run)
    for path, fragment in cases:
        for cli, argv in ((verification.main, [path, run["bin"], "--device", "cpu"]),
                          (export.main, [path, "--onnx", tmp_path / "m.onnx", "--no-verify"])):
            line = one_error_line(capsys, cli, argv)
            assert str(path) in line and fragment in line, (cli.__module__, line)
    assert not marker.exists()
    assert not (tmp_path / "m.onnx").exists()


# ----------------------------------------------------------------------------- bad .bin files
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a stub)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _real_bomb() -> bytes:
    """A real, valid PNG above MAX_IMAGE_PIXELS that compresses to a few kilobytes."""
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 64
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bad_bins(tmp_path):
    rng = np.random.default_rng(5)
    good = encode_png(random_images(rng, 1, 16, 16)[0])
    valid = pickle.dumps(([good, good], [True]))
    marker = tmp_path / "pwned"
    cases = []

    def add(name, data, fragment):
        path = tmp_path / name
        path.write_bytes(data if isinstance(data, bytes) else pickle.dumps(data))
        cases.append((path, fragment))

    add("truncated.bin", valid[: len(valid) // 2], "not a readable verification .bin")
    add("empty_file.bin", b"", "not a readable verification .bin")
    add("counts.bin", ([good] * 4, [True] * 4), "4 images for 4 pairs")
    add("no_pairs.bin", ([], []), "holds no pairs")
    add("not_bools.bin", ([good, good], [1]), "issame[0] is 1")
    add("not_a_pair.bin", {"bins": [good]}, "expected a pickled (bins, issame) pair")
    add("not_image.bin", ([good, b"not an image", good, good], [True, False]), "image 1: cannot decode")
    add("cut_image.bin", ([good, good[: len(good) // 2]], [True]), "image 1: cannot decode")
    add("bomb.bin", ([good, good, good, _real_bomb()], [True, False]), "image 3: image of")
    add("pil_bomb.bin", ([_png_header_only(30000, 30000), good], [False]), "image 0: image exceeds the")
    add("evil.bin", ([good, _WritesMarker(str(marker))], [True]), "refusing to load pickle global")
    # A protocol-5 bytearray opcode spliced into a protocol-2 stream: refused before unpickling.
    add("bytearray.bin", b"\x80\x02]q\x00(\x96\x02\x00\x00\x00\x00\x00\x00\x00abe]q\x01\x88a\x86q\x02.",
        "refusing pickle opcode BYTEARRAY8")
    cases.append((tmp_path / "missing.bin", "verification set not found"))
    (tmp_path / "folder.bin").mkdir()
    cases.append((tmp_path / "folder.bin", "must be a .bin file, not a directory"))
    return cases, marker


def test_bad_bins_are_one_line_naming_the_file(run, tmp_path, capsys):
    cases, marker = _bad_bins(tmp_path)
    backbone = run["forms"]["backbone.pt"]
    for path, fragment in cases:
        line = one_error_line(capsys, verification.main, [backbone, path, "--device", "cpu"])
        assert line.startswith("verification: error: ") and str(path) in line and fragment in line, line
    assert not marker.exists()


def test_a_bad_later_set_keeps_the_earlier_result(run, tmp_path, capsys):
    bad = tmp_path / "later.bin"
    bad.write_bytes(b"\x80\x04junk")
    code = verification.main([str(run["forms"]["backbone.pt"]), str(run["bin"]), str(bad), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out.startswith("pairs: accuracy ")
    assert len(captured.err.splitlines()) == 1 and "later.bin" in captured.err


def test_bad_options_are_one_line_before_any_work(run, tmp_path, capsys):
    backbone, good = run["forms"]["backbone.pt"], run["bin"]
    assert "--device 'tpu:9'" in one_error_line(capsys, verification.main, [backbone, good, "--device", "tpu:9"])
    line = one_error_line(capsys, verification.main, [backbone, good, "--json", tmp_path / "no" / "r.json"])
    assert "output folder does not exist" in line
    assert "--batch-size must be >= 1" in one_error_line(capsys, verification.main,
                                                         [backbone, good, "--batch-size", "0"])
    assert "share a name" in one_error_line(capsys, verification.main, [backbone, good, tmp_path / "pairs.bin"])
    line = one_error_line(capsys, export.main, [backbone, "--onnx", tmp_path / "no" / "m.onnx", "--no-verify"])
    assert "output folder does not exist" in line


# ----------------------------------------------------------------------------- make_bin and ijb
@pytest.fixture
def non_lfw_folder(tmp_path):
    """Images named 1.jpg, 2.jpg instead of LFW's alice/alice_0001.jpg."""
    rng = np.random.default_rng(0)
    for number in (1, 2):
        (tmp_path / "faces" / "alice").mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_images(rng, 1, 112, 112)[0]).save(tmp_path / "faces" / "alice" / f"{number}.jpg")
    return tmp_path


def test_make_bin_with_non_lfw_names_is_one_line(non_lfw_folder, capsys):
    root = non_lfw_folder
    pairs, out = root / "pairs.txt", root / "out.bin"
    pairs.write_text("1 1\nalice 1 2\n")
    line = one_error_line(capsys, make_bin.main, [root / "faces", pairs, out])
    assert f"{pairs}:2:" in line and "alice_0001.jpg" in line
    assert "LFW naming IMAGE_DIR/NAME/NAME_NNNN.EXT" in line and "holds 1.jpg, 2.jpg" in line

    pairs.write_text("alice 1 2\nAlice Smith 1 2\n")
    line = one_error_line(capsys, make_bin.main, [root / "faces", pairs, out])
    assert f"{pairs}:2: image number must be an int, got 'Smith'; expected 'name n1 n2'" in line
    pairs.write_text("../faces 1 2\n")
    assert "identity name '../faces' is not a folder name" in one_error_line(
        capsys, make_bin.main, [root / "faces", pairs, out])
    pairs.write_bytes(b"alice\xff 1 2\n")
    assert "not a UTF-8 text pairs list" in one_error_line(capsys, make_bin.main, [root / "faces", pairs, out])
    assert "missing.txt" in one_error_line(capsys, make_bin.main, [root / "faces", root / "missing.txt", out])
    pairs.write_text("alice 1 2\n")
    line = one_error_line(capsys, make_bin.main, [root / "faces", pairs, root / "no" / "out.bin"])
    assert "output folder does not exist" in line
    assert not out.exists()


def test_ijb_bad_features_file_is_one_line(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a.jpg 1 1\nb.jpg 2 2\n")
    (tmp_path / "p.txt").write_text("1 2 0\n")
    np.save(tmp_path / "f.npy", np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    line = one_error_line(capsys, ijb.main, ["--templates", tmp_path / "t.txt", "--pairs", tmp_path / "p.txt",
                                             "--features", tmp_path / "f.npy", "--out-dir", tmp_path])
    assert "f.npy: not a numeric .npy feature array" in line
