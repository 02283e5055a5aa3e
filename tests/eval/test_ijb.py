"""IJB 1:1: media-then-template averaging, pair scores and TAR@FAR against direct numpy; PNG written."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from eval_helpers import encode_png, random_images, save_tiny_backbone
from partialfc.eval import ijb


def make_protocol(rng, num_templates=40, dim=24):
    """Templates of 1-4 media with 1-5 images each; ids deliberately not contiguous."""
    names, template_ids, media_ids = [], [], []
    next_media = 1000
    template_values = rng.permutation(np.arange(num_templates) * 7 + 3)
    for template in template_values:
        for _ in range(rng.integers(1, 5)):
            next_media += int(rng.integers(1, 3))
            for _ in range(rng.integers(1, 6)):
                names.append(f"{len(names)}.jpg")
                template_ids.append(int(template))
                media_ids.append(next_media)
    order = rng.permutation(len(names))  # records need not be grouped in the file
    features = rng.standard_normal((len(names), dim)) * rng.uniform(0.5, 2.0, (len(names), 1))
    return ([names[i] for i in order], np.array(template_ids)[order], np.array(media_ids)[order],
            features[order], template_values)


def direct_template_features(features, template_ids, media_ids, normalize_images):
    by_template = defaultdict(lambda: defaultdict(list))
    for feature, template, media in zip(features, template_ids, media_ids):
        if normalize_images:
            feature = feature / np.linalg.norm(feature)
        by_template[int(template)][int(media)].append(feature)
    out = {}
    for template, medias in by_template.items():
        total = sum(np.mean(images, axis=0) for images in medias.values())
        out[template] = total / np.linalg.norm(total)
    return out


@pytest.mark.parametrize("normalize_images", [False, True])
def test_template_features_match_direct_loops(normalize_images):
    rng = np.random.default_rng(7)
    _, template_ids, media_ids, features, _ = make_protocol(rng)
    ids, template_feats = ijb.template_features(features, template_ids, media_ids, normalize_images)
    expected = direct_template_features(features, template_ids, media_ids, normalize_images)
    assert sorted(expected) == ids.tolist()
    for row, template in enumerate(ids):
        np.testing.assert_allclose(template_feats[row], expected[int(template)], rtol=1e-5, atol=1e-6)


def test_media_averaging_stops_a_long_video_outvoting_a_photo():
    # One photo (media 1) along +x, a 9-frame video (media 2) along +y: equal weight.
    features = np.array([[1.0, 0.0]] + [[0.0, 1.0]] * 9)
    ids, feats = ijb.template_features(features, np.zeros(10, np.int64), np.array([1] + [2] * 9))
    np.testing.assert_allclose(feats[0], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


def direct_tar_at_far(scores, issame, far):
    """TAR at FAR by the (k+1)-th highest impostor score; continuous scores, no ties."""
    impostors = np.sort(scores[~issame])[::-1]
    allowed = int(np.floor(far * impostors.size + 1e-9))
    if allowed < 1:
        return None
    if allowed >= impostors.size:
        return 1.0
    return float(np.mean(scores[issame] > impostors[allowed]))


def test_roc_table_matches_direct_numpy():
    rng = np.random.default_rng(3)
    issame = rng.random(120_000) < 0.1
    scores = np.where(issame, 0.45, 0.0) + 0.12 * rng.standard_normal(issame.size)
    table = ijb.roc_table(scores, issame)
    assert list(table) == ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"]
    assert table["1e-06"] is None  # 108k impostors cannot resolve 1e-6
    for key, far in zip(table, ijb.IJB_FARS):
        expected = direct_tar_at_far(scores, issame, far)
        assert table[key] == (None if expected is None else pytest.approx(expected))
    assert 0.2 < table["1e-04"] < table["1e-03"] < table["1e-01"] < 1.0


def write_protocol_files(tmp_path, names, template_ids, media_ids, template_values, rng, num_pairs=300):
    (tmp_path / "tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, template_ids, media_ids)))
    first = rng.choice(template_values, num_pairs)
    second = rng.choice(template_values, num_pairs)
    labels = rng.integers(0, 2, num_pairs)
    (tmp_path / "pairs.txt").write_text(
        "".join(f"{a} {b} {c}\n" for a, b, c in zip(first, second, labels)))
    return first, second, labels.astype(bool)


def test_cli_with_features_writes_table_png_and_json(tmp_path, capsys):
    rng = np.random.default_rng(5)
    names, template_ids, media_ids, features, template_values = make_protocol(rng)
    first, second, labels = write_protocol_files(tmp_path, names, template_ids, media_ids,
                                                 template_values, rng)
    np.save(tmp_path / "feats.npy", features)
    out_dir = tmp_path / "out"
    code = ijb.main(["--templates", str(tmp_path / "tid_mid.txt"), "--pairs", str(tmp_path / "pairs.txt"),
                     "--features", str(tmp_path / "feats.npy"), "--out-dir", str(out_dir), "--name", "r18"])
    assert code == 0
    assert "1e-06" in capsys.readouterr().out
    with Image.open(out_dir / "roc.png") as png:
        assert png.format == "PNG" and png.size == (600, 450)
    saved = json.loads((out_dir / "tar_at_far.json").read_text())
    # Recompute the scores by direct loops, then TAR at 1e-1 by direct numpy.
    direct = direct_template_features(features, template_ids, media_ids, False)
    scores = np.array([direct[int(a)] @ direct[int(b)] for a, b in zip(first, second)])
    assert saved["tar_at_far"]["1e-01"] == pytest.approx(direct_tar_at_far(scores, labels, 0.1))
    assert saved["tar_at_far"]["1e-03"] is None


def test_cli_with_checkpoint_and_image_dir(tmp_path, capsys):
    rng = np.random.default_rng(6)
    save_tiny_backbone(tmp_path / "backbone.pt")
    names = [f"img/{i}.png" for i in range(8)]
    (tmp_path / "crops" / "img").mkdir(parents=True)
    for name, pixels in zip(names, random_images(rng, 8, 112, 112)):
        (tmp_path / "crops" / name).write_bytes(encode_png(pixels))
    (tmp_path / "tid_mid.txt").write_text(
        "".join(f"{name} {i // 2} {i}\n" for i, name in enumerate(names)))
    impostors = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (1, 0), (2, 0), (3, 0), (3, 2)]
    genuine = [(0, 0), (1, 1), (3, 3)]
    (tmp_path / "pairs.txt").write_text("".join(f"{a} {b} 0\n" for a, b in impostors)
                                        + "".join(f"{a} {b} 1\n" for a, b in genuine))
    code = ijb.main(["--templates", str(tmp_path / "tid_mid.txt"), "--pairs", str(tmp_path / "pairs.txt"),
                     "--checkpoint", str(tmp_path / "backbone.pt"), "--image-dir", str(tmp_path / "crops"),
                     "--out-dir", str(tmp_path / "o"), "--batch-size", "3", "--device", "cpu"])
    assert code == 0
    saved = json.loads((tmp_path / "o" / "tar_at_far.json").read_text())
    # Self pairs score exactly 1, above every impostor pair of random crops: at FAR 1e-1
    # (1 of 10 impostors) every genuine pair is accepted; finer FARs are not measurable.
    assert saved["tar_at_far"]["1e-01"] == 1.0
    assert saved["tar_at_far"]["1e-02"] is None
    assert (tmp_path / "o" / "roc.png").stat().st_size > 1000


def test_bad_inputs_name_file_and_record(tmp_path):
    (tmp_path / "t.txt").write_text("a.jpg 1 2\nb.jpg x 3\n")
    with pytest.raises(ValueError, match=r"t\.txt: record 2: template_id must be an int, got 'x'"):
        ijb.read_template_media(str(tmp_path / "t.txt"))
    (tmp_path / "p.txt").write_text("1 2 1\n1 2 3\n")
    with pytest.raises(ValueError, match=r"p\.txt: record 2: label must be 0 or 1, got 3"):
        ijb.read_template_pairs(str(tmp_path / "p.txt"))
    (tmp_path / "p.txt").write_text("1 2\n")
    with pytest.raises(ValueError, match=r"p\.txt:1: expected"):
        ijb.read_template_pairs(str(tmp_path / "p.txt"))
    ids, feats = ijb.template_features(np.eye(2), np.array([4, 9]), np.array([1, 2]))
    with pytest.raises(ValueError, match="pair 2: template_id_2 5 has no images"):
        ijb.pair_scores(ids, feats, np.array([4, 4]), np.array([9, 5]))
