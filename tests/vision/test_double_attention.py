"""double_attention: A2-Nets' gather and distribute in float64 from the paper, the softmax axes
(positions for the gather maps, descriptors for the distribute vectors), the residual, memory."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.double_attention import DoubleAttention

pytestmark = pytest.mark.usefixtures("float64_default")


def a2_reference(m: DoubleAttention, x: torch.Tensor):
    """The paper's gather and distribute as explicit sums.

    G_{:,i} = sum_j A_j softmax_j(B_ij); z_j = sum_i G_{:,i} softmax_i(V_ij); Y = X + W_o Z.
    """
    batch, channels = x.shape[:2]
    cols = x.reshape(batch, channels, -1)
    n_pos = cols.shape[-1]
    a = torch.einsum("mc,bcj->bmj", m.features.weight[..., 0], cols) + m.features.bias[:, None]
    b = torch.einsum("nc,bcj->bnj", m.maps.weight[..., 0], cols)
    v = torch.einsum("nc,bcj->bnj", m.vectors.weight[..., 0], cols) + m.vectors.bias[:, None]
    out = torch.empty_like(cols)
    gathers = torch.empty_like(b)
    distributes = torch.empty_like(v)
    for s in range(batch):
        eb = torch.exp(b[s] - b[s].max(dim=1, keepdim=True).values)
        gather = eb / eb.sum(dim=1, keepdim=True)  # each map over the N positions
        g = torch.zeros(a.shape[1], b.shape[1])
        for i in range(b.shape[1]):
            for j in range(n_pos):
                g[:, i] += gather[i, j] * a[s, :, j]
        ev = torch.exp(v[s] - v[s].max(dim=0, keepdim=True).values)
        distribute = ev / ev.sum(dim=0, keepdim=True)  # at each position over the n descriptors
        z = torch.stack([sum(g[:, i] * distribute[i, j] for i in range(b.shape[1])) for j in range(n_pos)], 1)
        out[s] = cols[s] + m.out_proj.weight[..., 0] @ z + m.out_proj.bias[:, None]
        gathers[s], distributes[s] = gather, distribute
    return out.view_as(x), gathers, distributes


@pytest.mark.parametrize("shape", [(2, 16, 3, 5), (1, 16, 2, 3, 4), (2, 16, 7)])
def test_matches_paper(shape):
    torch.manual_seed(0)
    module = randomize_(DoubleAttention(16, attn_channels=6, num_descriptors=5))
    x = torch.randn(shape)
    expected, gathers, distributes = a2_reference(module, x)
    out, maps = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["gather"].flatten(2), gathers, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["distribute"].flatten(2), distributes, rtol=1e-10, atol=1e-10)


def test_softmax_axes_positions_then_descriptors():
    # the popular copy softmaxes over the batch; at batch 1 its maps are all ones
    torch.manual_seed(1)
    module = randomize_(DoubleAttention(32))
    x = torch.randn(1, 32, 6, 5)
    _, maps = module(x, return_attn=True)
    gather, distribute = maps["gather"], maps["distribute"]
    assert gather.shape == distribute.shape == (1, 8, 6, 5)
    torch.testing.assert_close(gather.sum(dim=(2, 3)), torch.ones(1, 8))  # over positions
    torch.testing.assert_close(distribute.sum(dim=1), torch.ones(1, 6, 5))  # over descriptors
    assert not torch.allclose(gather.sum(dim=1), torch.ones(1, 6, 5))
    assert not torch.allclose(distribute.sum(dim=(2, 3)), torch.ones(1, 8))
    assert (gather < 1).all() and (distribute < 1).all()  # not the batch softmax's all-ones
    # at batch 1 the output still depends on the input (not a constant)
    x2 = torch.randn(1, 32, 6, 5)
    assert not torch.allclose(module(x) - x, module(x2) - x2)


def test_residual_and_default_widths():
    module = DoubleAttention(64)
    assert module.attn_channels == 16 and module.num_descriptors == 16
    assert module.maps.bias is None  # a per-map constant cancels in the softmax over positions
    with torch.no_grad():
        module.out_proj.weight.zero_()
        module.out_proj.bias.zero_()
    x = torch.randn(2, 64, 4, 4)
    assert torch.equal(module(x), x)  # Y = X + W_o Z: the residual is there


def test_no_n_by_n_buffer():
    module = DoubleAttention(32).float()
    x = torch.randn(1, 32, 24, 24, dtype=torch.float32)
    n = 24 * 24
    with torch.no_grad(), OpRecorder() as rec:
        module(x)
    assert rec.largest_storage < n * n // 4, rec.largest_storage
    with torch.no_grad(), OpRecorder() as rec:
        module(x, return_attn=True)
    assert rec.largest_storage < n * n // 4  # the maps are (n, N), not (N, N)


def test_registered_and_errors():
    spec = attnzoo.get_spec("double_attention")
    assert spec.family == "non_local" and spec.placement == "stage" and spec.map_kind == "mixed"
    assert isinstance(attnzoo.create("double_attention", 16), DoubleAttention)
    with pytest.raises(ValueError, match="attn_channels"):
        DoubleAttention(16, attn_channels=0)
