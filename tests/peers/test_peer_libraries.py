"""attnzoo against the peer libraries themselves, with the same weights in both: keras' attention
layers (its torch backend) and PyG's ``TransformerConv``. Outputs, attention weights and the
gradients of every input and weight must agree.

The benchmarks reproduce the peers that cannot be installed here (timm imports torchvision, mmcv
needs its compiled ops); these two install by name, and the test extra installs them. Each is
imported by a fixture, so that only the worker that runs these tests pays for the import (keras
takes seconds). Where they differ by design, the inputs avoid it and the test says so: keras
masks with -1e9 rather than -inf (a fully masked row is uniform in ``Attention``, zero here), and
its causal mask aligns a shorter query block with the first keys (top-left) where attnzoo's aligns
it with the last (bottom-right, as incremental decoding needs); the two agree for N_q == N_k.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from types import ModuleType

import pytest
import torch
from torch import Tensor

from attnzoo.graph.graph_self_attention import GraphSelfAttention
from attnzoo.sequence.attention import Attention
from attnzoo.sequence.mha import MultiheadAttention
from attnzoo.testing import randomize_

#: keras' torch backend runs its products in float32 whatever the layer's dtype
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def keras() -> ModuleType:
    if os.environ.setdefault("KERAS_BACKEND", "torch") != "torch":
        pytest.skip(f"keras runs on its {os.environ['KERAS_BACKEND']} backend here, not torch")
    return pytest.importorskip("keras")


@pytest.fixture(scope="module")
def pyg_nn() -> ModuleType:
    return pytest.importorskip("torch_geometric.nn")


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def leaves(*shapes: tuple[int, ...]) -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]


def gradients(run: Callable[[], Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
    """The gradients of ``tensors`` from a random projection of ``run()`` (the same projection on
    every call; a plain sum can cancel, since softmax rows sum to one)."""
    for t in tensors:
        t.grad = None
    out = run()
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * direction).sum().backward()
    assert all(t.grad is not None for t in tensors), "a tensor got no gradient"
    return [t.grad.clone() for t in tensors]


def key_padding(batch: int, n_k: int) -> Tensor:
    """(B, N_k) bool, True at real keys: item b keeps its first N_k - 2b keys (at least one)."""
    return torch.arange(n_k) < (n_k - 2 * torch.arange(batch)).clamp(min=1).unsqueeze(1)


MASKINGS = ["none", "key_mask", "causal", "key_mask+causal"]


# ---------------------------------------------------------------------------------------------
# keras.layers.Attention and AdditiveAttention against attnzoo's attention


@pytest.mark.parametrize("use_scale", [False, True])
@pytest.mark.parametrize("masking", MASKINGS)
def test_dot_score_is_keras_attention(keras: ModuleType, use_scale: bool, masking: str) -> None:
    """keras ``Attention(score_mode="dot")``: softmax(s q k^T) v, its learned scalar s
    (``use_scale``; none without) as attnzoo's fixed ``scale``."""
    batch, n, d = 3, 6, 8  # N_q == N_k: the two causal conventions agree
    q, k, v = leaves((batch, n, d), (batch, n, d), (batch, n, d))
    peer = keras.layers.Attention(use_scale=use_scale)
    peer.build([q.shape, v.shape, k.shape])
    if use_scale:
        peer.scale.assign(0.7)
    ours = Attention(d, score="dot", scale=0.7 if use_scale else None)
    key_mask = key_padding(batch, n) if "key_mask" in masking else None
    causal = "causal" in masking

    def theirs(**kw: bool) -> tuple[Tensor, Tensor] | Tensor:  # keras takes [query, value, key]
        return peer([q, v, k], mask=[None, key_mask], use_causal_mask=causal, **kw)

    out, maps = ours(q, k, v, key_mask=key_mask, causal=causal, return_attn=True)
    their_out, their_maps = theirs(return_attention_scores=True)
    assert_close(out, their_out, "output")
    assert_close(maps, their_maps, "weights")
    mine = gradients(lambda: ours(q, k, v, key_mask=key_mask, causal=causal), (q, k, v))
    peer_grads = gradients(theirs, (q, k, v))
    for name, a, b in zip("qkv", mine, peer_grads):
        assert_close(a, b, f"gradient of {name}")


@pytest.mark.parametrize("masking", ["none", "key_mask"])
def test_concat_score_is_keras_concat_attention(keras: ModuleType, masking: str) -> None:
    """keras ``Attention(score_mode="concat", use_scale=True)``: c sum_a tanh(s (q + k))_a with
    learned scalars s and c, which is attnzoo's concat score v_a^T tanh(W_a [q; k]) with
    W_a = s [I, I] and v_a = c 1. The gradients of s and c are the sums of the matching entries."""
    batch, n_q, n_k, d = 2, 5, 7, 8
    q, k, v = leaves((batch, n_q, d), (batch, n_k, d), (batch, n_k, 6))
    s, c = 0.6, -1.3
    peer = keras.layers.Attention(use_scale=True, score_mode="concat")
    peer.build([q.shape, v.shape, k.shape])
    peer.scale.assign(s)
    peer.concat_score_weight.assign(c)
    ours = Attention(d, score="concat", attn_dim=d)
    eye = torch.eye(d)
    with torch.no_grad():
        ours.w.copy_(s * torch.cat([eye, eye], dim=1))  # (A, D_q + D_k)
        ours.v_a.fill_(c)
    key_mask = key_padding(batch, n_k) if masking == "key_mask" else None
    out, maps = ours(q, k, v, key_mask=key_mask, return_attn=True)
    their_out, their_maps = peer([q, v, k], mask=[None, key_mask], return_attention_scores=True)
    assert_close(out, their_out, "output")
    assert_close(maps, their_maps, "weights")
    *mine, grad_w, grad_v_a = gradients(lambda: ours(q, k, v, key_mask=key_mask), (q, k, v, ours.w, ours.v_a))
    scalars = (peer.scale.value, peer.concat_score_weight.value)
    *theirs, grad_s, grad_c = gradients(lambda: peer([q, v, k], mask=[None, key_mask]), (q, k, v, *scalars))
    for name, a, b in zip("qkv", mine, theirs):
        assert_close(a, b, f"gradient of {name}")
    # d/ds of W_a = s [I, I]: the diagonals of both halves; d/dc of v_a = c 1: the sum
    assert_close(grad_w[:, :d].diagonal().sum() + grad_w[:, d:].diagonal().sum(), grad_s, "gradient of s")
    assert_close(grad_v_a.sum(), grad_c, "gradient of c")


def test_additive_score_is_keras_additive_attention(keras: ModuleType) -> None:
    """keras ``AdditiveAttention(use_scale=True)``: sum_a s_a tanh(q + k)_a with a learned (D,)
    vector s, which is attnzoo's additive score v_a^T tanh(W_q q + W_k k) with W_q = W_k = I and
    v_a = s (its gradient too)."""
    batch, n_q, n_k, d = 2, 4, 9, 8
    q, k, v = leaves((batch, n_q, d), (batch, n_k, d), (batch, n_k, 5))
    key_mask = key_padding(batch, n_k)
    peer = keras.layers.AdditiveAttention(use_scale=True)
    peer.build([q.shape, v.shape, k.shape])
    scale = torch.linspace(-1.0, 1.5, d)
    peer.scale.assign(scale)
    ours = Attention(d, score="additive", attn_dim=d)
    with torch.no_grad():
        ours.w_q.copy_(torch.eye(d))
        ours.w_k.copy_(torch.eye(d))
        ours.v_a.copy_(scale)
    out, maps = ours(q, k, v, key_mask=key_mask, return_attn=True)
    their_out, their_maps = peer([q, v, k], mask=[None, key_mask], return_attention_scores=True)
    assert_close(out, their_out, "output")
    assert_close(maps, their_maps, "weights")
    *mine, grad_v_a = gradients(lambda: ours(q, k, v, key_mask=key_mask), (q, k, v, ours.v_a))
    *theirs, grad_s = gradients(lambda: peer([q, v, k], mask=[None, key_mask]), (q, k, v, peer.scale.value))
    for name, a, b in zip(["q", "k", "v", "v_a (keras' scale)"], [*mine, grad_v_a], [*theirs, grad_s]):
        assert_close(a, b, f"gradient of {name}")


# ---------------------------------------------------------------------------------------------
# keras.layers.MultiHeadAttention against attnzoo's mha


def keras_mha_like(keras: ModuleType, ours: MultiheadAttention, query: Tensor, key: Tensor) -> object:
    """A keras ``MultiHeadAttention`` holding ``ours``' weights. keras' kernels are (D_in, h, d)
    for the input projections, biases (h, d), and (h, d, D) for the output; ours (h d, D_in)."""
    h, d = ours.num_heads, ours.head_dim
    peer = keras.layers.MultiHeadAttention(num_heads=h, key_dim=d)
    peer(query.detach(), key.detach(), key.detach())  # builds it for these widths
    denses = (peer._query_dense, peer._key_dense, peer._value_dense)
    with torch.no_grad():
        for dense, proj in zip(denses, (ours.q_proj, ours.k_proj, ours.v_proj)):
            dense.kernel.assign(proj.weight.t().reshape(-1, h, d))  # (h d, D_in) -> (D_in, h, d)
            dense.bias.assign(proj.bias.reshape(h, d))
        peer._output_dense.kernel.assign(ours.out_proj.weight.t().reshape(h, d, -1))  # (D, h d) -> (h, d, D)
        peer._output_dense.bias.assign(ours.out_proj.bias)
    return peer


def keras_mha_gradients(peer: object) -> list[Tensor]:
    """keras' kernels and biases in the order and layout of ours' q, k, v, out weights and biases."""
    denses = (peer._query_dense, peer._key_dense, peer._value_dense, peer._output_dense)
    return [d.kernel.value for d in denses] + [d.bias.value for d in denses]


def as_ours(grads: list[Tensor], h: int, d: int) -> list[Tensor]:
    """keras' kernel and bias gradients in ours' layouts (the inverse of :func:`keras_mha_like`)."""
    kernels, biases = grads[:4], grads[4:]
    projections = [g.reshape(g.shape[0], h * d).t() for g in kernels[:3]]  # (D_in, h, d) -> (h d, D_in)
    output = kernels[3].reshape(h * d, -1).t()  # (h, d, D) -> (D, h d)
    return [*projections, output, *(b.reshape(-1) for b in biases)]


@pytest.mark.parametrize("masking", ["none", "attn_mask", "causal", "attn_mask+causal"])
@pytest.mark.parametrize("form", ["self", "cross"])
def test_mha_is_keras_multi_head_attention(keras: ModuleType, form: str, masking: str) -> None:
    """Self- and cross-attention (keys of another width), a (B, N_q, N_k) bool mask (True = may
    attend in both) and keras' causal mask; outputs, per-head weights and every gradient."""
    torch.manual_seed(0)
    batch, n, e, h = 2, 6, 32, 4
    cross = form == "cross"
    kdim = 24 if cross else e
    ours = MultiheadAttention(e, h, kdim=kdim if cross else None, vdim=kdim if cross else None)
    randomize_(ours, seed=0, scale=0.3, shift=True)  # non-zero biases
    query, key = leaves((batch, n, e), (batch, n, kdim))
    key = key if cross else query
    attn_mask = None
    if "attn_mask" in masking:  # a random pattern that keeps every query's diagonal key
        generator = torch.Generator().manual_seed(3)
        attn_mask = (torch.rand(batch, n, n, generator=generator) < 0.6) | torch.eye(n, dtype=torch.bool)
    causal = "causal" in masking
    peer = keras_mha_like(keras, ours, query, key)
    inputs = (query, key) if cross else (query,)

    memory = key if cross else None  # self-attention: ours defaults key and value to the query

    def mine(**kw: bool) -> tuple[Tensor, Tensor] | Tensor:
        return ours(query, memory, memory, attn_mask=attn_mask, causal=causal, **kw)

    def theirs(**kw: bool) -> tuple[Tensor, Tensor] | Tensor:  # keras takes (query, value, key)
        return peer(query, key, key, attention_mask=attn_mask, use_causal_mask=causal, **kw)

    out, maps = mine(return_attn=True, average_heads=False)
    their_out, their_maps = theirs(return_attention_scores=True)
    assert_close(out, their_out, "output")
    assert_close(maps, their_maps, "per-head weights")
    ours_weights = [p.weight for p in (ours.q_proj, ours.k_proj, ours.v_proj, ours.out_proj)]
    ours_biases = [p.bias for p in (ours.q_proj, ours.k_proj, ours.v_proj, ours.out_proj)]
    mine_grads = gradients(mine, (*inputs, *ours_weights, *ours_biases))
    their_grads = gradients(theirs, (*inputs, *keras_mha_gradients(peer)))
    names = [f"input {i}" for i in range(len(inputs))]
    names += ["W^Q", "W^K", "W^V", "W^O", "b^Q", "b^K", "b^V", "b^O"]
    their_grads = their_grads[: len(inputs)] + as_ours(their_grads[len(inputs) :], h, ours.head_dim)
    for name, a, b in zip(names, mine_grads, their_grads):
        assert_close(a, b, f"gradient of {name}")


# ---------------------------------------------------------------------------------------------
# PyG's TransformerConv against attnzoo's graph_self_attention


def a_graph(num_nodes: int) -> Tensor:
    """(2, E) edges (row 0 the source, row 1 the target) with a self-loop, a duplicated edge, a
    node with no incoming edge (the last: its message is zero in both) and random others."""
    generator = torch.Generator().manual_seed(5)
    random = torch.randint(0, num_nodes - 1, (2, 4 * num_nodes), generator=generator)
    special = torch.tensor([[0, 3, 3, num_nodes - 1], [0, 1, 1, 2]])  # self-loop, duplicate, from the last
    edges = torch.cat([special, random], dim=1)
    return edges[:, edges[1] != num_nodes - 1]  # nothing reaches the last node


@pytest.mark.parametrize("bias", [False, True])
def test_graph_self_attention_is_pyg_transformer_conv(pyg_nn: ModuleType, bias: bool) -> None:
    """``TransformerConv(D, D / h, heads=h, root_weight=False)`` computes every head's
    softmax over a node's incoming edges of q_u . k_v / sqrt(d), then sum alpha v_v; attnzoo's
    W^O follows it. Outputs, per-edge weights (E, h) and the gradients of x and every weight;
    the dense (N, N) adjacency form of the same graph gives the same output."""
    num_nodes, e, h = 10, 32, 4
    edge_index = a_graph(num_nodes)
    ours = GraphSelfAttention(e, h, bias=bias)
    randomize_(ours, seed=0, scale=0.3, shift=True)
    conv = pyg_nn.TransformerConv(e, e // h, heads=h, root_weight=False, bias=bias)
    pairs = ((conv.lin_query, ours.q_proj), (conv.lin_key, ours.k_proj), (conv.lin_value, ours.v_proj))
    with torch.no_grad():
        for lin, proj in pairs:
            lin.weight.copy_(proj.weight)
            if bias:
                lin.bias.copy_(proj.bias)
    (x,) = leaves((num_nodes, e))

    def theirs() -> Tensor:
        return ours.out_proj(conv(x, edge_index))

    out, maps = ours(x, edge_index, return_attn=True)
    _, (their_edges, alpha) = conv(x, edge_index, return_attention_weights=True)
    assert torch.equal(their_edges, edge_index)
    assert_close(out, theirs(), "output")
    assert_close(maps, alpha, "per-edge weights")
    torch.testing.assert_close(out[-1], ours.out_proj(torch.zeros(e)), msg="a node with no incoming edge")
    adjacency = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    adjacency[edge_index[1], edge_index[0]] = True  # the duplicate edge counts once here
    unique = adjacency.nonzero().flip(1).t()  # (target, source) -> (2, E') with row 0 the source
    assert_close(ours(x, adjacency), ours.out_proj(conv(x, unique)), "output for the dense adjacency")
    ours_params = [p for proj in (ours.q_proj, ours.k_proj, ours.v_proj) for p in proj.parameters()]
    their_params = [p for lin, _ in pairs for p in lin.parameters()]
    mine = gradients(lambda: ours(x, edge_index), (x, *ours_params))
    peer = gradients(theirs, (x, *their_params))
    for i, (a, b) in enumerate(zip(mine, peer)):
        assert_close(a, b, "gradient of x" if i == 0 else f"gradient of parameter {i}")
