"""A small Transformer encoder classifier whose attention layer is any registered sequence mechanism.

Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762 (the encoder
layer), in the pre-norm arrangement (Xiong et al. 2020, arXiv:2002.04745) that trains without a
warm-up schedule at this size::

    x = x + Attention(LayerNorm(x));   x = x + FFN(LayerNorm(x))

Tokens get learned embeddings plus sinusoidal positions; the ``<cls>`` token's final state (the
first position) is classified. Used by ``attnzoo compare --task sequence`` to put the sequence
mechanisms side by side on the same network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.graph.graph_self_attention import binary_partition_graph
from attnzoo.registry import create

__all__ = ["ENCODER_MECHANISMS", "SequenceClassifier", "attention_layer"]


class _GraphLayer(nn.Module):
    """``graph_self_attention`` over the binary-partition graph of each sequence (BP-Transformer).

    The batch becomes one graph of B disjoint copies (node ids offset per sequence); span nodes
    start as the mean of the tokens they cover, as in the official code; the tokens' outputs are
    returned.
    """

    def __init__(self, embed_dim: int, num_heads: int, max_len: int, k: int = 4, **kwargs: Any) -> None:
        super().__init__()
        self.k = k
        self.max_len = max_len
        types = binary_partition_graph(max(2, max_len), k=k).num_edge_types
        self.attn = create("graph_self_attention", embed_dim, num_heads, num_edge_types=types, **kwargs)
        self._graphs: dict[tuple[int, str], Any] = {}

    def _graph(self, length: int, device: torch.device) -> Any:
        key = (length, str(device))
        if key not in self._graphs:
            self._graphs[key] = binary_partition_graph(length, k=self.k, device=device)
        return self._graphs[key]

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        batch, length, width = x.shape
        graph = self._graph(length, x.device)
        n = graph.num_nodes
        # span node features: the mean of the tokens each span covers (affiliated edges at level > 0
        # run token -> span); (B, L, D) -> (B, N_nodes, D)
        source, target = graph.edge_index
        spans = target >= length
        sums = x.new_zeros(batch, n, width).index_add(1, target[spans], x[:, source[spans]])
        counts = torch.zeros(n, device=x.device, dtype=x.dtype).index_add(
            0, target[spans], torch.ones_like(target[spans], dtype=x.dtype)
        )
        nodes = torch.cat([x, (sums / counts.clamp_min(1).unsqueeze(-1))[:, length:]], dim=1)
        # B disjoint graphs: edge ids offset by b * N; (B, N, D) -> (B * N, D)
        offsets = (torch.arange(batch, device=x.device) * n).view(batch, 1, 1)
        edge_index = (graph.edge_index.unsqueeze(0) + offsets).transpose(0, 1).reshape(2, -1)
        edge_type = graph.edge_type.repeat(batch)
        result = self.attn(nodes.reshape(batch * n, width), edge_index, edge_type, return_attn=return_attn)
        out, maps = result if isinstance(result, tuple) else (result, None)
        tokens = out.view(batch, n, width)[:, :length]  # (B * N, D) -> (B, L, D)
        return tokens if maps is None else (tokens, maps)


def _gated(embed_dim: int, num_heads: int, max_len: int, **kwargs: Any) -> nn.Module:
    return create("gated_mha", embed_dim, num_heads, **kwargs)


#: Mechanism name -> ``(embed_dim, num_heads, max_len, **options) -> self-attention layer`` whose
#: ``forward(x)`` maps (B, L, D) to (B, L, D) (and takes ``return_attn``).
ENCODER_MECHANISMS: dict[str, Callable[..., nn.Module]] = {
    "mha": lambda d, h, n, **kw: create("mha", d, h, **kw),
    "gated_mha": _gated,
    "linformer": lambda d, h, n, **kw: create("linformer", d, h, max_seq_len=n, **kw),
    "synthesizer": lambda d, h, n, **kw: create("synthesizer", d, n, h, **kw),
    "sha": lambda d, h, n, **kw: create("sha", d, **kw),
    "graph_self_attention": _GraphLayer,
}


def attention_layer(name: str, embed_dim: int, num_heads: int, max_len: int, **options: Any) -> nn.Module:
    """The self-attention layer of mechanism ``name`` for (B, L, embed_dim) inputs of length <= max_len.

    Raises:
        ValueError: ``name`` is not a sequence self-attention mechanism (the valid ones are listed).
    """
    if name not in ENCODER_MECHANISMS:
        raise ValueError(
            f"attention: expected a sequence self-attention mechanism, one of {sorted(ENCODER_MECHANISMS)}, "
            f"got {name!r}"
        )
    return ENCODER_MECHANISMS[name](embed_dim, num_heads, max_len, **options)


def _sinusoid(length: int, width: int) -> Tensor:
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return table


class _EncoderLayer(nn.Module):
    def __init__(self, attention: nn.Module, width: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = attention
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ffn(self.norm2(x)))


class SequenceClassifier(nn.Module):
    """Token sequences (B, L) -> class logits (B, num_classes), with ``attention`` in every layer.

    Args:
        vocab_size: number of token ids (0 is padding: its embedding is zero).
        num_classes: output classes.
        max_len: the longest sequence (sizes the positional table and length-bound mechanisms).
        attention: a name of :data:`ENCODER_MECHANISMS`.
        embed_dim, num_heads, num_layers, ffn_dim, dropout: the encoder's sizes.
        attention_options: constructor options passed to the mechanism.

    Shape:
        - tokens: (B, L) int64 with L <= max_len; output: (B, num_classes).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_len: int,
        *,
        attention: str = "mha",
        embed_dim: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        ffn_dim: int = 128,
        dropout: float = 0.0,
        attention_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("num_classes", num_classes), ("max_len", max_len)):
            if value <= 0:
                raise ValueError(f"{name}: expected a positive size, got {value}")
        self.attention, self.max_len = attention, max_len
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.register_buffer("positions", _sinusoid(max_len, embed_dim), persistent=False)
        options = dict(attention_options or {})
        self.layers = nn.ModuleList(
            _EncoderLayer(
                attention_layer(attention, embed_dim, num_heads, max_len, **options),
                embed_dim,
                ffn_dim,
                dropout,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
            got = getattr(tokens, "dtype", type(tokens).__name__)
            shape = tuple(getattr(tokens, "shape", ()))
            raise ValueError(f"tokens: expected a (B, L) int64 tensor, got {got} of shape {shape}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(
                f"tokens: expected at most max_len={self.max_len} positions, got {tokens.shape[1]}"
            )
        x = self.embed(tokens) + self.positions[: tokens.shape[1]]  # (B, L, D)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x[:, 0]))  # the <cls> position

    def l0_penalty(self) -> Tensor:
        """The summed L0 penalty of every ``gated_mha`` layer (0 for other mechanisms)."""
        terms = [layer.attn.l0_penalty() for layer in self.layers if hasattr(layer.attn, "l0_penalty")]
        return torch.stack(terms).sum() if terms else self.head.weight.new_zeros(())
