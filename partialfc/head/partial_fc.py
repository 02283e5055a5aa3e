"""PartialFC: the model-parallel, sampled, sub-center margin softmax head.

One step on every rank (DESIGN.md section 2):

1. normalize the local embeddings, all-gather them (differentiable) and the labels;
2. sample this rank's classes (all of them at ``sample_rate == 1``);
3. compute, for the kept centers only, each row's local log-sum-exp and (where this
   rank owns the target) the margined target logit -- by the fused kernel, its
   chunked torch twin, or the naive full-logit baseline;
4. combine across ranks: ``lse = log sum_r exp(lse_r)``, ``t = sum_r t_r``; the loss is
   ``mean(lse - t)`` over the global batch, identical on every rank;
5. optionally add the ArcFace paper's geodesic penalties (intra, inter, triplet; see
   ``partialfc.head.geodesic``), each a weighted mean over the global batch. With all
   weights 0 (the default) step 5 is skipped: the loss is exactly steps 1-4.

The centers' gradient is row-sparse (only kept rows), so the optimizer in
``partialfc.optim`` touches only those rows and their momentum.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from partialfc.distributed import collectives
from partialfc.distributed.shards import class_shard
from partialfc.head import geodesic
from partialfc.head.center_grad_fold import RowGradStash, fold_into
from partialfc.head.label_check import check_label_range
from partialfc.head.margins import CombinedMargin
from partialfc.head.sampling import sample_classes, target_positions

HEAD_IMPLS = ("auto", "gemm", "triton", "torch", "naive")
log = logging.getLogger("partialfc.head")


class PartialFC(nn.Module):
    """This rank's shard of the class centers and the distributed margin softmax.

    ``weight`` is ``(num_local * K, embedding_size)``, row ``c * K + k`` is sub-center
    ``k`` of local class ``c`` (global id ``class_start + c``).

    ``intra_weight``, ``inter_weight``, ``triplet_weight`` (>= 0, default 0 = off) add
    the geodesic penalties of ``partialfc.head.geodesic`` to the loss, the triplet
    hinge with margin ``triplet_margin`` radians.
    """

    def __init__(
        self,
        margin: CombinedMargin,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        num_subcenters: int = 1,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        impl: str = "auto",
        chunk_size: Optional[int] = None,
        seed: int = 0,
        init_std: float = 0.01,
        check_labels: bool = True,
        shard_of: Optional[tuple[int, int]] = None,
        compute_dtype: torch.dtype = torch.float32,
        intra_weight: float = 0.0,
        inter_weight: float = 0.0,
        triplet_weight: float = 0.0,
        triplet_margin: float = geodesic.DEFAULT_TRIPLET_MARGIN,
    ) -> None:
        super().__init__()
        if not isinstance(margin, CombinedMargin):
            raise TypeError(f"margin must be a CombinedMargin, got {type(margin).__name__}")
        if not isinstance(embedding_size, int) or embedding_size <= 0:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if not isinstance(num_subcenters, int) or num_subcenters < 1:
            raise ValueError(f"num_subcenters must be an int >= 1, got {num_subcenters!r}")
        if not isinstance(sample_rate, (int, float)) or not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        if impl not in HEAD_IMPLS:
            raise ValueError(f"head impl must be one of {HEAD_IMPLS}, got {impl!r}")
        self.geodesic = geodesic.GeodesicPenalties(intra_weight, inter_weight, triplet_weight, triplet_margin)
        if self.geodesic.inter > 0 and num_classes < 2:
            raise ValueError(f"inter_weight > 0 needs at least 2 classes, got num_classes={num_classes}")
        if self.geodesic.inter > 0 and sample_rate < 1.0:
            log.info("inter-loss at sample_rate %s: the mean angle to the centers kept each step (the batch's "
                     "classes + a uniform sample), not to all N - 1 others; exact only at sample_rate 1",
                     sample_rate)
        self.margin = margin
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.num_subcenters = num_subcenters
        self.process_group = process_group
        self.impl = impl
        self.chunk_size = chunk_size
        self.check_labels = check_labels
        # Rows every rank holds per forward, when the caller guarantees it (the trainer: every
        # BatchSource yields full batches). Then the all-gather needs no size exchange (no host sync).
        self.expected_batch_size: Optional[int] = None
        # Dtype of the gathered embeddings fed to the margin-softmax op: bf16/fp16 halve the
        # all-gather and let the Triton kernel use tensor cores (fp32 accumulation inside).
        self.compute_dtype = compute_dtype

        self.world_size = collectives.world_size(process_group)
        self.rank = collectives.rank(process_group)
        if shard_of is not None:
            # (rank, world_size) of a layout to build without a process group: tools
            # and tests that inspect one shard of a larger job. Forward needs the group.
            if collectives.is_distributed(process_group):
                raise ValueError("shard_of is only for use without a process group")
            self.rank, self.world_size = shard_of
        shard = class_shard(num_classes, self.world_size, self.rank)  # raises if C < W
        self.class_start = shard.class_start
        self.num_local = shard.num_local

        # Seeded by (seed, rank) so a run is reproducible without building the full matrix.
        init_generator = torch.Generator().manual_seed(seed * 100003 + self.rank)
        weight = torch.randn(self.num_local * num_subcenters, embedding_size, generator=init_generator)
        self.weight = nn.Parameter(weight * init_std)
        # Sampling stream, per rank; saved in checkpoints so a resumed run samples alike.
        self.sampling_generator: Optional[torch.Generator] = None
        self.sampling_seed = seed * 100003 + 7919 + self.rank
        self.last_num_sampled = self.num_local
        # Detached values of the geodesic terms of the last forward (empty when all are off).
        self.last_geodesic_terms: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes}, shard=[{self.class_start}, {self.class_start + self.num_local}), "
            f"K={self.num_subcenters}, D={self.embedding_size}, sample_rate={self.sample_rate}, "
            f"impl={self.impl}, margin={self.margin}"
            + (f", geodesic={self.geodesic}" if self.geodesic.active else "")
        )

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.sampling_generator is None or self.sampling_generator.device != device:
            self.sampling_generator = torch.Generator(device=device).manual_seed(self.sampling_seed)
        return self.sampling_generator

    def sampler_state(self) -> torch.Tensor:
        return self._generator(self.weight.device).get_state()

    def load_sampler_state(self, state: torch.Tensor) -> None:
        self._generator(self.weight.device).set_state(state)

    def _validate(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be (batch, {self.embedding_size}), got shape {tuple(embeddings.shape)}"
            )
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must be (batch,) = ({embeddings.shape[0]},), got shape {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if self.check_labels:
            # One host sync, deliberately: a label out of range would otherwise silently
            # add a wrong loss term. The trainer turns this off and checks without a sync.
            check_label_range(labels, self.num_classes)

    def _gather(self, normalized: torch.Tensor, labels: torch.Tensor):
        """Gathered embeddings and labels (padded when ranks hold different batch sizes),
        and the offset of this rank's rows in the gathered batch."""
        return collectives.all_gather_batch(normalized, labels, self.process_group, self.expected_batch_size)

    # ------------------------------------------------------------------ forward
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean margin-softmax loss over the global batch; the same value on every rank."""
        self._validate(embeddings, labels)
        labels = labels.to(device=embeddings.device, dtype=torch.long)
        normalized = F.normalize(embeddings.float(), dim=1).to(self.compute_dtype)
        all_embeddings, all_labels, local_offset = self._gather(normalized, labels)
        if all_labels.numel() == 0:
            raise ValueError("the global batch is empty on every rank")

        device = all_labels.device
        if self.sample_rate < 1.0:
            local = all_labels - self.class_start
            owned = (local >= 0) & (local < self.num_local)
            positives = torch.unique(local[owned])
            class_index = sample_classes(positives, self.num_local, self.sample_rate, self._generator(device))
        else:
            class_index = torch.arange(self.num_local, device=device)
        self.last_class_index = class_index  # for metrics and tests; no copy
        self.last_num_sampled = class_index.numel()
        positions = target_positions(all_labels, self.class_start, self.num_local, class_index)

        from partialfc.kernels import margin_softmax_stats  # lazy: the Triton module is optional

        weight, stash = self.weight, None
        if self.geodesic.reads_centers and self.weight.requires_grad and torch.is_grad_enabled():
            # One alias of the centers for the softmax and the penalties: their row gradients
            # are added into the softmax's sparse gradient in place, not summed into a copy.
            stash = RowGradStash(class_index, self.num_subcenters)
            weight = fold_into(self.weight, stash)
        local_lse, local_target = margin_softmax_stats(
            all_embeddings, weight, class_index, positions, self.num_subcenters, self.margin,
            impl=self.impl, chunk_size=self.chunk_size,
        )
        lse = collectives.global_logsumexp(local_lse, self.process_group)
        target = collectives.sum_across_ranks_local_grad(local_target, self.process_group)
        loss = (lse - target).mean()
        if self.geodesic.active:
            loss = loss + self._geodesic_penalty(all_embeddings, all_labels, class_index, positions,
                                                 local_offset, labels.shape[0], weight, stash)
        return loss

    def _geodesic_penalty(self, all_embeddings, all_labels, class_index, positions, local_offset, num_local_rows,
                          weight, stash):
        """Weighted sum of the switched-on geodesic terms (``partialfc.head.geodesic``)."""
        from partialfc.kernels.margin_softmax_ref import tile_classes

        penalties, group = self.geodesic, self.process_group
        # Angles in the centers' precision (fp32), also when the softmax ran in bf16/fp16.
        x = all_embeddings.to(self.weight.dtype)
        terms = {}
        if penalties.intra > 0 or penalties.inter > 0:
            cos_y, w_y = geodesic.matched_target_centers(x, weight, class_index, positions,
                                                         self.num_subcenters, stash)
            if penalties.intra > 0:
                # Only the owner's entry is nonzero: the sum is the cosine; its gradient stays local.
                terms["intra"] = geodesic.intra_loss(collectives.sum_across_ranks_local_grad(cos_y, group))
            if penalties.inter > 0:
                targets = collectives.all_reduce_with_grad(w_y, group)  # every rank needs every W_y
                terms["inter"] = geodesic.inter_loss(
                    targets, weight, class_index, positions, self.num_subcenters,
                    tile=tile_classes(self.num_subcenters, self.chunk_size),
                    group=group, stash=stash,
                )
        if penalties.triplet > 0:
            terms["triplet"] = geodesic.angular_triplet_loss(x, all_labels, local_offset, num_local_rows,
                                                             penalties.triplet_margin, group)
        self.last_geodesic_terms = {name: value.detach() for name, value in terms.items()}
        weights = {"intra": penalties.intra, "inter": penalties.inter, "triplet": penalties.triplet}
        return sum(weights[name] * value for name, value in terms.items())
