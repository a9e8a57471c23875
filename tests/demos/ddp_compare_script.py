"""Run by tests/demos/test_distributed.py under torchrun: train a tiny compare model, save rank 0's
weights and curves to the path given as the first argument."""

from __future__ import annotations

import sys

import torch

from attnzoo._progress import Progress
from attnzoo.demos.compare import CompareConfig, build_model, load_dataset, train_model
from attnzoo.demos.distributed import cleanup_distributed, init_distributed


def train(config: CompareConfig):
    info = init_distributed("cpu")
    try:
        data = load_dataset(config)
        # float64: reduction-order noise (~1e-15) stays far below what a real error in the data
        # parallelism (per-rank BatchNorm statistics, unweighted shard losses) would cause (~1e-3)
        data.train_x, data.test_x = data.train_x.double(), data.test_x.double()
        torch.manual_seed(0)
        model = build_model(config.mechanisms[0], config, data).double()
        model, curve, losses = train_model(model, data, config, 0, info, Progress(1, enabled=False))
        return info, {"state": model.state_dict(), "curve": curve, "losses": losses}
    finally:
        cleanup_distributed(info)


CONFIG = CompareConfig(
    mechanisms=["cbam"], epochs=2, seeds=[0], depth=20, width=4, batch_size=24, limit=100, progress=False
)

if __name__ == "__main__":
    torch.set_num_threads(1)
    info, result = train(CONFIG)
    if info.rank == 0:
        torch.save(result, sys.argv[1])
