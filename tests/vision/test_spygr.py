"""spygr: the Laplacian graph convolution in float64 with the explicit N x N matrices of the paper,
the pyramid, positive degrees, and no N x N buffer without maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.functional.global_reasoning import normalized_laplacian_apply
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.spygr import SpatialPyramidGraphReasoning

pytestmark = pytest.mark.usefixtures("float64_default")


def layer_reference(layer, xs):
    """Explicit matrices: A = Phi Lambda Phi^T, D = diag(A 1), L = I - D^-1/2 A D^-1/2, ReLU(L X Theta)."""
    batch, channels, h, w = xs.shape
    n = h * w
    out = torch.empty(batch, n, channels)
    adjacency = torch.empty(batch, n, n)
    for b in range(batch):
        x = xs[b].reshape(channels, n).t()  # (N, C), row-major positions
        phi = torch.relu(x @ layer.phi.weight.t() + layer.phi.bias)
        lam = torch.diag(torch.sigmoid(layer.diagonal.weight @ x.mean(0) + layer.diagonal.bias))
        a = phi @ lam @ phi.t()
        d = torch.diag(a.sum(1))
        d_inv_sqrt = torch.diag(1 / torch.sqrt(torch.diag(d) + layer.eps))
        lap = torch.eye(n) - d_inv_sqrt @ a @ d_inv_sqrt
        out[b] = torch.relu(lap @ x @ layer.theta.weight.t() + layer.theta.bias)
        adjacency[b] = d_inv_sqrt @ a @ d_inv_sqrt
    return out.transpose(1, 2).reshape(batch, channels, h, w), adjacency


def spygr_reference(m, x):
    out = x.clone()
    maps = {}
    for scale, layer in zip(m.scales, m.layers):
        pooled = x if scale == 1 else F.max_pool2d(x, scale, scale, ceil_mode=True)
        y, maps[f"scale_{scale}"] = layer_reference(layer, pooled)
        if scale != 1:
            y = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
        out = out + y
    return out, maps


@pytest.mark.parametrize("shape", [(2, 12, 5, 7), (1, 12, 8, 8)])
def test_matches_paper(shape):
    torch.manual_seed(0)
    module = randomize_(SpatialPyramidGraphReasoning(12, graph_channels=5))
    x = torch.randn(shape)
    expected, maps = spygr_reference(module, x)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    out, got = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert set(got) == {"scale_1", "scale_2", "scale_4"}
    for key in got:
        torch.testing.assert_close(got[key], maps[key], rtol=1e-10, atol=1e-10)


def test_associativity_equals_the_explicit_laplacian_and_degrees_are_positive():
    torch.manual_seed(1)
    x = torch.randn(2, 30, 6)
    phi = torch.relu(torch.randn(2, 30, 4))
    lam = torch.rand(2, 4)
    lx, adjacency = normalized_laplacian_apply(x, phi, lam, return_adjacency=True)
    explicit = x - adjacency @ x
    torch.testing.assert_close(lx, explicit, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(normalized_laplacian_apply(x, phi, lam), lx)
    # even with inputs that drive most of Phi to zero the output stays finite (no rsqrt(0 - ...))
    module = randomize_(SpatialPyramidGraphReasoning(16)).float()
    big = -50 * torch.rand(1, 16, 8, 8, dtype=torch.float32)
    assert torch.isfinite(module(big)).all()


def test_pyramid_adds_coarser_scales():
    torch.manual_seed(2)
    full = randomize_(SpatialPyramidGraphReasoning(8, scales=(1, 2, 4)))
    single = SpatialPyramidGraphReasoning(8, scales=(1,))
    single.layers[0].load_state_dict(full.layers[0].state_dict())
    x = torch.randn(1, 8, 8, 8)
    coarse = full(x) - single(x)  # the contributions of scales 2 and 4
    assert coarse.abs().max() > 1e-3
    assert len(full.layers) == 3 and full.graph_channels == 2


def test_no_n_by_n_buffer_without_maps():
    module = SpatialPyramidGraphReasoning(32).float().eval()
    x = torch.randn(1, 32, 24, 24, dtype=torch.float32)
    n = 24 * 24
    with torch.no_grad(), OpRecorder() as rec:
        module(x)
    assert rec.largest_storage < n * n // 8
    with torch.no_grad(), OpRecorder() as rec:
        module(x, return_attn=True)
    assert rec.largest_storage >= n * n  # the maps, formed only when asked for


def test_registered_and_errors():
    spec = attnzoo.get_spec("spygr")
    assert spec.family == "non_local" and spec.placement == "head" and spec.map_kind == "mixed"
    with pytest.raises(ValueError, match="scales"):
        SpatialPyramidGraphReasoning(8, scales=(1, 1))
    small = SpatialPyramidGraphReasoning(8)
    assert small(torch.randn(2, 8, 3, 2)).shape == (2, 8, 3, 2)  # sides below the factor 4
