"""attnzoo.models.san: the official SAN architectures and their published parameter counts."""

from __future__ import annotations

import pytest
import torch

import attnzoo.models
from attnzoo.models import san
from attnzoo.models.san import SAN
from attnzoo.vision.san import SANAttention

#: Official table (hszhao/SAN README), millions of parameters with 1000 classes.
PUBLISHED = {
    (10, "pairwise"): 10.5,
    (15, "pairwise"): 14.1,
    (19, "pairwise"): 17.6,
    (10, "patchwise"): 11.8,
    (15, "patchwise"): 16.2,
    (19, "patchwise"): 20.5,
}


@pytest.mark.parametrize("depth,mode", list(PUBLISHED))
def test_parameter_counts_match_the_official_table(depth: int, mode: str) -> None:
    net = san(depth, mode, device="meta")
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(millions - PUBLISHED[depth, mode]) / PUBLISHED[depth, mode] < 0.01, millions


def test_architecture_follows_the_official_code() -> None:
    net = san(10, "pairwise", device="meta")
    layers = [m for m in net.modules() if isinstance(m, SANAttention)]
    assert len(layers) == 2 + 1 + 2 + 4 + 1
    # footprint 3 in the first stage, 7 after; C -> C/4 with relation width C/16, 8 per weight map
    assert [m.kernel_size for m in layers] == [3, 3] + [7] * 8
    first, last = layers[0], layers[-1]
    assert (first.channels, first.out_channels, first.rel_channels, first.weight_channels) == (64, 16, 4, 2)
    assert (last.channels, last.out_channels, last.rel_channels, last.weight_channels) == (2048, 512, 128, 64)
    assert net.fc.in_features == 2048
    assert attnzoo.models.san is san


@pytest.mark.parametrize("mode", ["pairwise", "patchwise"])
def test_forward_and_backward_on_a_small_image(mode: str) -> None:
    torch.manual_seed(0)
    net = SAN((1, 1, 1, 1, 1), mode, num_classes=7)  # one block per stage keeps the test fast
    x = torch.randn(2, 3, 128, 128)
    logits = net(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="depth"):
        san(50)
    with pytest.raises(ValueError, match="mode"):
        san(10, "clique")
    net = SAN((1, 1, 1, 1, 1), num_classes=3)
    with pytest.raises(ValueError, match="expected C=3"):
        net(torch.randn(1, 4, 128, 128))
    with pytest.raises(ValueError, match="reflection padding"):
        net(torch.randn(1, 3, 64, 64))  # 2 x 2 at the last stage: too small for a 7 x 7 footprint
