"""Which classes each rank owns: the class-shard table of DESIGN.md section 2.

Rank ``r`` of ``W`` owns ``[start, start + n)`` with ``n = C // W + (r < C % W)`` and
``start = (C // W) * r + min(r, C % W)``: the first ``C % W`` ranks get one class
more. The same table re-cuts head shards when a checkpoint is resumed on another
world size, so it lives here, free of any process group.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassShard:
    """The contiguous range of global class ids one rank owns."""

    rank: int
    world_size: int
    num_classes: int
    class_start: int
    num_local: int

    @property
    def class_end(self) -> int:
        return self.class_start + self.num_local


def class_shard(num_classes: int, world_size: int, rank: int) -> ClassShard:
    """The shard of ``rank``; raises when the classes cannot cover every rank."""
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes={num_classes} is smaller than world_size={world_size}: "
            "every rank must own at least one class"
        )
    base, extra = divmod(num_classes, world_size)
    num_local = base + (1 if rank < extra else 0)
    class_start = base * rank + min(rank, extra)
    return ClassShard(rank, world_size, num_classes, class_start, num_local)


def all_shards(num_classes: int, world_size: int) -> list[ClassShard]:
    """Every rank's shard, in rank order (they tile ``[0, num_classes)``)."""
    return [class_shard(num_classes, world_size, r) for r in range(world_size)]
