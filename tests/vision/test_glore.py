"""glore: the unit in float64 from the paper's projection / GCN / reverse projection (official GCN
form), identity at init, default widths, the 1/L normalisation, memory, hooked and pruned graph
convolutions."""

from __future__ import annotations

import copy

import pytest
import torch

import attnzoo
from attnzoo.functional import graph_reasoning
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


def test_hooks_on_the_graph_convolutions_run_and_change_nothing():
    """A no-op forward hook on node_conv and on state_conv runs, in eval and in a training step,
    and changes neither the output nor a gradient (bugs: the graph convolution read the convs'
    weights and skipped their hooks; the module path convolved the wrong axis, V instead of V^T,
    or dropped the identity, the bias or the ReLU)."""
    torch.manual_seed(2)
    plain = randomize_(GloRe(16), norm_statistics=True)
    hooked = copy.deepcopy(plain)  # the training steps update the BatchNorm statistics: one copy each
    x = torch.randn(2, 16, 3, 5)

    def run(module: GloRe):
        module.eval()
        with torch.no_grad():
            out = module(x)
        module.train()
        x_grad = x.clone().requires_grad_()
        params = (
            x_grad,
            *module.node_conv.parameters(),
            *module.state_conv.parameters(),
            module.state.weight,
        )
        return out, torch.autograd.grad(module(x_grad).square().sum(), params)

    expected_out, expected_grads = run(plain)
    calls = []
    for name in ("node_conv", "state_conv"):
        hook = lambda layer, args, out, name=name: calls.append((name, tuple(args[0].shape)))  # noqa: E731
        getattr(hooked, name).register_forward_hook(hook)
    out, grads = run(hooked)
    # both runs called the node conv on V^T, (B, N, S), and the state conv on (B, S, N)
    assert calls == [("node_conv", (2, 4, 8)), ("state_conv", (2, 8, 4))] * 2
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(expected_grads) == 5
    for g, e in zip(grads, expected_grads):
        assert e.abs().sum() > 0  # every compared gradient is one the unit produces
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_pruning_the_node_conv_takes_effect_on_every_call():
    """``prune`` recomputes ``node_conv.weight = weight_orig * mask`` in a forward pre-hook: the
    output follows a later change to ``weight_orig`` as a plain unit with that weight does (bug:
    the graph convolution read the stale ``node_conv.weight``)."""
    from torch.nn.utils import prune

    torch.manual_seed(3)
    module = randomize_(GloRe(16), norm_statistics=True).eval()
    reference = copy.deepcopy(module)
    x = torch.randn(2, 16, 4, 3)
    prune.l1_unstructured(module.node_conv, "weight", amount=0.5)
    with torch.no_grad():
        before = module(x)
        module.node_conv.weight_orig.mul_(-2.0)  # only the pre-hook carries this into node_conv.weight
        pruned = module(x)
        reference.node_conv.weight.copy_(module.node_conv.weight_orig * module.node_conv.weight_mask)
        expected = reference(x)
    assert (module.node_conv.weight_mask == 0).sum() == 8  # half of the 4 x 4 adjacency is pruned
    torch.testing.assert_close(pruned, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(pruned, before, rtol=0, atol=1e-6)  # the change reached the output


def test_a_hooked_unit_runs_in_half_precision():
    """With hooked graph convolutions in bfloat16 the node features, summed over the positions in
    float32, are passed in the layers' dtype, and the output is the float64 unit's to bfloat16
    precision (bug: the float32 node features met the bfloat16 convs, a dtype error)."""
    torch.manual_seed(4)
    module = randomize_(GloRe(16, normalize=True), norm_statistics=True).eval()
    x = torch.randn(2, 16, 6, 6)
    expected = module(x)  # float64
    half = copy.deepcopy(module).to(torch.bfloat16)
    half.node_conv.register_forward_hook(lambda layer, args, out: None)
    half.state_conv.register_forward_pre_hook(lambda layer, args: None)
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits: every entry within 2% of the largest (the fast path's error is 0.6%)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0.02 * expected.abs().max().item())


def test_registered_and_errors():
    spec = attnzoo.get_spec("glore")
    assert spec.family == "non_local" and spec.placement == "stage" and spec.map_kind == "spatial"
    with pytest.raises(ValueError, match="num_nodes"):
        GloRe(16, num_nodes=0)
    # each graph-convolution step given once: as a weight or as a layer, never both or neither
    state, projection = torch.randn(1, 8, 5), torch.randn(1, 4, 5)
    node_conv, state_conv = torch.nn.Conv1d(4, 4, 1), torch.nn.Conv1d(8, 8, 1, bias=False)
    with pytest.raises(ValueError, match="node_weight and node_layer"):
        graph_reasoning(state, projection, state_layer=state_conv)
    with pytest.raises(ValueError, match="node_weight and node_layer"):
        graph_reasoning(state, projection, torch.eye(4), None, node_layer=node_conv, state_layer=state_conv)
