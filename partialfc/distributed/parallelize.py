"""Wrap the backbone for data parallelism (the head stays outside: it is model-parallel).

The loss every rank back-propagates is the mean over the *global* batch, and the
head's all-gather already returns to each rank the full gradient of that loss with
respect to its own embeddings. A backbone parameter's true gradient is therefore the
*sum* of the ranks' gradients, not their mean; DDP's default hook divides by the world
size, so we register a hook that only sums. (insightface reaches the same result by
scaling the loss; a named hook says what it does.)
"""
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from partialfc.distributed import collectives


def _allreduce_sum_hook(process_group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_backbone(model: nn.Module, device: torch.device, process_group=None) -> nn.Module:
    """DDP with summed gradients when distributed; the module itself otherwise."""
    if not collectives.is_distributed(process_group):
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():
        # Rank-local BatchNorm statistics, as in insightface; newer torch deprecates
        # the flag's name but offers no replacement that skips the initial sync yet.
        warnings.simplefilter("ignore", FutureWarning)
        ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=process_group,
                                      broadcast_buffers=False)
    ddp.register_comm_hook(process_group, _allreduce_sum_hook)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
