"""graph_self_attention on the BP-Transformer graph against dense `mha` on the same sequence.

    python benchmarks/bench_graph_attention.py [--threads 2] [--repeats 5] [--k 4] [--quick]

For a sequence of N tokens (default N = 4096, d = 256, h = 4, k = 4 contexts per level), `mha`
attends densely over the N tokens (fused kernel, no N x N matrix), and `graph_self_attention`
attends over the edges of the binary-partition graph (N tokens + about N span nodes,
O(k N log(N / k)) edges), with and without edge-type (relative-position) embeddings. Reported:
inference forward (eval, no_grad) and training forward+backward times, and the peak memory of
each, with ratios against `mha` measured in the same run (repeats interleaved). ``--quick`` runs
N = 512 as a smoke test.

``--peers`` compares graph_self_attention instead with PyG's ``TransformerConv`` (issue 13):
8 graphs of 1024 tokens batched as one disjoint BP graph, d = 256, h = 4, in float32 and
bfloat16, inference and training, time and peak memory. PyG cannot be installed beside this
project's pinned torch (torch_geometric's wheels track torch releases), so its computation is
reproduced from its source (torch_geometric/nn/conv/transformer_conv.py with
``root_weight=False``, the ``softmax`` of torch_geometric/utils/_softmax.py and the ``add``
aggregation, all in the input's dtype), followed by the same output projection as ours
(TransformerConv has none; ``root_weight``'s ``lin_skip`` would cost the same). Where
torch_geometric imports, its own ``TransformerConv`` is timed instead, with our projections'
weights, checked equal to ours first. ``--device cuda`` runs the table on a GPU::

    python benchmarks/bench_graph_attention.py --peers            # 8 x 1024 tokens
    python benchmarks/bench_graph_attention.py --peers --quick    # 2 x 512 tokens
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from attnzoo.bench import compare_calls, peak_memory
from attnzoo.graph.graph_self_attention import GraphSelfAttention, binary_partition_graph
from attnzoo.sequence.mha import MultiheadAttention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer import (
    HEADER,
    add_device_argument,
    format_row,
    inference,
    installed,
    measure_pair,
    peer_label,
    preamble,
    training,
    use_device,
)


def contenders(n: int, d: int, h: int, k: int) -> dict[str, tuple[torch.nn.Module, tuple, str]]:
    """name -> (module, inputs, description)."""
    torch.manual_seed(0)
    graph = binary_partition_graph(n, k)
    x_tokens = torch.randn(1, n, d)
    x_nodes = torch.randn(graph.num_nodes, d)
    edges = graph.edge_index.shape[1]
    mha = MultiheadAttention(d, h)
    gsa = GraphSelfAttention(d, h)
    gsa_rel = GraphSelfAttention(d, h, num_edge_types=graph.num_edge_types)
    return {
        "mha (dense)": (mha, (x_tokens,), f"{n} tokens, {n * n} pairs"),
        "gsa (BP graph)": (gsa, (x_nodes, graph.edge_index), f"{graph.num_nodes} nodes, {edges} edges"),
        "gsa + edge types": (
            gsa_rel,
            (x_nodes, graph.edge_index, graph.edge_type),
            f"{graph.num_nodes} nodes, {edges} edges",
        ),
    }


def forward_call(module: torch.nn.Module, inputs: tuple) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            module(*inputs)

    return call


def train_call(module: torch.nn.Module, inputs: tuple) -> Callable[[], None]:
    grad_inputs = tuple(t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs)

    def call() -> None:
        module(*grad_inputs).sum().backward()

    return call


def table(n: int, d: int, h: int, k: int, repeats: int) -> list[str]:
    models = contenders(n, d, h, k)
    for module, _, _ in models.values():
        module.eval()
    forward = compare_calls(
        {name: forward_call(m, x) for name, (m, x, _) in models.items()}, repeats=repeats, warmup=1
    )
    for module, _, _ in models.values():
        module.train()
    train = compare_calls(
        {name: train_call(m, x) for name, (m, x, _) in models.items()}, repeats=repeats, warmup=1
    )
    memory: dict[str, tuple[float, float]] = {}
    for name, (module, inputs, _) in models.items():
        module.eval()
        fwd = peak_memory(forward_call(module, inputs)) / 2**20
        module.train()
        bwd = peak_memory(train_call(module, inputs)) / 2**20
        memory[name] = (max(fwd, 1.0), max(bwd, 1.0))  # below 1 MiB the resident-set figure means little
        gc.collect()
    base = "mha (dense)"
    rows = [
        f"N = {n} tokens, d = {d}, h = {h}, k = {k}, threads = {torch.get_num_threads()}",
        "",
        "| module | graph | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB "
        "| fwd / mha | fwd+bwd / mha | fwd mem / mha | fwd+bwd mem / mha |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, _, description) in models.items():
        rows.append(
            f"| {name} | {description} | {forward[name].ms:.1f} | {train[name].ms:.1f} "
            f"| {memory[name][0]:.1f} | {memory[name][1]:.1f} "
            f"| {forward[name].median / forward[base].median:.2f} "
            f"| {train[name].median / train[base].median:.2f} "
            f"| {memory[name][0] / memory[base][0]:.2f} | {memory[name][1] / memory[base][1]:.2f} |"
        )
    return rows


# ----------------------------------------------------------------------------------------------
# peer (issue 13): PyG TransformerConv, written from its source


def pyg_softmax(src: torch.Tensor, index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """torch_geometric.utils.softmax (the scatter path): max, exp, sum, divide, in src's dtype."""
    size = (num_nodes, *src.shape[1:])
    expanded = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    src_max = src.new_zeros(size).scatter_reduce_(
        0, expanded, src.detach(), reduce="amax", include_self=False
    )
    out = (src - src_max.index_select(0, index)).exp()
    out_sum = out.new_zeros(size).scatter_add_(0, expanded, out) + 1e-16
    return out / out_sum.index_select(0, index)


def pyg_transformer_conv(
    module: GraphSelfAttention, x: torch.Tensor, edge_index: torch.Tensor
) -> torch.Tensor:
    """TransformerConv(d, d / h, heads=h, root_weight=False, bias=False) then ours W^O."""
    heads, channels, num_nodes = module.num_heads, module.head_dim, x.shape[0]
    query = module.q_proj(x).view(-1, heads, channels)
    key = module.k_proj(x).view(-1, heads, channels)
    value = module.v_proj(x).view(-1, heads, channels)
    source, target = edge_index[0], edge_index[1]
    # propagate: lift (index_select) to the edges, message, aggregate
    query_i, key_j, value_j = (
        query.index_select(0, target),
        key.index_select(0, source),
        value.index_select(0, source),
    )
    alpha = (query_i * key_j).sum(dim=-1) / math.sqrt(channels)
    alpha = pyg_softmax(alpha, target, num_nodes)
    out = value_j * alpha.view(-1, heads, 1)
    expanded = target.view(-1, 1, 1).expand_as(out)
    out = out.new_zeros(num_nodes, heads, channels).scatter_add_(0, expanded, out)  # aggr="add"
    return module.out_proj(out.view(-1, heads * channels))


PYG = installed("torch_geometric")


def pyg_peer(module: GraphSelfAttention) -> tuple[Callable[..., torch.Tensor], str]:
    """PyG's own TransformerConv (then our W^O) where torch_geometric imports, else the reproduction."""
    if PYG is None:
        return (lambda x, e: pyg_transformer_conv(module, x, e)), peer_label("PyG TransformerConv", None)
    h, d = module.num_heads, module.head_dim
    bias = module.q_proj.bias is not None
    conv = PYG.nn.TransformerConv(h * d, d, heads=h, root_weight=False, bias=bias)
    for theirs, ours in (
        (conv.lin_query, module.q_proj),
        (conv.lin_key, module.k_proj),
        (conv.lin_value, module.v_proj),
    ):
        theirs.load_state_dict(ours.state_dict())
    conv = conv.to(module.q_proj.weight.dtype)
    return (lambda x, e: module.out_proj(conv(x, e))), peer_label("PyG TransformerConv", PYG)


def batched_bp_graph(graphs: int, tokens: int, k: int) -> tuple[torch.Tensor, int]:
    """``graphs`` BP graphs of ``tokens`` tokens as one disjoint graph (PyG's Batch)."""
    graph = binary_partition_graph(tokens, k)
    offsets = torch.arange(graphs).repeat_interleave(graph.edge_index.shape[1]) * graph.num_nodes
    edge_index = graph.edge_index.repeat(1, graphs) + offsets
    return edge_index, graph.num_nodes * graphs


def peers_table(graphs: int, tokens: int, d: int, h: int, k: int, repeats: int) -> list[str]:
    edge_index, num_nodes = batched_bp_graph(graphs, tokens, k)
    rows = [preamble(repeats), "", HEADER]
    print("\n".join(rows), flush=True)
    size = f"{graphs} x {tokens} tokens, {num_nodes} nodes, {edge_index.shape[1]} edges, d {d}, h {h}"
    notes: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        module = GraphSelfAttention(d, h).to(dtype)
        x = torch.randn(num_nodes, d).to(dtype)
        peer, label = pyg_peer(module)
        module.eval()
        notes += check_outputs(module, peer, x, edge_index)
        r = measure_pair(
            inference(module, x, edge_index), inference(peer, x, edge_index), warmup=1, repeats=repeats
        )
        rows.append(format_row("graph_self_attention", label, size, dtype, "inference", r))
        print(rows[-1], flush=True)
        module.train()
        params = list(module.parameters())
        r = measure_pair(
            training(module, params, x, edge_index),
            training(peer, params, x, edge_index),
            warmup=1,
            repeats=repeats,
        )
        rows.append(format_row("graph_self_attention", label, size, dtype, "training", r))
        print(rows[-1], flush=True)
    return [*rows, "", *notes]


def check_outputs(
    module: GraphSelfAttention, peer: Callable[..., torch.Tensor], x: torch.Tensor, edge_index: torch.Tensor
) -> list[str]:
    """float32: ours equals the peer's. Half precision: both against float64, ours no worse.

    Where the peer runs every step in bfloat16 (PyG's softmax sums each target's scores in the
    input's dtype), the two differ by more than either differs from the exact result.
    """
    with torch.no_grad():
        ours, theirs = module(x, edge_index), peer(x, edge_index)
        if x.dtype == torch.float32:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
            return []
        exact = copy.deepcopy(module).double()(x.double(), edge_index)
    ours_error, peer_error = ((t.double() - exact).abs().max().item() for t in (ours, theirs))
    if ours_error > max(3e-2, peer_error):
        raise AssertionError(
            f"{x.dtype}: ours is off by {ours_error:.3g} from float64, the peer {peer_error:.3g}"
        )
    dtype = str(x.dtype).removeprefix("torch.")
    return [f"{dtype}: largest error against float64: ours {ours_error:.3g}, peer {peer_error:.3g}"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=4096, help="sequence length (tokens)")
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--k", type=int, default=4, help="BP contexts per level and side")
    parser.add_argument("--quick", action="store_true", help="N = 512, 2 repeats: a smoke run")
    parser.add_argument("--peers", action="store_true", help="against PyG TransformerConv (8 x 1024 tokens)")
    add_device_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peers:
        use_device(args.device)
        graphs, tokens = (2, 512) if args.quick else (8, 1024)
        repeats = 3 if args.quick else args.repeats
        rows = peers_table(graphs, tokens, args.d, args.heads, args.k, repeats)
        print("\n" + "\n".join(rows))
        return
    n, repeats = (512, 2) if args.quick else (args.n, args.repeats)
    print("\n".join(table(n, args.d, args.heads, args.k, repeats)))


if __name__ == "__main__":
    main()
