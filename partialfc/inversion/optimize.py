"""The inversion loop: Adam on the input pixels against the embedding and BN priors.

Per step: take the current images, apply a random jitter (a circular shift of
up to ``jitter`` pixels) and, with probability 1/2, a horizontal flip -- both
keep the image from overfitting to one exact pixel grid, which is what makes
the result look like a face instead of an adversarial pattern -- run the frozen
backbone, and minimize

    mean_i (1 - cos(f(x_i), t_i)) + bn_weight * BN prior + tv_weight * mean TV + l2_weight * mean L2

(see ``losses`` and ``bn_prior``). The images start from N(0, 1) in the
backbone's normalized space and are clamped after each step to the range real
pixels map to, ``[-127.5/128, 127.5/128]``, so what we save is what we optimized.
Adam with a cosine-decayed learning rate (0.25 at the start, as in the ArcFace
paper's inversion). On CUDA the forward runs under autocast (bf16 when the GPU
supports it, else fp16 with a gradient scaler); the BN statistics and the loss
are always float32. All randomness (start, jitter, flips) comes from one seeded
CPU generator, so a seed gives the same run on any device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from partialfc.inversion.bn_prior import BatchNormStatisticsPrior
from partialfc.inversion.losses import cosine_to_targets, l2_norm, total_variation
from partialfc.data.pixels import PIXEL_MEAN, PIXEL_SCALE

PIXEL_LOW = (0.0 - PIXEL_MEAN) / PIXEL_SCALE
PIXEL_HIGH = (255.0 - PIXEL_MEAN) / PIXEL_SCALE
AMP_MODES = ("auto", "none", "fp16", "bf16")


@dataclass(frozen=True)
class InversionSettings:
    """Knobs of the loop; the defaults are the documented ones (GPU scale)."""

    steps: int = 2000
    """Optimizer steps. 2000 on a GPU; a CPU demo with a tiny backbone uses ~100-300."""
    lr: float = 0.25
    """Adam learning rate at step 0, cosine-decayed to 0 at the last step."""
    bn_weight: float = 0.01
    """Weight of the BatchNorm statistic prior (sum over layers). DeepInversion's scale;
    raise it if the images stay noise-like, lower it if the cosine to the target stays low."""
    first_bn_weight: float = 10.0
    """Extra factor on the first BatchNorm layer's term (it sees the raw pixels)."""
    tv_weight: float = 1e-3
    """Weight of the total-variation prior (per-image norm of neighbour differences)."""
    l2_weight: float = 1e-4
    """Weight of the per-image L2 norm of the pixels."""
    jitter: int = 8
    """Largest random circular shift in pixels, per step, both axes (0 disables)."""
    flip: bool = True
    """Random horizontal flips per step."""
    seed: int = 0
    """Seeds the start images, jitter and flips."""
    amp: str = "auto"
    """auto (bf16/fp16 autocast on CUDA, none on CPU), none, fp16, bf16 (CUDA only)."""
    progress: bool = True
    """Show a progress bar (tqdm, on stderr)."""

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        for name in ("lr", "bn_weight", "first_bn_weight", "tv_weight", "l2_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int) or self.jitter < 0:
            raise ValueError(f"jitter must be an int >= 0, got {self.jitter!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")


@dataclass
class InversionResult:
    """Final images (B, 3, H, W) in normalized space on CPU, and how the run went."""

    images: torch.Tensor
    start_images: torch.Tensor
    bn_loss_before: float
    bn_loss_after: float
    start_embeddings: torch.Tensor
    """(B, D) float32 embeddings of the N(0, 1) start images, for a noise baseline."""
    history: List[dict] = field(default_factory=list)


def resolve_amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` on ``device`` (None: run in float32)."""
    if device.type != "cuda":
        if amp in ("fp16", "bf16"):
            raise ValueError(f"amp={amp!r} needs a CUDA device, the backbone is on {device}")
        return None
    if amp == "none":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


@torch.no_grad()
def measure(backbone: nn.Module, images: torch.Tensor, prior: BatchNormStatisticsPrior):
    """(embeddings, BN prior loss) of ``images`` as they are: float32, no jitter."""
    device = next(backbone.parameters()).device
    prior.reset()
    embeddings = backbone(images.to(device)).float()
    return embeddings.cpu(), float(prior.loss())


def _jitter_and_flip(images: torch.Tensor, settings: InversionSettings, generator: torch.Generator):
    if settings.jitter > 0:
        shifts = torch.randint(-settings.jitter, settings.jitter + 1, (2,), generator=generator).tolist()
        images = torch.roll(images, shifts=(shifts[0], shifts[1]), dims=(2, 3))
    if settings.flip and bool(torch.rand((), generator=generator) < 0.5):
        images = torch.flip(images, dims=[3])
    return images


def invert(backbone: nn.Module, targets: torch.Tensor, settings: InversionSettings,
           image_size=(112, 112)) -> InversionResult:
    """Optimize one image per row of ``targets`` (B, D) so that ``backbone`` maps it there.

    ``backbone`` is used frozen and in eval mode on its current device; its
    parameters' ``requires_grad`` and, for partialfc backbones, its own
    ``amp_dtype`` are switched off during the run and restored afterwards.
    """
    if targets.dim() != 2 or targets.shape[0] == 0:
        raise ValueError(f"targets must be a non-empty (B, D) tensor, got shape {tuple(targets.shape)}")
    device = next(backbone.parameters()).device
    amp_dtype = resolve_amp_dtype(settings.amp, device)
    generator = torch.Generator().manual_seed(settings.seed)
    start = torch.randn((targets.shape[0], 3, *image_size), generator=generator)
    unit_targets = F.normalize(targets.float(), dim=1).to(device)

    was_training = backbone.training
    saved_requires_grad = [p.requires_grad for p in backbone.parameters()]
    saved_amp_dtype = getattr(backbone, "amp_dtype", None)
    backbone.eval()
    backbone.requires_grad_(False)
    if hasattr(backbone, "amp_dtype"):
        backbone.amp_dtype = None  # precision is chosen here, once, for the whole forward
    try:
        with BatchNormStatisticsPrior(backbone, settings.first_bn_weight) as prior:
            start_embeddings, bn_before = measure(backbone, start, prior)
            images, history = _optimize(backbone, prior, start, unit_targets, settings, amp_dtype, generator)
            _, bn_after = measure(backbone, images, prior)
    finally:
        for parameter, flag in zip(backbone.parameters(), saved_requires_grad):
            parameter.requires_grad_(flag)
        if hasattr(backbone, "amp_dtype"):
            backbone.amp_dtype = saved_amp_dtype
        backbone.train(was_training)
    return InversionResult(images=images.detach().cpu(), start_images=start, bn_loss_before=bn_before,
                           bn_loss_after=bn_after, start_embeddings=start_embeddings, history=history)


def _optimize(backbone, prior, start, unit_targets, settings, amp_dtype, generator):
    """The step loop; returns (final images on the device, history records)."""
    from tqdm import tqdm

    device = unit_targets.device
    images = start.clone().to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    report_every = max(1, min(25, settings.steps // 20))
    history = []
    bar = tqdm(range(settings.steps), desc="invert", disable=not settings.progress, leave=False)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        prior.reset()
        views = _jitter_and_flip(images, settings, generator)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            embeddings = backbone(views)
        cosines = cosine_to_targets(embeddings.float(), unit_targets)
        embedding_loss = (1.0 - cosines).mean()
        bn_loss = prior.loss()
        prior_loss = (settings.tv_weight * total_variation(images).mean()
                      + settings.l2_weight * l2_norm(images).mean())
        loss = embedding_loss + settings.bn_weight * bn_loss + prior_loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        schedule.step()
        with torch.no_grad():
            images.clamp_(PIXEL_LOW, PIXEL_HIGH)
        if step % report_every == 0 or step == settings.steps - 1:
            # Host sync, on purpose and only every few steps: the progress bar and history.
            record = {"step": step, "loss": float(loss.detach()), "cosine": float(cosines.detach().mean()),
                      "bn_loss": float(bn_loss.detach())}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", cos=f"{record['cosine']:.3f}",
                            bn=f"{record['bn_loss']:.2f}")
    bar.close()
    return images.detach(), history
