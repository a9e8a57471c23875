"""glore: the unit in float64 from the paper's projection / GCN / reverse projection (official GCN
form), identity at init, default widths, the 1/L normalisation, memory."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.glore import GloRe

pytestmark = pytest.mark.usefixtures("float64_default")


def glore_reference(m: GloRe, x: torch.Tensor, normalize: bool):
    """B = theta(X); V_si = sum_l phi(X)_sl B_il (/ L); GCN; Y = X + BN(W_e sum_i Z_:i B_il)."""
    batch, channels = x.shape[:2]
    cols = x.reshape(batch, channels, -1)
    n_pos = cols.shape[-1]
    state = torch.einsum("sc,bcl->bsl", m.state.weight[..., 0], cols) + m.state.bias[:, None]
    proj = torch.einsum("nc,bcl->bnl", m.projection.weight[..., 0], cols) + m.projection.bias[:, None]
    a_g, b_g = m.node_conv.weight[..., 0], m.node_conv.bias
    w_g = m.state_conv.weight[..., 0]
    out = torch.empty_like(cols)
    for b in range(batch):
        nodes = torch.zeros(m.state_channels, m.num_nodes)
        for i in range(m.num_nodes):
            for pos in range(n_pos):
                nodes[:, i] += state[b, :, pos] * proj[b, i, pos]
        if normalize:
            nodes = nodes / n_pos
        hidden = torch.stack(
            [
                sum(a_g[i, j] * nodes[:, j] for j in range(m.num_nodes)) + b_g[i] + nodes[:, i]
                for i in range(m.num_nodes)
            ],
            dim=1,
        )
        z = w_g @ torch.relu(hidden)
        back = torch.stack(
            [sum(z[:, i] * proj[b, i, pos] for i in range(m.num_nodes)) for pos in range(n_pos)], dim=1
        )
        ext = m.extend.weight[..., 0] @ back
        bn = m.norm
        normed = (ext - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
        out[b] = cols[b] + normed * bn.weight[:, None] + bn.bias[:, None]
    return out.view_as(x), proj.view(batch, m.num_nodes, *x.shape[2:])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape", [(2, 16, 3, 5), (1, 16, 2, 3, 2)])
def test_matches_paper(shape, normalize):
    torch.manual_seed(0)
    module = randomize_(GloRe(16, normalize=normalize), norm_statistics=True).eval()
    x = torch.randn(shape)
    expected, proj = glore_reference(module, x, normalize)
    out, maps = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, proj, rtol=1e-10, atol=1e-10)


def test_official_widths_and_identity_at_init():
    module = GloRe(64)
    assert module.state_channels == 32 and module.num_nodes == 16  # S = C/2, N = C/4
    assert module.norm.eps == 1e-4 and (module.norm.weight == 0).all()
    assert module.node_conv.bias is not None and module.state_conv.bias is None
    x = torch.randn(2, 64, 5, 5)
    assert torch.equal(module(x), x)
    module(x).mul(torch.randn_like(x)).sum().backward()
    assert module.norm.weight.grad.abs().sum() > 0  # the zero scale still learns


def test_normalize_makes_nodes_independent_of_the_input_size():
    # the same content tiled twice: with 1/L the node features are unchanged, so the output is
    # the tiled output; without it they double (and grow with L until they overflow)
    torch.manual_seed(1)
    x = torch.randn(1, 16, 4, 4)
    tiled = torch.cat([x, x], dim=3)
    normalized = randomize_(GloRe(16, normalize=True), norm_statistics=True).eval()
    torch.testing.assert_close(normalized(tiled), torch.cat([normalized(x)] * 2, dim=3))
    plain = randomize_(GloRe(16), norm_statistics=True).eval()
    assert not torch.allclose(plain(tiled), torch.cat([plain(x)] * 2, dim=3))


def test_large_maps_stay_finite_in_half_precision_with_normalize():
    module = randomize_(GloRe(32, normalize=True), norm_statistics=True).eval().to(torch.float16)
    x = (torch.randn(1, 32, 64, 64) * 4).to(torch.float16)
    assert torch.isfinite(module(x)).all()


def test_no_position_by_position_buffer():
    module = GloRe(32).float().eval()
    x = torch.randn(1, 32, 24, 24, dtype=torch.float32)
    n = 24 * 24
    with torch.no_grad(), OpRecorder() as rec:
        module(x, return_attn=True)
    assert rec.largest_storage < n * n // 8


def test_registered_and_errors():
    spec = attnzoo.get_spec("glore")
    assert spec.family == "non_local" and spec.placement == "stage" and spec.map_kind == "spatial"
    with pytest.raises(ValueError, match="num_nodes"):
        GloRe(16, num_nodes=0)
