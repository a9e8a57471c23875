"""graph_self_attention: a float64 per-node loop reference from the paper's GSA equations, dense and
sparse formulations, the complete graph against mha, nodes without incoming edges, and the
binary-partition graph builder."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import attnzoo
from attnzoo.graph.graph_self_attention import (
    GraphSelfAttention,
    binary_partition_graph,
    dense_to_edge_index,
)
from attnzoo.sequence.mha import MultiheadAttention
from attnzoo.testing import randomize_

D, H = 16, 4


perturbed = partial(randomize_, scale=0.1, shift=True)


def features(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_graph(n: int, p: float = 0.3, seed: int = 2) -> torch.Tensor:
    """A directed graph without duplicate edges as an (N, N) adjacency (row attends to column)."""
    adjacency = torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) < p
    adjacency[1] = False  # node 1 has no incoming edge
    return adjacency


def reference(module: GraphSelfAttention, x: torch.Tensor, edge_index, edge_type=None) -> torch.Tensor:
    """GSA written from the paper, one target node and one head at a time."""
    n, d_k = x.shape[0], D // H
    wq, wk, wv, wo = (
        p.weight.double() for p in (module.q_proj, module.k_proj, module.v_proj, module.out_proj)
    )
    bias = [
        p.bias.double() if p.bias is not None else torch.zeros(D, dtype=torch.float64)
        for p in (module.q_proj, module.k_proj, module.v_proj, module.out_proj)
    ]
    q, k, v = x @ wq.T + bias[0], x @ wk.T + bias[1], x @ wv.T + bias[2]
    heads = torch.zeros(n, D, dtype=torch.float64)
    for u in range(n):
        incoming = [e for e in range(edge_index.shape[1]) if int(edge_index[1, e]) == u]
        if not incoming:
            continue  # A(u) is empty: nothing to attend to, a zero message
        for i in range(H):
            cols = slice(i * d_k, (i + 1) * d_k)
            scores = []
            for e in incoming:
                src = int(edge_index[0, e])
                key = k[src, cols]
                if edge_type is not None:
                    key = key + module.rel_key[int(edge_type[e])].double()
                scores.append(float((q[u, cols] @ key).detach()) / math.sqrt(d_k))
            top = max(scores)
            exp = [math.exp(s - top) for s in scores]
            for weight, e in zip(exp, incoming):
                heads[u, cols] += weight / sum(exp) * v[int(edge_index[0, e]), cols]
    return heads @ wo.T + bias[3]


def test_registered_by_catalog_name():
    spec = attnzoo.get_spec("graph_self_attention")
    assert spec.cls is GraphSelfAttention and spec.family == "graph" and spec.batch_dim is None
    assert spec.paper.arxiv == "1911.04070"


@pytest.mark.parametrize("with_types", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference_on_the_bp_graph(with_types, bias):
    graph = binary_partition_graph(9, k=2)
    types = graph.num_edge_types if with_types else 0
    module = perturbed(GraphSelfAttention(D, H, num_edge_types=types, bias=bias, dtype=torch.float64))
    x = features(graph.num_nodes)
    edge_type = graph.edge_type if with_types else None
    out, weights = module(x, graph.edge_index, edge_type, return_attn=True)
    torch.testing.assert_close(out, reference(module, x, graph.edge_index, edge_type), rtol=1e-10, atol=1e-10)
    # per-edge weights: in [0, 1], summing to one over each target's incoming edges
    assert weights.shape == (graph.edge_index.shape[1], H)
    assert (weights >= 0).all() and (weights <= 1).all()
    totals = torch.zeros(graph.num_nodes, H, dtype=weights.dtype).index_add(0, graph.edge_index[1], weights)
    torch.testing.assert_close(totals, torch.ones_like(totals))


def test_duplicate_edges_count_twice_like_the_reference():
    module = perturbed(GraphSelfAttention(D, H, dtype=torch.float64))
    x = features(5)
    edge_index = torch.tensor([[0, 0, 2, 3, 4, 4], [1, 1, 1, 1, 0, 2]])
    torch.testing.assert_close(
        module(x, edge_index), reference(module, x, edge_index), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("with_types", [False, True])
def test_dense_adjacency_and_edge_index_agree(with_types):
    n = 11
    adjacency = random_graph(n)
    edge_index = dense_to_edge_index(adjacency)
    generator = torch.Generator().manual_seed(3)
    dense_types = torch.randint(0, 7, (n, n), generator=generator)
    sparse_types = dense_types[edge_index[1], edge_index[0]]
    module = perturbed(GraphSelfAttention(D, H, num_edge_types=7 if with_types else 0, dtype=torch.float64))
    x = features(n)
    dense_out, dense_maps = module(x, adjacency, dense_types if with_types else None, return_attn=True)
    sparse_out, sparse_maps = module(x, edge_index, sparse_types if with_types else None, return_attn=True)
    torch.testing.assert_close(dense_out, sparse_out, rtol=1e-10, atol=1e-10)
    # (h, N, N)[:, u, v] is the weight of edge v -> u
    torch.testing.assert_close(dense_maps[:, edge_index[1], edge_index[0]].T, sparse_maps)
    assert dense_maps[:, ~adjacency].abs().max() == 0
    # the fused dense path (no maps) agrees too
    torch.testing.assert_close(module(x, adjacency, dense_types if with_types else None), dense_out)


def test_adjacency_rows_are_the_attending_nodes():
    """adjacency[u, v] = u attends to v: only u's output reads x[v]."""
    module = perturbed(GraphSelfAttention(D, H, bias=True, dtype=torch.float64))
    adjacency = torch.zeros(3, 3, dtype=torch.bool)
    adjacency[0, 2] = True
    x = features(3).requires_grad_()
    out = module(x, adjacency)
    out[0].sum().backward()
    assert x.grad[2].abs().sum() > 0 and x.grad[1].abs().sum() == 0
    assert torch.equal(dense_to_edge_index(adjacency), torch.tensor([[2], [0]]))


@pytest.mark.parametrize("bias", [False, True])
def test_complete_graph_is_ordinary_multi_head_self_attention(bias):
    n = 10
    gsa = perturbed(GraphSelfAttention(D, H, bias=bias, dtype=torch.float64))
    mha = MultiheadAttention(D, H, bias=bias, dtype=torch.float64)
    mha.load_state_dict(gsa.state_dict())  # same parameter names: q/k/v/out_proj
    x = features(n)
    everyone = torch.ones(n, n, dtype=torch.bool)
    expected, expected_maps = mha(x.unsqueeze(0), return_attn=True, average_heads=False)
    for graph in (everyone, dense_to_edge_index(everyone)):
        out, maps = gsa(x, graph, return_attn=True)
        torch.testing.assert_close(out, expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        maps, expected_maps[0][:, torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)].T
    )


@pytest.mark.parametrize("dense", [False, True])
def test_node_without_incoming_edges_gets_a_zero_message_and_finite_gradients(dense):
    module = perturbed(GraphSelfAttention(D, H, bias=True))
    adjacency = random_graph(8)
    graph = adjacency if dense else dense_to_edge_index(adjacency)
    x = features(8, dtype=torch.float32).requires_grad_()
    out = module(x, graph)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], module.out_proj.bias.detach())  # W^O 0 + b^O
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in module.parameters():
        assert torch.isfinite(p.grad).all()
    # an edgeless graph: every message is zero
    empty = torch.zeros(2, 0, dtype=torch.long)
    torch.testing.assert_close(module(x, empty), module.out_proj.bias.expand(8, D))


def test_large_logits_stay_finite_and_accurate():
    graph = binary_partition_graph(16, k=2)
    module = perturbed(GraphSelfAttention(D, H, num_edge_types=graph.num_edge_types))
    x = 300.0 * features(graph.num_nodes, dtype=torch.float32)
    out = module(x, graph.edge_index, graph.edge_type)
    assert torch.isfinite(out).all()
    expected = module.double()(x.double(), graph.edge_index, graph.edge_type)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


def test_bfloat16_close_to_float32_on_a_bp_graph():
    graph = binary_partition_graph(64, k=4)
    module = perturbed(GraphSelfAttention(D, H, num_edge_types=graph.num_edge_types))
    x = features(graph.num_nodes, dtype=torch.float32)
    expected = module(x, graph.edge_index, graph.edge_type)
    out = module.to(torch.bfloat16)(x.bfloat16(), graph.edge_index, graph.edge_type)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).norm() / expected.norm() < 2e-2


def test_edge_type_table_is_trained_and_changes_the_output():
    graph = binary_partition_graph(12, k=2)
    module = perturbed(GraphSelfAttention(D, H, num_edge_types=graph.num_edge_types))
    x = features(graph.num_nodes, dtype=torch.float32)
    with_types = module(x, graph.edge_index, graph.edge_type)
    assert not torch.allclose(with_types, module(x, graph.edge_index))
    with_types.sum().backward()
    used = torch.unique(graph.edge_type)
    assert module.rel_key.grad[used].abs().sum(-1).gt(0).all()


def test_exports_with_edge_types():
    graph = binary_partition_graph(8, k=2)
    module = perturbed(GraphSelfAttention(D, H, num_edge_types=graph.num_edge_types)).eval()
    x = features(graph.num_nodes, dtype=torch.float32)
    inputs = (x, graph.edge_index, graph.edge_type)
    program = torch.export.export(module, inputs)
    torch.testing.assert_close(program.module()(*inputs), module(*inputs))


def test_bad_graphs_are_rejected():
    module = GraphSelfAttention(D, H)
    x = features(4, dtype=torch.float32)
    with pytest.raises(TypeError, match="edge_index"):
        module(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        module(x, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        module(x, torch.tensor([[0, 4], [1, 1]]))
    with pytest.raises(ValueError, match=r"\(N, N\)"):
        module(x, torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_edge_types"):
        module(x, torch.tensor([[0], [1]]), torch.tensor([0]))
    typed = GraphSelfAttention(D, H, num_edge_types=3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        typed(x, torch.tensor([[0], [1]]), torch.tensor([3]))
    with pytest.raises(ValueError, match="shape"):
        typed(x, torch.tensor([[0], [1]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_heads"):
        GraphSelfAttention(D, 3)


# ---------------------------------------------------------------- the binary-partition graph


def spans(n: int) -> dict[int, tuple[int, int, int]]:
    """node id -> (level, first token, last token + 1), from the partition's definition."""
    out, node, level, size = {}, 0, 0, n
    while True:
        for i in range(size):
            out[node] = (level, i * 2**level, min((i + 1) * 2**level, n))
            node += 1
        if size == 1:
            return out
        size, level = (size + 1) // 2, level + 1


def incoming(graph, node: int) -> list[tuple[int, int]]:
    mask = graph.edge_index[1] == node
    return list(zip(graph.edge_index[0][mask].tolist(), graph.edge_type[mask].tolist()))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 13, 33, 64])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_bp_graph_contexts_tile_the_sequence_fine_to_coarse(n, k):
    graph = binary_partition_graph(n, k)
    span = spans(n)
    assert graph.num_nodes == len(span) and graph.num_tokens == n
    for token in range(n):
        covered = []
        for source, _ in incoming(graph, token):
            level, start, stop = span[source]
            covered.extend(range(start, stop))
            # farther context is never finer than nearer context on the same side
        assert sorted(covered) == list(range(n)), f"token {token}: {sorted(covered)}"
        for side in (-1, 1):
            chosen = [span[s] for s, _ in incoming(graph, token) if (span[s][1] - token) * side > 0]
            chosen.sort(key=lambda sp: abs(sp[1] - token))
            levels = [sp[0] for sp in chosen]
            assert levels == sorted(levels)
            for level in set(levels):
                # k nodes per level, counting the finer node that may open a level with it
                assert levels.count(level) <= k + 1
    for node, (level, start, stop) in span.items():
        if level > 0:
            assert sorted(s for s, _ in incoming(graph, node)) == list(range(start, stop))


def test_bp_graph_pinned_small_case():
    graph = binary_partition_graph(8, k=1)
    assert graph.level_offsets == (0, 8, 12, 14) and graph.num_nodes == 15
    # token 3: itself; left: token 2, span {0,1} (node 8); right: token 4, token 5 (opening level 1
    # because span {4,5} would overlap token 4), span {6,7} (node 11)
    assert sorted(s for s, _ in incoming(graph, 3)) == [2, 3, 4, 5, 8, 11]
    types = dict(incoming(graph, 3))
    per_level = 3  # 2k + 1
    assert types[3] == 0 and types[2] == 1 and types[4] == 2
    assert types[8] == per_level + 1 and types[5] == per_level + 2 and types[11] == 2 * per_level + 2


def test_bp_graph_causal_and_sizes():
    n, k = 50, 2
    graph = binary_partition_graph(n, k, causal=True)
    span = spans(n)
    for token in range(n):
        covered = sorted(t for s, _ in incoming(graph, token) for t in range(*span[s][1:]))
        assert covered == list(range(token + 1))
    full = binary_partition_graph(n, k)
    assert graph.edge_index.shape[1] < full.edge_index.shape[1]
    assert int(full.edge_type.max()) < full.num_edge_types == (2 * k + 1) * 11
    # O(k n log(n / k)) edges, far fewer than n^2
    assert full.edge_index.shape[1] <= n * (2 * k + 2) * (math.ceil(math.log2(n)) + 1)
    with pytest.raises(ValueError, match="length"):
        binary_partition_graph(0)
    with pytest.raises(ValueError, match="k"):
        binary_partition_graph(5, 0)


def test_inference_path_matches_the_training_path():
    """Without gradients the logits are batched dot products and the messages are weighted in place;
    the result equals the plain products' that autograd runs, and gradients still reach x."""
    torch.manual_seed(5)
    graph = binary_partition_graph(37, k=2)
    module = GraphSelfAttention(32, 4, num_edge_types=graph.num_edge_types, dtype=torch.float64)
    x = torch.randn(graph.num_nodes, 32, dtype=torch.float64)
    with torch.no_grad():
        fast, fast_maps = module(x, graph.edge_index, graph.edge_type, return_attn=True)
    x.requires_grad_()
    plain, plain_maps = module(x, graph.edge_index, graph.edge_type, return_attn=True)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_maps, plain_maps, rtol=1e-12, atol=1e-12)
    plain.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_sum_into_targets_matches_index_add_and_keeps_only_the_index():
    """The per-target sum's backward is index_add's (gradcheck in float64) without keeping the
    (E, ...) source: only the index is saved."""
    from attnzoo.graph.graph_self_attention import _sum_into_targets

    generator = torch.Generator().manual_seed(0)
    source = torch.randn(9, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 2, 2, 4, 0, 1, 4, 4, 2])
    expected = torch.zeros(5, 2, 3, dtype=torch.float64).index_add(0, index, source)
    torch.testing.assert_close(_sum_into_targets(source, index, 5), expected)
    assert torch.autograd.gradcheck(lambda s: _sum_into_targets(s, index, 5), (source,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _sum_into_targets(source * 2, index, 5)
    assert [t.shape for t in saved if t.is_floating_point()] == []  # mul keeps a scalar at most


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_per_graph_gradients_with_torch_func():
    """vmap(grad(loss)) over a stack of feature sets on one graph (torch.func's per-sample
    gradients) gives each set's autograd gradients: the training-time scatter Function composes
    with the transforms."""
    module = GraphSelfAttention(16, 2, bias=True).double()
    randomize_(module, seed=0, scale=0.3, shift=True)
    edge_index = torch.randint(0, 6, (2, 20), generator=torch.Generator().manual_seed(1))
    features = torch.randn(3, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    direction = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def loss(params, x):
        return (torch.func.functional_call(module, params, (x, edge_index)) * direction).sum()

    params = {n: p.detach() for n, p in module.named_parameters()}
    per_graph = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, features)
    for i, x in enumerate(features):
        leaves = {n: p.detach().requires_grad_() for n, p in module.named_parameters()}
        expected = torch.autograd.grad(loss(leaves, x), list(leaves.values()))
        for name, want in zip(leaves, expected):
            torch.testing.assert_close(per_graph[name][i], want, rtol=1e-10, atol=1e-12)
