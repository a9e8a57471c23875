"""Run by tests/demos/test_segmentation.py under torchrun: train a tiny segmentation network, save
rank 0's weights and curves to the path given as the first argument."""

from __future__ import annotations

import sys

import torch

from attnzoo._progress import Progress
from attnzoo.demos.compare import train_model
from attnzoo.demos.distributed import cleanup_distributed, init_distributed
from attnzoo.demos.segmentation import SegmentationConfig, build_model, load_dataset, miou


def train(config: SegmentationConfig):
    info = init_distributed("cpu")
    try:
        data = load_dataset(config)
        # float64: reduction-order noise stays far below what per-rank BatchNorm statistics or
        # unweighted shard losses would cause
        data.train_x, data.test_x = data.train_x.double(), data.test_x.double()
        torch.manual_seed(0)
        model = build_model(config.mechanisms[0], config, data).double()
        model, curve, losses = train_model(
            model, data, config, 0, info, Progress(1, enabled=False), score=miou, metric="mIoU"
        )
        return info, {"state": model.state_dict(), "curve": curve, "losses": losses}
    finally:
        cleanup_distributed(info)


CONFIG = SegmentationConfig(
    mechanisms=["danet"], epochs=2, seeds=[0], width=4, batch_size=6, limit=15, train_scenes=15,
    test_scenes=4, image_size=32, progress=False,
)  # fmt: skip

if __name__ == "__main__":
    torch.set_num_threads(1)
    info, result = train(CONFIG)
    if info.rank == 0:
        torch.save(result, sys.argv[1])
