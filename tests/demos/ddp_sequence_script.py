"""Run by tests/demos/test_sequence_compare.py under torchrun: train the sequence compare's encoder
on a tiny task and write rank 0's losses and accuracy curve (JSON) to the path given."""

from __future__ import annotations

import json
import sys

import torch

from attnzoo.demos.distributed import cleanup_distributed, init_distributed
from attnzoo.demos.sequence_compare import SequenceConfig, _train
from attnzoo.demos.sequence_tasks import listops

# 40 sequences in batches of 16: the last batch is uneven (8), split 4 / 4 over two ranks. gated_mha
# with one gate draw per step (noise="batch"): the same draws on every rank and in one process (a
# draw per token would depend on the shard's size); its L0 term goes through the shard weighting too
CONFIG = SequenceConfig(
    mechanisms=["gated_mha"],
    epochs=2,
    batch_size=16,
    embed_dim=16,
    num_heads=2,
    attention_kwargs={"gated_mha": {"noise": "batch"}},
)


class _Silent:
    def update(self, label: str, *, advance: bool = True) -> None:
        pass


def train() -> dict:
    info = init_distributed("cpu")
    try:
        task = listops(16, 40, 40, seed=0)
        outcome = _train("gated_mha", task, 0, CONFIG, info, _Silent())
        return {"rank": info.rank, "losses": outcome.losses, "curve": outcome.curve}
    finally:
        cleanup_distributed(info)


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = train()
    if result["rank"] == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(result, handle)
