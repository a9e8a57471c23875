"""Local relation layer (LR-Net) against a float64 reference written from the paper's equations,
and the popular re-implementation's pitfalls (random prior coordinates, zero-padded borders)."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.local_relation import LocalRelation

pytestmark = pytest.mark.usefixtures("float64_default")


def reference(module: LocalRelation, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loops over the window taps; out-of-image neighbours excluded from the softmax."""
    b, c, h, w = x.shape
    k, r, s = module.kernel_size, module.kernel_size // 2, module.stride
    groups, m = module.groups, module.channel_sharing
    q = torch.einsum("oc,bchw->bohw", module.query.weight.flatten(1), x)
    key = torch.einsum("oc,bchw->bohw", module.key.weight.flatten(1), x)
    per_group = module.key_channels // groups
    lin1, _, lin2 = module.geometry_prior
    out_h, out_w = (h - 1) // s + 1, (w - 1) // s + 1
    logits = torch.full((b, groups, out_h, out_w, k * k), float("-inf"))
    neighbours = torch.zeros(b, c, out_h, out_w, k * k)
    for t in range(k * k):
        dy, dx = t // k - r, t % k - r
        offset = torch.tensor([dy, dx], dtype=torch.float64) / max(r, 1)
        prior = lin2.weight @ torch.relu(lin1.weight @ offset + lin1.bias)  # (G,): MLP(p - p')
        for i in range(out_h):
            for j in range(out_w):
                y, xx = i * s + dy, j * s + dx
                if not (0 <= y < h and 0 <= xx < w):
                    continue  # masked: not in the softmax
                diff = (q[:, :, i * s, j * s] - key[:, :, y, xx]).view(b, groups, per_group)
                logits[:, :, i, j, t] = -(diff**2).sum(-1) + prior
                neighbours[:, :, i, j, t] = x[:, :, y, xx]
    weights = torch.softmax(logits, dim=-1)  # (B, G, H', W', k^2)
    # channel c shares the weights of group c // m
    aggregated = (weights.repeat_interleave(m, dim=1) * neighbours).sum(-1)
    out = torch.einsum("oc,bchw->bohw", module.proj.weight.flatten(1), aggregated)
    return out, weights


def build(**kwargs) -> LocalRelation:
    torch.manual_seed(0)
    module = LocalRelation(16, **kwargs)
    return randomize_(module, seed=0, scale=0.3, shift=True).eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"kernel_size": 3},
        {"channel_sharing": 4, "key_channels": 8},  # two query/key channels per group
        {"stride": 2, "out_channels": 24},
    ],
)
def test_matches_float64_reference(kwargs: dict) -> None:
    module = build(**kwargs)
    x = torch.randn(2, 16, 6, 9)
    with torch.no_grad():
        out, maps = module(x, return_attn=True)
        expected, expected_maps = reference(module, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)


def test_out_of_image_neighbours_are_masked_not_zero_padded() -> None:
    module = build()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        _, maps = module(x, return_attn=True)  # (1, 2, 8, 8, 49)
    corner = maps[0, :, 0, 0].view(2, 7, 7)  # window of the top-left pixel: rows/cols 0..2 outside
    assert (corner[:, :3, :] == 0).all() and (corner[:, :, :3] == 0).all()
    assert (corner[:, 3:, 3:] > 0).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 2, 8, 8))
    # whatever the padding would hold, it cannot reach the output: a huge key bias (which a
    # zero-padded key would turn into a large logit at outside taps) changes nothing there
    assert not maps.isnan().any()


def test_window_larger_than_the_map_is_fine() -> None:
    """A 7 x 7 window on a 2 x 3 map: every outside tap masked, the result still the paper's."""
    module = build()
    x = torch.randn(2, 16, 2, 3)
    with torch.no_grad():
        out, maps = module(x, return_attn=True)
        expected, _ = reference(module, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (maps > 0).sum(-1).max() == 6  # at most the 6 pixels of the map


def test_geometric_prior_is_a_learned_function_of_the_true_offsets() -> None:
    """Pitfall: a popular version feeds the prior MLP torch.rand coordinates that are neither
    the offsets nor learned (a plain attribute: no gradient, not saved, not moved)."""
    module = build(kernel_size=3)
    names = dict(module.named_parameters())
    assert {"geometry_prior.0.weight", "geometry_prior.0.bias", "geometry_prior.2.weight"} <= set(names)
    expected = torch.tensor([[dy, dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=torch.float64)
    torch.testing.assert_close(module.offsets, expected)
    # with q = k = 0 the weights are the prior alone: softmax_t(MLP(offset_t)), the same at every
    # interior pixel, reproducible, and learned (gradients reach the MLP)
    with torch.no_grad():
        module.query.weight.zero_()
        module.key.weight.zero_()
    x = torch.randn(1, 16, 5, 5)
    _, maps = module(x, return_attn=True)
    lin1, _, lin2 = module.geometry_prior
    prior = torch.relu(expected @ lin1.weight.T + lin1.bias) @ lin2.weight.T  # (9, G)
    torch.testing.assert_close(maps[0, :, 2, 2], torch.softmax(prior.T, dim=-1))
    maps[0, 0, 2, 2, 0].backward()
    assert lin1.weight.grad.abs().sum() > 0 and lin2.weight.grad.abs().sum() > 0


def test_composability_is_negative_squared_difference_not_a_dot_product() -> None:
    """Phi(q, k) = -(q - k)^2: the neighbour whose key equals the query gets the largest weight,
    and softmax(-(q - k)^2) = softmax(2 q k - k^2) (the dot product with a key bias)."""
    module = build(kernel_size=3)
    with torch.no_grad():
        for lin in module.geometry_prior:
            if isinstance(lin, torch.nn.Linear):
                lin.weight.zero_()
        _, maps = module(torch.randn(1, 16, 5, 5), return_attn=True)
    q = torch.randn(10)
    k = torch.randn(10, 9)
    squared = torch.softmax(-((q[:, None] - k) ** 2), dim=-1)
    dot = torch.softmax(2 * q[:, None] * k - k**2, dim=-1)
    torch.testing.assert_close(squared, dot)
    # the centre tap compares a pixel with itself only when W_q = W_k: then it has weight max
    with torch.no_grad():
        module.key.weight.copy_(module.query.weight)
        _, maps = module(torch.randn(1, 16, 5, 5), return_attn=True)
    assert (maps[..., 4] >= maps.amax(-1) - 1e-12).all()


def test_values_are_never_unfolded() -> None:
    module = LocalRelation(64).eval()
    x = torch.randn(1, 64, 12, 12)
    with OpRecorder() as rec, torch.no_grad():
        module(x)
    assert rec.largest_storage < 49 * x.numel() / 4, rec.largest_storage


def test_nan_input_reaches_the_output() -> None:
    module = build()
    x = torch.randn(2, 16, 6, 6)
    x[1, :, 2, 2] = float("nan")
    with torch.no_grad():
        out = module(x)
    assert torch.isnan(out[1]).any() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("kernel_size", [0, 2, 6])
def test_even_windows_are_refused(kernel_size: int) -> None:
    with pytest.raises(ValueError, match="kernel_size.*odd"):
        LocalRelation(16, kernel_size=kernel_size)


def test_constructor_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="channel_sharing"):
        LocalRelation(12, channel_sharing=8)
    with pytest.raises(ValueError, match="key_channels"):
        LocalRelation(16, key_channels=3)


def test_registered_as_a_conv_replacement_with_local_maps() -> None:
    spec = attnzoo.get_spec("local_relation")
    assert spec.family == "conv_attention" and spec.placement == "conv" and spec.map_kind == "local"
