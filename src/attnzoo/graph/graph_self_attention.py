"""Graph self-attention and the binary-partition graph of BP-Transformer.

Ye et al. 2019, "BP-Transformer: Modelling Long-Range Context via Binary Partitioning",
https://arxiv.org/abs/1911.04070 (section 3). Official code: https://github.com/yzh119/BPT.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_device, check_input, parameter_dtype
from attnzoo._tracing import is_eager
from attnzoo.functional.attend import attend_with_weights
from attnzoo.functional.heads import check_heads
from attnzoo.functional.softmax import compute_dtype
from attnzoo.registry import Paper, Sample, Sizes, register

__all__ = ["BPGraph", "GraphSelfAttention", "binary_partition_graph", "dense_to_edge_index"]


class BPGraph(NamedTuple):
    """The binary-partition graph of a sequence (see :func:`binary_partition_graph`).

    Attributes:
        edge_index: (2, E) int64; row 0 the source, row 1 the target: the target attends to the
            source.
        edge_type: (E,) int64 relative-position type of each edge, in [0, num_edge_types).
        num_nodes: token nodes first (ids 0..n-1), then the span nodes level by level, the root last.
        num_tokens: n.
        num_edge_types: (2k + 1) (clip_level + 1).
        level_offsets: the id of the first node of each level (level 0 = the tokens).
    """

    edge_index: Tensor
    edge_type: Tensor
    num_nodes: int
    num_tokens: int
    num_edge_types: int
    level_offsets: tuple[int, ...]


class _SumIntoTargets(torch.autograd.Function):
    """``zeros(num_nodes, ...).index_add(0, index, source)``, whose backward keeps the index alone.

    index_add's own backward keeps its whole ``source`` to expand the gathered gradient to its
    shape: the (E, h, d) weighted messages, one more edge-sized buffer kept to the backward (64 of
    268 MiB saved at 2 x 1024 tokens, d 256, bfloat16). ``scatter_add`` with an expanded index
    keeps only the index too, but its forward and backward (an element-wise gather) ran 1.6 s
    against index_add's 1.2-1.4 s at the benchmark's 526,224 edges in float32.
    """

    generate_vmap_rule = True  # torch.func's vmap and grad compose with it

    @staticmethod
    def forward(source: Tensor, index: Tensor, num_nodes: int) -> Tensor:  # type: ignore[override]
        return source.new_zeros(num_nodes, *source.shape[1:]).index_add(0, index, source)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])  # the index alone

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None, None]:
        (index,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad.index_select(0, index), None, None  # (N, ...) -> (E, ...)


def _sum_into_targets(source: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    """(N, ...) sums of the (E, ...) ``source`` rows over ``index``; in eager autograd through
    :class:`_SumIntoTargets` (traced, compiled and exported graphs see index_add)."""
    if torch.is_grad_enabled() and source.requires_grad and is_eager(source):
        return _SumIntoTargets.apply(source, index, num_nodes)  # type: ignore[no-any-return]
    return source.new_zeros(num_nodes, *source.shape[1:]).index_add(0, index, source)


def _level_sizes(length: int) -> list[int]:
    sizes = [length]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def binary_partition_graph(
    length: int,
    k: int = 4,
    *,
    causal: bool = False,
    clip_level: int = 10,
    device: torch.device | str | None = None,
) -> BPGraph:
    """The BP-Transformer graph of a sequence of ``length`` tokens, ``k`` contexts per level.

    Nodes: the tokens (level 0) and the spans of a binary partition of the sequence; node i of
    level l covers tokens [i 2^l, min((i + 1) 2^l, n)); the levels halve (rounding up) down to the
    root. Edges (the target attends to the source):

    - affiliated: every span node attends to the tokens it covers; every token attends to itself;
    - contextual: every token attends, on each side, to k nodes per level, fine to coarse: the k
      tokens next to it, then k spans of 2 tokens, then of 4, ..., each level starting where the
      previous one stopped, so that the context nodes of a token tile the rest of the sequence
      without overlap. When the next uncovered node is the second child of a partly covered parent,
      the first of the k slots of the coarser level takes that finer node instead of the parent.

    That is O(k n log(n / k)) edges. Edge types (relative positions): ``(2k + 1) min(l, clip_level)
    + s`` with s = 0 for the self and affiliated edges, 2m + 1 for the m-th left context and 2m + 2
    for the m-th right context at level l, as in the official code.

    NOTE: deviates from the official builder, which at the right edge of a sequence whose level
    size is odd can link a token to the first node of the next level instead of skipping a
    non-existent node; here that edge is not made.

    Args:
        length: n, the number of tokens.
        k: contexts per side and level (the paper sweeps 1 to 64; 4 is a common setting).
        causal: drop the right contexts (language modelling; the official ``triu``).
        clip_level: levels above this share the edge types of this level (official default 10).
        device: where to put the index tensors.

    Returns:
        a :class:`BPGraph`; feed ``x`` of shape (num_nodes, D) with the token features in the
        first n rows (span nodes are commonly initialised with zeros or the mean of their tokens).
    """
    if length < 1:
        raise ValueError(f"length: expected a positive sequence length, got {length}")
    if k < 1:
        raise ValueError(f"k: expected at least one context per level, got {k}")
    if clip_level < 0:
        raise ValueError(f"clip_level: expected a non-negative level, got {clip_level}")
    sizes = _level_sizes(length)
    offsets = [0]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    per_level = 2 * k + 1
    tokens = torch.arange(length, device=device)
    sources: list[Tensor] = []
    targets: list[Tensor] = []
    types: list[Tensor] = []

    def add(source: Tensor, target: Tensor, edge_type: int, valid: Tensor) -> None:
        sources.append(source[valid])
        targets.append(target[valid])
        types.append(torch.full((int(valid.sum()),), edge_type, dtype=torch.long, device=device))

    everyone = torch.ones(length, dtype=torch.bool, device=device)
    for level in range(len(sizes)):
        # affiliated edges: the span (or at level 0 the token itself) attends to each of its tokens
        base = per_level * min(level, clip_level)
        add(tokens, offsets[level] + torch.div(tokens, 2**level, rounding_mode="floor"), base, everyone)

    # The loops run over levels and slots (O(k log n)); each step is vectorised over the tokens.
    right, right_finer = tokens + 1, torch.zeros_like(everyone)
    left, left_finer = tokens - 1, torch.zeros_like(everyone)
    for level in range(len(sizes)):
        base = per_level * min(level, clip_level)
        for slot in range(k):
            if not causal:
                same = offsets[level] + right
                valid = ~right_finer & (right < sizes[level])
                if level > 0:
                    finer_index = 2 * right + 1  # the right child of `right`, a node one level down
                    same = torch.where(right_finer, offsets[level - 1] + finer_index, same)
                    valid = valid | (right_finer & (finer_index < sizes[level - 1]))
                add(same, tokens, base + 2 * slot + 2, valid)
            same = offsets[level] + left
            if level > 0:
                same = torch.where(left_finer, offsets[level - 1] + 2 * left, same)  # the left child
            add(same, tokens, base + 2 * slot + 1, left >= 0)
            right, left = right + 1, left - 1
            right_finer, left_finer = torch.zeros_like(everyone), torch.zeros_like(everyone)
        # the next uncovered node is a right (left) child whose sibling is already covered: its
        # parent would overlap the covered range, so the next level starts with that node itself
        right_finer, left_finer = right % 2 == 1, (left % 2 == 0) & (left >= 0)
        right = torch.div(right, 2, rounding_mode="floor")
        left = torch.div(left, 2, rounding_mode="floor")

    edge_index = torch.stack([torch.cat(sources), torch.cat(targets)])  # (2, E)
    return BPGraph(
        edge_index=edge_index,
        edge_type=torch.cat(types),
        num_nodes=sum(sizes),
        num_tokens=length,
        num_edge_types=per_level * (clip_level + 1),
        level_offsets=tuple(offsets),
    )


def dense_to_edge_index(adjacency: Tensor) -> Tensor:
    """Edges of a dense (N, N) bool adjacency where ``adjacency[u, v]`` means u attends to v.

    Returns (2, E) int64 with row 0 the source v and row 1 the target u (rows sorted by target).
    """
    if adjacency.dtype != torch.bool or adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(
            f"adjacency: expected an (N, N) bool tensor, got {adjacency.dtype} of shape "
            f"{tuple(adjacency.shape)}"
        )
    target, source = adjacency.nonzero(as_tuple=True)
    return torch.stack([source, target])


def _example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    graph = binary_partition_graph(s.extent, k=2, device=s.device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(graph.num_nodes, s.width, generator=generator).to(s.device, s.dtype)
    return x, graph.edge_index


def _dense_example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    # the same graph as a bool (N, N) adjacency: row u holds the sources u attends to
    x, edge_index = _example_inputs(s)
    adjacency = torch.zeros(x.shape[0], x.shape[0], dtype=torch.bool, device=x.device)
    adjacency[edge_index[1], edge_index[0]] = True
    return x, adjacency


def _typed_example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    x, edge_index = _example_inputs(s)
    edge_type = torch.arange(edge_index.shape[1], device=x.device) % 3  # (E,) in [0, 3)
    return x, edge_index, edge_type


def _has_values(index: Tensor) -> bool:
    """Whether ``index``'s values can be read here: eager (a value check cannot be traced), not on
    the meta device (shape inference), and not empty."""
    return is_eager(index) and index.device.type != "meta" and index.numel() > 0


def _bounds(index: Tensor) -> tuple[int, int]:
    """``index``'s smallest and largest values, in one read from the device."""
    low, high = torch.aminmax(index)
    return tuple(torch.stack([low, high]).tolist())  # type: ignore[return-value]


@register(
    "graph_self_attention",
    map_kind="edges",
    family="graph",
    paper=Paper("BP-Transformer: Modelling Long-Range Context via Binary Partitioning", "1911.04070"),
    equation="head_i(u) = sum_{v in A(u)} softmax_v(q_u^i . (k_v^i + r_{uv}) / sqrt(d_k)) v_v^i, "
    "GSA(u) = Concat(head_1..head_h)(u) W^O; A(u) = incoming edges of u",
    make_kwargs=lambda s: {"embed_dim": s.width, "num_heads": 4},
    make_inputs=_example_inputs,
    channel_dim=-1,
    batch_dim=None,
    shape_preserving=True,
    cost="time O(E d + N d^2); memory O(E d) (per-edge scores and messages, no N x N matrix); "
    "E = O(k n log(n / k)) on the BP graph",
    notes="relative-position (edge-type) embeddings need num_edge_types > 0 and edge_type in forward; "
    "a dense bool adjacency (N, N) runs the dense masked formulation",
    samples=(
        Sample("dense", inputs=_dense_example_inputs, description="a bool (N, N) adjacency"),
        Sample(
            "edge_types",
            {"num_edge_types": 3},
            inputs=_typed_example_inputs,
            description="relative-position embeddings per edge type",
        ),
    ),
)
class GraphSelfAttention(nn.Module):
    """Multi-head self-attention over the edges of a graph (BP-Transformer's GSA).

    For every node u with neighbours A(u) (the sources of its incoming edges)::

        e_uv^i = q_u^i . (k_v^i + r_{t(u,v)}) / sqrt(d_k),   q^i = x W_i^Q, k^i = x W_i^K, v^i = x W_i^V
        head_i(u) = sum_{v in A(u)} softmax_{v in A(u)}(e_uv^i) v_v^i
        out_u = Concat(head_1(u), ..., head_h(u)) W^O

    where r_t is the embedding of the edge's type t (relative position), shared by the heads as in
    the official code; without edge types the r term is absent. The softmax runs per target node
    over its incoming edges with scatter operations: O(E) memory, no N x N matrix. A node without
    incoming edges receives a zero message (its output is the W^O bias), not NaN. With the complete
    graph this is ordinary multi-head self-attention (``mha`` with the same weights).

    NOTE: the paper writes the scale as 1/sqrt(d); here d is the per-head width d_k, as in the
    Transformer and the official code (``scale`` overrides it).

    Args:
        embed_dim: d_model, the node feature width.
        num_heads: h; must divide ``embed_dim`` (BPT's language models: 8).
        num_edge_types: size of the relative-position table (0: none). For the BP graph use
            ``binary_partition_graph(...).num_edge_types``.
        bias: biases in the four projections (the official code has none).
        dropout: dropout on the attention weights in training (official: 0.1).
        scale: multiplies q.k; default 1/sqrt(d_k).

    Shape:
        - x: (N, embed_dim) node features.
        - edge_index: (2, E) int64, row 0 the source v, row 1 the target u (u attends to v); or a
          dense (N, N) bool adjacency with ``adjacency[u, v]`` = u attends to v.
        - edge_type: (E,) int64 (or (N, N) with a dense adjacency), values in [0, num_edge_types).
        - output: (N, embed_dim); attention (``return_attn``): (E, h) per-edge weights in the order
          of ``edge_index``, or (h, N, N) with a dense adjacency.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 8,
        *,
        num_edge_types: int = 0,
        bias: bool = False,
        dropout: float = 0.0,
        scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads)
        if num_edge_types < 0:
            raise ValueError(f"num_edge_types: expected a non-negative count, got {num_edge_types}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.num_edge_types = num_edge_types
        self.dropout = dropout
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.head_dim)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.rel_key: nn.Parameter | None = None
        if num_edge_types:
            self.rel_key = nn.Parameter(torch.empty(num_edge_types, self.head_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.rel_key is not None:
            nn.init.xavier_uniform_(self.rel_key)  # as the official reset does for its table

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_edge_types={self.num_edge_types}, scale={self.scale:.4g}"
        )

    def _check_edges(self, edge_index: object, edge_type: object, num_nodes: int) -> bool:
        """Validate the graph; returns True for a dense adjacency."""
        if not isinstance(edge_index, Tensor):
            raise TypeError(f"edge_index: expected a torch.Tensor, got {type(edge_index).__name__}")
        check_device(edge_index, "edge_index", self.q_proj.weight.device)
        if edge_type is not None:
            check_device(edge_type, "edge_type", self.q_proj.weight.device)
        dense = edge_index.dtype == torch.bool
        if dense:
            if tuple(edge_index.shape) != (num_nodes, num_nodes):
                raise ValueError(
                    f"edge_index: a bool adjacency must be (N, N) = ({num_nodes}, {num_nodes}), got "
                    f"{tuple(edge_index.shape)}"
                )
        else:
            if edge_index.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"edge_index: expected int64 (2, E) or bool (N, N), got {edge_index.dtype}")
            if edge_index.dim() != 2 or edge_index.shape[0] != 2:
                raise ValueError(f"edge_index: expected shape (2, E), got {tuple(edge_index.shape)}")
            if _has_values(edge_index):
                # an out-of-range id would be a device-side assert on CUDA, which ends the process's
                # CUDA context: checked here, with one host read of both bounds
                low, high = _bounds(edge_index)
                if low < 0 or high >= num_nodes:
                    raise ValueError(
                        f"edge_index: expected node ids in [0, {num_nodes}), got values in [{low}, {high}]"
                    )
        if edge_type is None:
            return dense
        if self.rel_key is None:
            raise ValueError(
                "edge_type: this module has no edge-type table; build it with num_edge_types > 0"
            )
        if not isinstance(edge_type, Tensor) or edge_type.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"edge_type: expected an int64 tensor, got {getattr(edge_type, 'dtype', edge_type)}"
            )
        expected = (num_nodes, num_nodes) if dense else (edge_index.shape[1],)
        if tuple(edge_type.shape) != expected:
            raise ValueError(f"edge_type: expected shape {expected}, got {tuple(edge_type.shape)}")
        if _has_values(edge_type):
            low, high = _bounds(edge_type)
            if low < 0 or high >= self.num_edge_types:
                raise ValueError(
                    f"edge_type: expected types in [0, {self.num_edge_types}), got values in [{low}, {high}]"
                )
        return dense

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_type: Tensor | None = None,
        *,
        return_attn: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "N D", D=self.embed_dim, dtype=parameter_dtype(self))
        num_nodes = x.shape[0]
        dense = self._check_edges(edge_index, edge_type, num_nodes)
        heads, dim = self.num_heads, self.head_dim
        q = self.q_proj(x).view(num_nodes, heads, dim)  # (N, D) -> (N, h, d)
        k = self.k_proj(x).view(num_nodes, heads, dim)
        v = self.v_proj(x).view(num_nodes, heads, dim)
        if dense:
            merged, maps = self._dense(q, k, v, edge_index, edge_type, return_attn)
        else:
            merged, maps = self._sparse(q, k, v, edge_index, edge_type, return_attn)
        out = self.out_proj(merged.reshape(num_nodes, self.embed_dim))  # (N, h, d) -> (N, D)
        return (out, maps) if return_attn else out

    def _relative_logits(self, q: Tensor) -> Tensor:
        # q_u . r_t for every node and type at once, (N, h, T): cheaper than gathering r per edge
        assert self.rel_key is not None
        return q @ self.rel_key.t()  # (N, h, d) @ (d, T) -> (N, h, T)

    def _sparse(
        self, q: Tensor, k: Tensor, v: Tensor, edge_index: Tensor, edge_type: Tensor | None, return_attn: bool
    ) -> tuple[Tensor, Tensor | None]:
        num_nodes, heads, dim = q.shape
        source, target = edge_index[0].long(), edge_index[1].long()
        # In CPU inference the per-edge (E, h, d) products are weighted and reduced without a tensor
        # of their own; autograd needs the plain products (a bmm's backward with one-wide inner
        # products runs 3x slower than the multiply's), and a GPU runs E h one-wide GEMMs far
        # slower than the multiply and the sum (the benchmark's 526,224 edges on an H200: the whole
        # call took 1.7x PyG's time with them).
        grad = torch.is_grad_enabled()
        inference = not (grad and (q.requires_grad or k.requires_grad))
        q_edges, k_edges = q.index_select(0, target), k.index_select(0, source)  # (E, h, d)
        if inference and q.device.type == "cpu":
            # q_u . k_v as a batch of (1, d) @ (d, 1) products: no product tensor, no pass to sum
            # it (2.5x faster than multiply-then-sum in float32, 1.8x in bfloat16)
            logits = torch.bmm(q_edges.view(-1, 1, dim), k_edges.view(-1, dim, 1)).view(-1, heads)  # (E, h)
        else:
            logits = (q_edges * k_edges).sum(-1)  # (E, h)
        del q_edges, k_edges  # two (E, h, d) buffers: free them before the messages
        if edge_type is not None:
            relative = self._relative_logits(q)  # (N, h, T)
            logits = logits + relative[target, :, edge_type.long()]  # (E, h)
        # Precision for half inputs: the per-edge logits are summed over d inside the reduction and
        # rounded once; the softmax (max, exp, the per-target sum of scores) runs in float32 on
        # these (E, h) values: a half-precision sum over many edges loses mass. The (E, h, d)
        # messages and their per-target sum stay in the input's dtype (a convex combination of
        # values: no overflow, and the sum's rounding stays within the dtype's own precision, as
        # in the peers); casting them to float32 cost 2x the memory and ~40% of the time.
        dtype = compute_dtype(logits.dtype)
        logits = logits.to(dtype) * self.scale
        index = target.unsqueeze(1).expand(-1, heads)  # (E,) -> (E, h)
        # The per-target max only shifts the logits (softmax is invariant to it): detached, it needs
        # no gradient; targets without edges keep -inf but are never gathered.
        peak = logits.new_full((num_nodes, heads), float("-inf"))
        peak = peak.scatter_reduce(0, index, logits.detach(), reduce="amax", include_self=True)
        scores = torch.exp(logits - peak.index_select(0, target))  # (E, h), each target's max -> 1
        total = _sum_into_targets(scores, target, num_nodes)  # (N, h), >= 1 where used
        weights = scores / total.index_select(0, target)  # (E, h)
        dropped = F.dropout(weights, self.dropout) if self.training and self.dropout > 0 else weights
        scale = dropped.to(v.dtype).unsqueeze(-1)  # (E, h) -> (E, h, 1)
        messages = v.index_select(0, source)  # (E, h, d)
        if grad and (v.requires_grad or scale.requires_grad):
            messages = messages * scale  # autograd keeps the gathered values for the weights' gradient
        else:
            messages = messages.mul_(scale)  # no gradient: weight the gathered copy in place
        # nodes without incoming edges keep the zeros they start with
        return _sum_into_targets(messages, target, num_nodes), (weights if return_attn else None)

    def _dense(
        self, q: Tensor, k: Tensor, v: Tensor, adjacency: Tensor, edge_type: Tensor | None, return_attn: bool
    ) -> tuple[Tensor, Tensor | None]:
        # (N, h, d) -> (h, N, d): heads lead, as attend expects
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        mask: Tensor = adjacency  # (N, N), True = the row node attends to the column node
        if edge_type is not None:
            relative = self._relative_logits(q.transpose(0, 1))  # (N, h, T)
            index = edge_type.long().unsqueeze(1).expand(-1, q.shape[0], -1)  # (N, N) -> (N, h, N)
            bias = relative.gather(2, index).transpose(0, 1) * self.scale  # (N, h, N) -> (h, N, N)
            mask = bias.masked_fill(~adjacency, float("-inf"))
        merged, maps = attend_with_weights(
            q,
            k,
            v,
            mask=mask,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=return_attn,
        )
        return merged.transpose(0, 1), maps  # (h, N, d) -> (N, h, d)
