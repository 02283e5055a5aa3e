"""Verification on synthetic .bin sets whose answer is known, and the embedding math vs numpy."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from eval_helpers import (
    FixedProjection,
    encode_png,
    fixed_projection_numpy,
    random_images,
    save_tiny_backbone,
)
from partialfc.eval import verification
from partialfc.eval.bin_format import write_bin
from partialfc.eval.verification import (
    clear_bin_cache,
    embed_images,
    evaluate_bin_sets,
    evaluate_embeddings,
    load_bin,
)


def make_known_answer_bin(path, rng, num_same, num_different, size=16):
    """Same pairs hold one image twice; different pairs two independent random images."""
    bins, issame = [], []
    kinds = np.array([True] * num_same + [False] * num_different)
    rng.shuffle(kinds)
    for same in kinds:
        first = encode_png(random_images(rng, 1, size, size)[0])
        second = first if same else encode_png(random_images(rng, 1, size, size)[0])
        bins += [first, second]
        issame.append(bool(same))
    write_bin(path, bins, issame)
    return kinds


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_bin_cache()
    yield
    clear_bin_cache()


def test_embed_images_matches_numpy_flip_sum_normalize():
    rng = np.random.default_rng(5)
    images = random_images(rng, 7, 112, 112).transpose(0, 3, 1, 2).copy()
    model = FixedProjection(embedding_size=40, seed=3)
    model.train()
    got = embed_images(model, torch.from_numpy(images), batch_size=3, device="cpu")
    expected = fixed_projection_numpy(model, images)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert model.training, "the model's mode must be restored"
    # The flip matters for this model: the unflipped-only embedding is different.
    unflipped = torch.nn.functional.normalize(model(
        (torch.from_numpy(images).float() - 127.5) / 128.0), dim=1).detach().numpy()
    assert np.abs(unflipped - got).max() > 1e-2


def test_known_answer_set_is_perfect_with_tar_at_far(tmp_path):
    rng = np.random.default_rng(11)
    path = tmp_path / "synthetic_set.bin"
    make_known_answer_bin(path, rng, num_same=60, num_different=1000)
    model = FixedProjection(embedding_size=64, seed=1)
    results = evaluate_bin_sets(model, [path], batch_size=256, device="cpu", image_size=(16, 16))
    metrics = results["synthetic_set"]
    assert metrics["accuracy"] == 1.0 and metrics["std"] == 0.0
    # Identical images score exactly 1; random ones far below.
    assert 0.5 < metrics["threshold"] < 1.0
    assert metrics["tar@far=1e-03"] == 1.0
    assert "tar@far=1e-04" not in metrics  # 1000 negatives cannot resolve 1e-4


def test_accuracy_drops_to_chance_for_an_image_blind_model(tmp_path):
    # A model that ignores its input gives every pair score 1: accept-all or reject-all,
    # so k-fold accuracy is the held-out share of the majority class of the training folds.
    rng = np.random.default_rng(2)
    kinds = make_known_answer_bin(tmp_path / "blind.bin", rng, num_same=30, num_different=70)

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.ones(8))

        def forward(self, images):
            return self.bias.expand(images.shape[0], 8)

    metrics = evaluate_bin_sets(Constant(), [tmp_path / "blind.bin"], 32, "cpu", image_size=(16, 16))["blind"]
    folds = np.array_split(kinds, 10)
    expected = np.mean([np.mean(~fold) for fold in folds])  # reject-all wins every training split
    assert metrics["accuracy"] == pytest.approx(expected)


def test_evaluate_embeddings_against_direct_cosine():
    rng = np.random.default_rng(4)
    embeddings = rng.standard_normal((2 * 150, 12))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    issame = rng.random(150) < 0.5
    # Make same pairs closer, so accuracy is meaningful but not perfect.
    embeddings[1::2][issame] += 0.8 * embeddings[0::2][issame]
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    metrics = evaluate_embeddings(embeddings, issame)
    from partialfc.eval.metrics_math import kfold_threshold_accuracy

    cosines = np.array([embeddings[2 * i] @ embeddings[2 * i + 1] for i in range(150)])
    direct = kfold_threshold_accuracy(cosines, issame, 10)
    assert metrics["accuracy"] == pytest.approx(direct.accuracy)
    assert 0.6 < metrics["accuracy"] < 1.0


def test_load_bin_is_cached_and_reloads_a_rewritten_file(tmp_path):
    rng = np.random.default_rng(8)
    path = tmp_path / "c.bin"
    make_known_answer_bin(path, rng, 3, 2)
    first = load_bin(path, (16, 16))
    assert load_bin(str(path), (16, 16)) is first
    assert first.images.shape == (10, 3, 16, 16) and first.num_pairs == 5
    make_known_answer_bin(path, rng, 1, 1)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file systems
    second = load_bin(path, (16, 16))
    assert second is not first and second.num_pairs == 2


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="verification set not found: .*missing.bin"):
        load_bin(tmp_path / "missing.bin")
    model = FixedProjection()
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        embed_images(model, torch.zeros(2, 3, 16, 16, dtype=torch.uint8), batch_size=0)
    with pytest.raises(ValueError, match="images must be uint8"):
        embed_images(model, torch.zeros(2, 3, 16, 16), batch_size=2)
    with pytest.raises(ValueError, match="share a name"):
        evaluate_bin_sets(model, [tmp_path / "a" / "x.bin", tmp_path / "b" / "x.bin"])


def test_cli_on_a_saved_backbone(tmp_path, capsys):
    save_tiny_backbone(tmp_path / "backbone.pt")
    rng = np.random.default_rng(9)
    make_known_answer_bin(tmp_path / "tiny.bin", rng, 6, 6, size=112)
    out_json = tmp_path / "r.json"
    code = verification.main([str(tmp_path / "backbone.pt"), str(tmp_path / "tiny.bin"),
                              "--batch-size", "5", "--device", "cpu", "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("tiny: accuracy ")
    saved = json.loads(out_json.read_text())
    # Identical images score 1 whatever the weights, random pairs do not: perfect accuracy.
    assert saved["tiny"]["accuracy"] == 1.0
