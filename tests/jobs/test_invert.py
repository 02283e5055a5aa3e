"""Inversion: the BN prior and image priors against direct numpy computations, target
loading and its errors, a short inversion that must reach its targets, and the
command line job end to end on a checkpoint written by the real checkpoint code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from partialfc import CombinedMargin, PartialFC
from partialfc.checkpoint import save_checkpoint
from partialfc.invert import main as invert_main
from partialfc.inversion.bn_prior import BatchNormStatisticsPrior
from partialfc.inversion.losses import l2_norm, total_variation
from partialfc.inversion.optimize import InversionSettings, invert
from partialfc.inversion.report import make_grid
from partialfc.inversion.targets import (
    class_cosines,
    class_targets,
    embedding_targets,
    pool_subcenters,
    read_aligned_image,
)
from partialfc.models import build_backbone, list_backbones, register_backbone, save_backbone

NUM_CLASSES = 7
NUM_SUBCENTERS = 2
EMBEDDING_SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions: one thread is as fast and immune to a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(count: int, generator: torch.Generator) -> torch.Tensor:
    """Low-frequency colour blobs in the normalized pixel range: our stand-in for faces."""
    low = torch.randn(count, 3, 8, 8, generator=generator) * 0.5
    return F.interpolate(low, size=(112, 112), mode="bilinear", align_corners=False).clamp(-0.99, 0.99)


def calibrate_batchnorm(model: nn.Module, generator: torch.Generator, batches: int = 3) -> nn.Module:
    """Running statistics = exact statistics of smooth images (cumulative average), then eval."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(smooth_images(16, generator))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    return model.eval()


class FlipSymmetricNet(nn.Module):
    """A small conv net with BatchNorm2d whose embedding is exactly flip invariant
    (it sums the embeddings of x and its mirror image), like a trained face model
    roughly is, so random flips during inversion do not fight the target."""

    def __init__(self, embedding_size: int = 24):
        super().__init__()

        def block(cin, cout, kernel, stride):
            padding = kernel // 2 if stride == 1 else 0
            return [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)]

        # Average pooling first: the net sees a smooth 28 x 28 image, so a jitter of a
        # few pixels changes its input a little instead of re-sampling a stride-4 grid.
        self.body = nn.Sequential(nn.AvgPool2d(4), *block(3, 8, 3, 1), *block(8, 16, 2, 2), *block(16, 32, 2, 2),
                                  *block(32, 32, 3, 1))
        self.fc = nn.Linear(32 * 7 * 7, embedding_size)

    def forward(self, images):
        both = self.body(torch.cat([images, torch.flip(images, dims=[3])])).flatten(1)
        embeddings = self.fc(both)
        return embeddings[: images.shape[0]] + embeddings[images.shape[0]:]


class NoBatchNormNet(nn.Module):
    def __init__(self, embedding_size: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, 8)
        self.fc = nn.Linear(4 * 14 * 14, embedding_size)

    def forward(self, images):
        return self.fc(self.conv(images).flatten(1))


def no_batchnorm_backbone(embedding_size: int = 8) -> NoBatchNormNet:
    return NoBatchNormNet(embedding_size)


def registered_no_batchnorm_backbone() -> str:
    """Register (once per process) a backbone without BatchNorm, so a backbone file can hold one."""
    name = "test_invert_no_batchnorm"
    if name not in list_backbones():
        register_backbone(name)(no_batchnorm_backbone)
    return name


# ----------------------------------------------------------------------------- priors
def test_bn_prior_matches_numpy_statistics_on_odd_shapes():
    torch.manual_seed(0)
    conv1, bn1 = nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5)
    conv2, bn2 = nn.Conv2d(5, 7, 2, stride=2), nn.BatchNorm2d(7)
    model = nn.Sequential(conv1, bn1, nn.ReLU(), conv2, bn2).eval()
    for bn in (bn1, bn2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    images = torch.randn(5, 3, 9, 13)

    with BatchNormStatisticsPrior(model, first_layer_weight=3.5) as prior:
        model(images)
        got_layers = [float(v.detach()) for v in prior.layer_losses()]
        got_total = float(prior.loss().detach())
    # Hooks are removed on exit: a new forward does not touch the recorded values.
    assert all(not bn._forward_hooks for bn in (bn1, bn2))

    def layer_loss(features: np.ndarray, bn: nn.BatchNorm2d) -> float:
        channels_last = features.transpose(1, 0, 2, 3).reshape(features.shape[1], -1)
        mean, var = channels_last.mean(axis=1), channels_last.var(axis=1)  # biased, as BN uses
        return float(np.linalg.norm(mean - bn.running_mean.double().numpy())
                     + np.linalg.norm(var - bn.running_var.double().numpy()))

    with torch.no_grad():
        first = conv1(images).double().numpy()
        normalized = (first - bn1.running_mean.double().numpy()[None, :, None, None]) / np.sqrt(
            bn1.running_var.double().numpy()[None, :, None, None] + bn1.eps)
        affine = normalized * bn1.weight.double().numpy()[None, :, None, None] + bn1.bias.double().numpy()[None, :, None, None]
        second = conv2(torch.from_numpy(np.maximum(affine, 0)).float()).double().numpy()
    expected = [layer_loss(first, bn1), layer_loss(second, bn2)]
    np.testing.assert_allclose(got_layers, expected, rtol=1e-4)
    np.testing.assert_allclose(got_total, 3.5 * expected[0] + expected[1], rtol=1e-4)


def test_bn_prior_refuses_a_model_without_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm2d layers"):
        BatchNormStatisticsPrior(NoBatchNormNet())


def test_total_variation_and_l2_match_numpy():
    images = torch.randn(2, 3, 7, 11, dtype=torch.float64)
    array = images.numpy()
    expected_tv = [
        np.sqrt(np.sum(np.diff(image, axis=2) ** 2)) + np.sqrt(np.sum(np.diff(image, axis=1) ** 2))
        for image in array
    ]
    np.testing.assert_allclose(total_variation(images).numpy(), expected_tv, rtol=1e-10)
    np.testing.assert_allclose(l2_norm(images).numpy(), [np.sqrt((image ** 2).sum()) for image in array])
    flat = torch.ones(1, 3, 5, 5)
    assert float(total_variation(flat)) == 0.0


# ----------------------------------------------------------------------------- targets
def test_subcenter_pooling_and_class_cosines_match_numpy():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(5, 3, 6))
    unit = centers / np.linalg.norm(centers, axis=2, keepdims=True)
    mean = unit.mean(axis=1)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    torch_centers = torch.from_numpy(centers).float()
    np.testing.assert_allclose(pool_subcenters(torch_centers).numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(pool_subcenters(torch_centers, 2).numpy(), unit[:, 2], atol=1e-6)
    with pytest.raises(ValueError, match="subcenter index 3 is out of range.*K = 3"):
        pool_subcenters(torch_centers, 3)

    embeddings = rng.normal(size=(4, 6))
    unit_embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    expected = np.array([[max(unit_embeddings[b] @ unit[c, k] for k in range(3)) for c in range(5)]
                         for b in range(4)])
    got = class_cosines(torch.from_numpy(embeddings).float(), torch_centers).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_unknown_class_id_names_the_id_and_the_class_count():
    centers = torch.randn(5, 2, 8)
    assert [t.class_id for t in class_targets(centers, [4, 0])] == [4, 0]
    with pytest.raises(ValueError, match=r"unknown class id 7: ckpt has 5 classes \(valid ids 0\.\.4\)"):
        class_targets(centers, [1, 7], where="ckpt")


def test_image_of_the_wrong_size_and_missing_image(tmp_path):
    path = tmp_path / "face.png"
    Image.fromarray(np.zeros((112, 100, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"face\.png: image is 100x112"):
        read_aligned_image(path, (112, 112))
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_aligned_image(tmp_path / "nothere.png", (112, 112))
    good = tmp_path / "good.png"
    pixels = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(good)
    loaded = read_aligned_image(good, (112, 112))
    assert loaded.dtype == torch.uint8
    np.testing.assert_array_equal(loaded.numpy(), pixels.transpose(2, 0, 1))


def test_embedding_file_targets_and_errors(tmp_path):
    rows = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    np.save(tmp_path / "emb.npy", rows)
    targets = embedding_targets(tmp_path / "emb.npy", 8)
    expected = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(np.stack([t.vector.numpy() for t in targets]), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"emb\.npy: embeddings have D = 8, the backbone's embedding size is 16"):
        embedding_targets(tmp_path / "emb.npy", 16)
    rows[1] = 0
    np.save(tmp_path / "zero.npy", rows)
    with pytest.raises(ValueError, match=r"rows \[1\] are zero"):
        embedding_targets(tmp_path / "zero.npy", 8)


def test_grid_layout():
    pixels = np.stack([np.full((3, 4, 3), value, np.uint8) for value in (10, 20, 30)])
    grid = make_grid(pixels, columns=2)
    assert grid.shape == (2 * 5 + 2, 2 * 6 + 2, 3)
    assert (grid[2:5, 2:6] == 10).all() and (grid[2:5, 8:12] == 20).all() and (grid[7:10, 2:6] == 30).all()
    assert (grid[7:10, 8:12] == 255).all()  # the empty cell stays background


# ----------------------------------------------------------------------------- the loop
def test_short_inversion_reaches_its_targets_and_lowers_the_bn_loss():
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = calibrate_batchnorm(FlipSymmetricNet(), generator)
    with torch.no_grad():
        targets = model(smooth_images(3, generator))
        noise = model(torch.randn(3, 3, 112, 112, generator=generator).clamp(-0.99, 0.99))
    # bn_weight above the default: this net's BN loss is small next to the cosine term, and
    # without a real pull (0.01 gives ~0.86 x the start) the "BN loss falls" check would be idle.
    settings = InversionSettings(steps=80, jitter=2, bn_weight=0.3, seed=5, progress=False)
    result = invert(model, targets, settings)

    assert result.images.shape == (3, 3, 112, 112)
    assert float(result.images.abs().max()) <= 127.5 / 128 + 1e-6
    with torch.no_grad():
        final = model(result.images)
    cos = F.normalize(final, dim=1) @ F.normalize(targets, dim=1).t()
    noise_cos = F.normalize(noise, dim=1) @ F.normalize(targets, dim=1).t()
    for index in range(3):
        others = [cos[index, other] for other in range(3) if other != index]
        assert cos[index, index] > max(others) + 0.2, cos
        assert cos[index, index] > noise_cos[:, index].max() + 0.2, (cos, noise_cos)
    assert result.bn_loss_after < 0.5 * result.bn_loss_before
    assert result.history[-1]["cosine"] > result.history[0]["cosine"]
    # The model is handed back as it came.
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_inversion_is_reproducible_with_a_seed():
    generator = torch.Generator().manual_seed(2)
    model = calibrate_batchnorm(FlipSymmetricNet(), generator, batches=1)
    targets = torch.randn(2, 24, generator=generator)
    settings = InversionSettings(steps=3, seed=9, progress=False)
    first, second = invert(model, targets, settings), invert(model, targets, settings)
    torch.testing.assert_close(first.images, second.images, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by partialfc.checkpoint.save_checkpoint: a calibrated
    mobilefacenet_tiny and a K = 2 head whose centers are embeddings of smooth images."""
    root = tmp_path_factory.mktemp("invert_run")
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    kwargs = {"embedding_size": EMBEDDING_SIZE}
    backbone = calibrate_batchnorm(build_backbone("mobilefacenet_tiny", **kwargs), generator)
    head = PartialFC(CombinedMargin(scale=16.0, m1=1.0, m2=0.3, m3=0.0), EMBEDDING_SIZE, NUM_CLASSES,
                     num_subcenters=NUM_SUBCENTERS)
    with torch.no_grad():
        head.weight.copy_(backbone(smooth_images(NUM_CLASSES * NUM_SUBCENTERS, generator)))
    step_dir = save_checkpoint(
        root, step=3, position={}, config_dict={}, backbone_name="mobilefacenet_tiny", backbone_kwargs=kwargs,
        backbone_state=backbone.state_dict(), head=head, engine_state=None,
        head_optimizer=torch.optim.SGD([head.weight], lr=0.1), keep_last=1,
    )
    face = root / "face.png"
    Image.fromarray(((smooth_images(1, generator)[0].permute(1, 2, 0).numpy() * 128) + 127.5)
                    .round().clip(0, 255).astype(np.uint8)).save(face)
    np.save(root / "emb.npy", np.random.default_rng(4).normal(size=(EMBEDDING_SIZE,)).astype(np.float32))
    weight = head.weight.detach().double().numpy().reshape(NUM_CLASSES, NUM_SUBCENTERS, EMBEDDING_SIZE)
    return {"root": root, "step_dir": step_dir, "face": face, "emb": root / "emb.npy", "weight": weight}


def embed_png(model, path, mirror: bool = False) -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    if mirror:
        pixels = pixels[:, ::-1]
    images = torch.from_numpy((pixels.transpose(2, 0, 1)[None] - 127.5) / 128.0).float()
    with torch.no_grad():
        return model(images)[0].double().numpy()


def test_job_writes_images_grid_and_a_report_that_matches_the_pngs(checkpoint, tmp_path):
    from partialfc.models import load_backbone

    out = tmp_path / "inverted"
    argv = [str(checkpoint["root"]), "--out", str(out), "--classes", "2", "5", "--images", str(checkpoint["face"]),
            "--embeddings", str(checkpoint["emb"]), "--steps", "12", "--no-progress", "--seed", "3",
            # A random backbone is not shift / flip invariant as a trained one is, and its deep BN
            # statistics are huge: without jitter and with a small BN weight 12 steps reach the targets.
            "--jitter", "0", "--no-flip", "--bn-weight", "3e-4"]
    assert invert_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [t["label"] for t in report["targets"]] == ["class2", "class5", "face", "emb0"]
    assert report["checkpoint"] == str(checkpoint["step_dir"])
    assert report["bn_loss"]["after"] < report["bn_loss"]["before"]
    model = load_backbone(checkpoint["step_dir"])

    # The close-set target is the normalized mean of the normalized sub-centers (numpy, from the head rows).
    unit = checkpoint["weight"] / np.linalg.norm(checkpoint["weight"], axis=2, keepdims=True)
    class_vectors = {c: unit[c].mean(axis=0) / np.linalg.norm(unit[c].mean(axis=0)) for c in (2, 5)}
    # Open-set targets: the face's image + mirror embedding, and the .npy row, both normalized.
    face = embed_png(model, checkpoint["face"]) + embed_png(model, checkpoint["face"], mirror=True)
    vectors = {"face": face / np.linalg.norm(face), "emb0": np.load(checkpoint["emb"]).astype(np.float64)}
    vectors["emb0"] /= np.linalg.norm(vectors["emb0"])
    vectors.update({f"class{c}": vector for c, vector in class_vectors.items()})
    for entry in report["targets"]:
        with Image.open(out / entry["file"]) as image:
            assert image.size == (112, 112) and image.mode == "RGB"
        embedding = embed_png(model, out / entry["file"])
        embedding /= np.linalg.norm(embedding)
        np.testing.assert_allclose(entry["cosine_to_target"], embedding @ vectors[entry["label"]], atol=1e-4)
        if entry["kind"] == "class":
            per_class = np.max(unit @ embedding, axis=1)  # head pooling: max over sub-centers
            per_class[entry["class_id"]] = -np.inf
            assert entry["nearest_other_class"] == int(np.argmax(per_class))
            np.testing.assert_allclose(entry["cosine_to_nearest_other_class"], per_class.max(), atol=1e-4)
        assert entry["cosine_to_target"] > entry["cosine_to_target_at_start"] + 0.3, entry
        assert entry["cosine_to_target"] > entry["cosine_to_nearest_other_target"] + 0.2, entry
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (4 * 114 + 2, 114 + 2)
    # An existing output is not silently replaced.
    assert invert_main(argv) == 2
    assert invert_main(argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["inverted"]  # no temp dirs left behind


def test_job_errors_name_the_offending_input(checkpoint, tmp_path, capsys):
    root, out = str(checkpoint["root"]), str(tmp_path / "out")

    def error_of(*argv) -> str:
        assert invert_main(["--out", out, "--steps", "1", "--no-progress"] + list(argv)) == 2
        return capsys.readouterr().err

    assert "unknown class id 9" in error_of(root, "--classes", "1", "9")
    assert f"has {NUM_CLASSES} classes" in error_of(root, "--classes", "9")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(small)
    message = error_of(root, "--images", str(small))
    assert "small.png" in message and "64x64" in message
    assert "missing.png" in error_of(root, "--images", str(tmp_path / "missing.png"))
    assert "does not exist" in error_of(str(tmp_path / "nowhere"), "--classes", "1")
    assert "no targets" in error_of(root)
    assert "subcenter index 5 is out of range" in error_of(root, "--classes", "1", "--subcenter", "5")
    assert "steps must be an int >= 1, got 0" in error_of(root, "--classes", "1", "--steps", "0")
    backbone_file = checkpoint["step_dir"] / "backbone.pt"
    assert "needs a checkpoint directory with head shards" in error_of(str(backbone_file), "--classes", "0")
    no_bn = tmp_path / "nobn.pt"
    save_backbone(no_bn, registered_no_batchnorm_backbone(), {"embedding_size": 8}, NoBatchNormNet(8).state_dict())
    assert "no BatchNorm2d layers" in error_of(str(no_bn), "--embeddings", str(checkpoint["emb"]))
    assert not (tmp_path / "out").exists()
