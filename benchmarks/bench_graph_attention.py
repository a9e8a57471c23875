"""graph_self_attention on the BP-Transformer graph against dense `mha` on the same sequence.

    python benchmarks/bench_graph_attention.py [--threads 2] [--repeats 5] [--k 4] [--quick]

For a sequence of N tokens (default N = 4096, d = 256, h = 4, k = 4 contexts per level), `mha`
attends densely over the N tokens (fused kernel, no N x N matrix), and `graph_self_attention`
attends over the edges of the binary-partition graph (N tokens + about N span nodes,
O(k N log(N / k)) edges), with and without edge-type (relative-position) embeddings. Reported:
inference forward (eval, no_grad) and training forward+backward times, and the peak memory of
each, with ratios against `mha` measured in the same run (repeats interleaved). ``--quick`` runs
N = 512 as a smoke test.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable

import torch

from attnzoo.bench import compare_calls, peak_memory
from attnzoo.graph.graph_self_attention import GraphSelfAttention, binary_partition_graph
from attnzoo.sequence.mha import MultiheadAttention


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, repeats = (512, 2) if args.quick else (args.n, args.repeats)
    print("\n".join(table(n, args.d, args.heads, args.k, repeats)))


if __name__ == "__main__":
    main()
