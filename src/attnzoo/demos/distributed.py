"""Data-parallel training that gives the single-process result, up to reduction order.

Launched with ``torchrun --nproc_per_node N``, the demos train with PyTorch's
DistributedDataParallel (gloo on CPU, nccl on GPU). Three things make the result equal to the
single-process run (same seed, same global batch):

- every rank walks the same global batches and takes a contiguous share of each;
- each rank's loss is scaled so that the DDP-averaged gradient is the gradient of the global-batch
  mean (:func:`shard_weight`), also for the last, uneven batch;
- BatchNorm statistics span the global batch: ``nn.SyncBatchNorm`` on GPU, and on CPU (where
  SyncBatchNorm does not run) :class:`GlobalBatchNorm`, which all-reduces per-channel sums with
  autograd-aware collectives.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "GlobalBatchNorm",
    "cleanup_distributed",
    "convert_batchnorm",
    "init_distributed",
    "one_cycle",
    "prepare_model",
    "shard_slice",
    "shard_weight",
    "train_epoch",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device = "cpu") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world <= 1:
        return DistInfo(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return DistInfo(rank=rank, world=dist.get_world_size(), device=device)


def cleanup_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard_slice(batch_size: int, info: DistInfo) -> slice:
    """This rank's contiguous share of a global batch of ``batch_size`` items."""
    per_rank = -(-batch_size // info.world)  # ceil
    start = min(info.rank * per_rank, batch_size)
    return slice(start, min(start + per_rank, batch_size))


def shard_weight(local: int, global_size: int, info: DistInfo) -> float:
    """Scale for a rank's mean loss so that DDP's gradient average equals the global mean.

    DDP divides the summed gradients by the world size W, so a rank whose mean loss is over
    ``local`` of ``global_size`` items is scaled by ``local * W / global_size``.
    """
    return local * info.world / global_size


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across all ranks (CPU).

    Per-channel sums, sums of squares and counts are all-reduced with
    ``torch.distributed.nn.functional.all_reduce``, which carries gradients back to every rank, so
    forward and backward equal single-process BatchNorm on the whole batch. In eval mode, or
    outside a process group, it is ordinary BatchNorm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"input: expected at least 2-D (B, C, ...), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        count = torch.tensor([input.numel() / channels], dtype=input.dtype, device=input.device)
        # (2C + 1,): sums, sums of squares and the count, reduced in one collective
        local = torch.cat([input.sum(dims), input.square().sum(dims), count])
        total = all_reduce(local)
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels : 2 * channels] / n - mean.square()
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (
                    self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), momentum)
        shape = (1, channels, *([1] * (input.dim() - 2)))
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_batchnorm(module: nn.Module, info: DistInfo) -> nn.Module:
    """Replace every BatchNorm by a global-batch one: SyncBatchNorm on GPU, GlobalBatchNorm on CPU."""
    if info.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        reference = next(iter(module.state_dict().values()))  # same device and dtype as the original
        replacement = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=reference.device,
            dtype=reference.dtype if reference.is_floating_point() else None,
        )
        replacement.load_state_dict(module.state_dict())
        return replacement
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child, info))
    return module


def prepare_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Move to the device; when distributed, global-batch BatchNorm and a DDP wrapper."""
    model = model.to(info.device)
    if not info.distributed:
        return model
    model = convert_batchnorm(model, info)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    n_items: int,
    batch_size: int,
    generator: torch.Generator,
    loss_fn: Callable[[Tensor], Tensor],
    info: DistInfo,
) -> float:
    """One epoch over ``n_items`` in a random order drawn from ``generator`` (the same on every
    rank); ``loss_fn(indices)`` returns the mean loss of those items. Each rank computes the loss
    of its share of every global batch, scaled so that DDP's averaged gradient is the gradient of
    the global batch's mean loss. Returns the mean loss over the epoch's items (all ranks')."""
    model.train()
    order = torch.randperm(n_items, generator=generator)
    total, seen = 0.0, 0
    for start in range(0, n_items, batch_size):
        batch = order[start : start + batch_size]
        mine = batch[shard_slice(len(batch), info)]
        if len(mine) == 0:
            continue
        loss = loss_fn(mine)
        optimizer.zero_grad(set_to_none=True)
        (loss * shard_weight(len(mine), len(batch), info)).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(mine)
        seen += len(mine)
    if info.distributed:
        sums = torch.tensor([total, float(seen)], dtype=torch.float64)
        dist.all_reduce(sums)  # every rank reports the mean over all items
        total, seen = float(sums[0]), int(sums[1])
    return total / max(seen, 1)


def one_cycle(
    optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int
) -> torch.optim.lr_scheduler.OneCycleLR:
    """The demos' one-cycle schedule: 20% warm-up, at least one step of it and one of decay.

    torch's ``OneCycleLR`` divides by the length of each phase: with a fixed 20% warm-up, a run of
    five steps or fewer (``--epochs 1`` on a small training set) has a warm-up of zero steps and
    fails with a ZeroDivisionError.
    """
    total_steps = max(total_steps, 2)
    # warm-up ends at pct * total - 1 steps: strictly between 0 and total - 1 for every total >= 2
    pct_start = min(max(0.2, 1.5 / total_steps), 0.75)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start
    )
