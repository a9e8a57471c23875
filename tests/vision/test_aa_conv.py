"""aa_conv: Concat[Conv(X), MHA(X)] with 2-D relative logits (arXiv:1904.09925)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import OpRecorder
from attnzoo.vision.aa_conv import AAConv2d, attention_widths

pytestmark = pytest.mark.usefixtures("float64_default")


def reference(layer: AAConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's eq. 1-5 over every (query, key) pair: logits
    (q_i . k_j + q_i . r^H[y_j - y_i] + q_i . r^W[x_j - x_i]) / sqrt(d_k^h) (the relative part
    outside the scaling with ``scale_relative=False``, timm's default)."""
    conv = F.conv2d(x, layer.conv.weight, layer.conv.bias, layer.stride, layer.conv.padding)
    if layer.stride > 1:
        x = F.avg_pool2d(x, layer.stride, ceil_mode=True)
    batch, _, height, width = x.shape
    heads, d_k, d_v = layer.num_heads, layer.key_dim, layer.value_dim
    dkh, dvh, middle = d_k // heads, d_v // heads, layer.max_size - 1
    qkv = torch.einsum("bchw,oc->bhwo", x, layer.qkv.weight)
    if layer.qkv.bias is not None:
        qkv = qkv + layer.qkv.bias
    positions = [(y, z) for y in range(height) for z in range(width)]
    outputs, maps = [], []
    for h in range(heads):
        q = qkv[..., h * dkh : (h + 1) * dkh].reshape(batch, -1, dkh)
        k = qkv[..., d_k + h * dkh : d_k + (h + 1) * dkh].reshape(batch, -1, dkh)
        v = qkv[..., 2 * d_k + h * dvh : 2 * d_k + (h + 1) * dvh].reshape(batch, -1, dvh)
        content = torch.einsum("bid,bjd->bij", q, k)
        relative = torch.zeros_like(content)
        if layer.relative:
            for i, (yi, xi) in enumerate(positions):
                for j, (yj, xj) in enumerate(positions):
                    r = layer.rel_height[yj - yi + middle] + layer.rel_width[xj - xi + middle]
                    relative[:, i, j] = q[:, i] @ r
        if layer.scale_relative:
            logits = (content + relative) / dkh**0.5
        else:
            logits = content / dkh**0.5 + relative
        weights = torch.softmax(logits, dim=-1)
        outputs.append(weights @ v)
        maps.append(weights)
    attn = torch.cat(outputs, dim=-1) @ layer.out_proj.weight.T
    if layer.out_proj.bias is not None:
        attn = attn + layer.out_proj.bias
    attn = attn.transpose(1, 2).reshape(batch, d_v, height, width)
    return torch.cat([conv, attn], dim=1), torch.stack(maps, dim=1)


@pytest.mark.parametrize(
    ("kwargs", "size"),
    [
        ({}, (5, 7)),
        ({"scale_relative": False}, (6, 4)),
        ({"stride": 2}, (7, 6)),
        ({"relative": False}, (4, 4)),
        ({"bias": False, "kernel_size": 5}, (6, 6)),
    ],
)
def test_matches_the_papers_equation(kwargs, size):
    torch.manual_seed(0)
    layer = AAConv2d(8, 32, num_heads=2, max_size=9, **kwargs)
    x = torch.randn(2, 8, *size)
    expected, expected_maps = reference(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    out, maps = layer(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)


def test_gradients_reach_the_tables_as_in_the_reference():
    torch.manual_seed(0)
    layer = AAConv2d(4, 16, num_heads=2, max_size=5)
    x = torch.randn(1, 4, 3, 5, requires_grad=True)
    grad = torch.randn(1, 16, 3, 5)
    ours = torch.autograd.grad((layer(x) * grad).sum(), [x, *layer.parameters()])
    theirs = torch.autograd.grad((reference(layer, x)[0] * grad).sum(), [x, *layer.parameters()])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # height offsets beyond a 3-row map never enter: rows 4 +- 2 of the (2 * 5 - 1)-row table only
    grad_height = ours[1 + [name for name, _ in layer.named_parameters()].index("rel_height")]
    assert (grad_height[:2] == 0).all() and (grad_height[7:] == 0).all() and (grad_height[2:7] != 0).all()


def test_relative_logits_depend_on_the_offset_only():
    torch.manual_seed(0)
    layer = AAConv2d(4, 16, num_heads=2, max_size=8)
    x = torch.randn(1, 4, 6, 6)
    _, maps = layer(x, return_attn=True)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 2, 36))
    # q and k constant over the map (zero weights, the biases left): the content logits are equal,
    # so the logits differ by the relative terms, which depend on the offset only:
    # query (2, 2) -> key (3, 4) as query (1, 1) -> key (2, 3)
    with torch.no_grad():
        layer.qkv.weight.zero_()
    _, maps = layer(torch.zeros(1, 4, 6, 6), return_attn=True)
    logits = maps.log()
    index = lambda y, z: y * 6 + z  # noqa: E731
    torch.testing.assert_close(
        logits[..., index(2, 2), index(3, 4)] - logits[..., index(2, 2), index(2, 2)],
        logits[..., index(1, 1), index(2, 3)] - logits[..., index(1, 1), index(1, 1)],
    )
    assert (logits[..., index(2, 2), index(3, 4)] != logits[..., index(2, 2), index(2, 2)]).all()


def test_scaled_and_unscaled_relative_logits_differ_by_sqrt_dkh():
    torch.manual_seed(0)
    paper = AAConv2d(8, 32, num_heads=2, max_size=6)
    timm = AAConv2d(8, 32, num_heads=2, max_size=6, scale_relative=False)
    timm.load_state_dict(paper.state_dict())
    with torch.no_grad():
        # q . r unscaled == (q . r sqrt(d)) scaled: the timm layer with tables / sqrt(d) is the paper's
        timm.rel_height.div_(paper.key_head_dim**0.5)
        timm.rel_width.div_(paper.key_head_dim**0.5)
    x = torch.randn(1, 8, 5, 6)
    torch.testing.assert_close(timm(x), paper(x))
    unscaled = AAConv2d(8, 32, num_heads=2, max_size=6, scale_relative=False)
    unscaled.load_state_dict(paper.state_dict())
    assert (unscaled(x) - paper(x)).abs().max() > 1e-3


def test_paper_defaults_and_tables_learned_once():
    layer = AAConv2d(160)
    # kappa = upsilon = 0.2 of F_out = 160, 8 heads; W^O is d_v x d_v; qkv from a 1x1 projection
    assert (layer.num_heads, layer.key_dim, layer.value_dim) == (8, 32, 32)
    assert layer.conv.out_channels == 128 and layer.conv.kernel_size == (3, 3)
    assert layer.qkv.in_features == 160 and layer.out_proj.weight.shape == (32, 32)
    # (2 max_size - 1, d_k^h) tables, parameters of the layer (not re-created each call)
    assert layer.rel_height.shape == layer.rel_width.shape == (127, 4)
    assert {"rel_height", "rel_width"} <= {name for name, _ in layer.named_parameters()}
    # N(0, d_k^h^-1/2) as in the paper's appendix
    torch.manual_seed(0)
    big = AAConv2d(640, max_size=64)
    assert abs(big.rel_height.std().item() - big.key_head_dim**-0.5) < 0.05
    spec = attnzoo.get_spec("aa_conv")
    assert (spec.family, spec.placement, spec.map_kind) == ("conv_attention", "conv", "pairwise")


def test_attention_widths_follow_the_resnet_setting():
    # AA-ResNet: k = 2v = 0.2 with at least 20 dimensions a key head
    assert attention_widths(128, 0.2, 0.1, 8, 20) == (160, 16)
    assert attention_widths(512, 0.2, 0.1, 8, 20) == (160, 48)
    assert attention_widths(1000, 0.2, 0.1, 8, 20) == (200, 96)
    assert attention_widths(16, 0.2, 0.2, 8) == (8, 8)  # at least one dimension a head


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="kernel_size: expected an odd size"):
        AAConv2d(8, kernel_size=4)
    with pytest.raises(ValueError, match="value_ratio: expected a fraction"):
        AAConv2d(8, value_ratio=1.5)
    with pytest.raises(ValueError, match="out_channels: expected more than d_v = 8"):
        AAConv2d(8, 8, num_heads=8)
    layer = AAConv2d(8, 32, num_heads=2, max_size=4)
    with pytest.raises(ValueError, match=r"max_size=4.*got 5 x 4"):
        layer(torch.randn(1, 8, 5, 4))
    assert layer(torch.randn(1, 8, 8, 8)[:, :, :4, :3]).shape == (1, 32, 4, 3)
    # without relative logits there is no size limit
    assert AAConv2d(8, 32, num_heads=2, max_size=4, relative=False)(torch.randn(1, 8, 6, 6)).shape[-1] == 6


def test_memory_stays_linear_in_the_positions_without_maps():
    # the materialised version holds the (B, N_h, HW, HW) logits: 8 x 4096^2 at 64 x 64
    layer = AAConv2d(64, max_size=64).float()
    x = torch.randn(1, 64, 64, 64, dtype=torch.float32)
    with torch.no_grad(), OpRecorder() as recorder:
        layer(x)
    logits = 8 * (64 * 64) ** 2
    assert recorder.largest_storage < logits / 16, recorder.largest_storage
    assert not any("softmax" in name for name in recorder.names())
