"""Multi-head attention.

Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762 (section 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnzoo.functional.attend import attend
from attnzoo.registry import Paper, register, sequence_input
from attnzoo.sequence._heads import (
    check_heads,
    merge_heads,
    merge_masks_for_heads,
    resolve_key_value,
    split_heads,
)

__all__ = ["KVCache", "MultiheadAttention"]


@dataclass
class KVCache:
    """Projected keys and values of the tokens seen so far, for incremental decoding.

    Pass the same (initially empty) cache to every step; each call appends its new keys and
    values. ``key`` and ``value`` are (B, H, T, D/H).
    """

    key: Tensor | None = None
    value: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Add (B, H, T_new, d) keys and values; return everything so far."""
        if self.key is None or self.value is None:
            self.key, self.value = key, value
        else:
            # (B, H, T, d) ++ (B, H, T_new, d) along the time axis
            self.key = torch.cat([self.key, key], dim=-2)
            self.value = torch.cat([self.value, value], dim=-2)
        return self.key, self.value


@register(
    "mha",
    family="sequence",
    paper=Paper("Attention Is All You Need", "1706.03762"),
    equation="MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, "
    "head_i = softmax(Q W_i^Q (K W_i^K)^T / sqrt(d_k)) V W_i^V, d_k = d_model / h",
    make_kwargs=lambda s: {"embed_dim": s.width, "num_heads": 4},
    make_inputs=sequence_input,
    supports_mask=True,
    channel_dim=-1,
    cost="time O(N_q N_k d + (N_q + N_k) d^2); memory O((N_q + N_k) d) without maps "
    "(fused kernel), O(h N_q N_k) with return_attn",
)
class MultiheadAttention(nn.Module):
    """Multi-head scaled dot-product attention, batch-first, self or cross.

    ``head_i = softmax(Q W_i^Q (K W_i^K)^T / sqrt(d_head) + M) V W_i^V`` and
    ``out = Concat(head_1, ..., head_h) W^O``, with ``d_head = embed_dim / num_heads`` (the scale
    is per head, not sqrt(d_model)). Without ``return_attn`` the heads run through the fused
    kernel and the (N_q x N_k) maps are never formed.

    Args:
        embed_dim: model width d (queries and output).
        num_heads: h; must divide ``embed_dim``. Paper base model: d = 512, h = 8.
        kdim, vdim: widths of keys and values for cross attention (default ``embed_dim``).
        bias: biases in the four projections.
        dropout: dropout on the attention weights (training only).
        out_dropout: dropout on the output (training only).

    Shape:
        - query: (B, N_q, embed_dim); key: (B, N_k, kdim) (default: the query, self-attention);
          value: (B, N_k, vdim) (default: the key).
        - key_mask: (B, N_k) bool, True at real (not padded) keys. Note: the opposite polarity
          of torch's ``key_padding_mask``.
        - attn_mask: bool (True = may attend) or additive float, of shape (N_q, N_k),
          (B, N_q, N_k) or (B, h, N_q, N_k).
        - output: (B, N_q, embed_dim); maps: (B, N_q, N_k) averaged over heads, or
          (B, h, N_q, N_k) with ``average_heads=False``.

    Example:
        >>> mha = MultiheadAttention(64, 4)
        >>> x = torch.randn(2, 10, 64)
        >>> y, maps = mha(x, causal=True, return_attn=True)
        >>> y.shape, maps.shape
        (torch.Size([2, 10, 64]), torch.Size([2, 10, 10]))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        out_dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = check_heads(embed_dim, num_heads)
        if not 0.0 <= dropout < 1.0 or not 0.0 <= out_dropout < 1.0:
            raise ValueError(f"dropout: expected probabilities in [0, 1), got {dropout}, {out_dropout}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout = dropout
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_dropout = nn.Dropout(out_dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}"

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """Build an equivalent module with the weights of a ``torch.nn.MultiheadAttention``.

        The layout is always batch-first here, whatever ``module.batch_first`` says; masks keep
        attnzoo's polarity (True = may attend).

        Raises:
            ValueError: ``add_bias_kv`` or ``add_zero_attn`` (no counterpart here).
        """
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("module: add_bias_kv and add_zero_attn have no attnzoo counterpart")
        weight = module.out_proj.weight
        ours = cls(
            module.embed_dim,
            module.num_heads,
            kdim=module.kdim,
            vdim=module.vdim,
            bias=module.in_proj_bias is not None,
            dropout=module.dropout,
            device=weight.device,
            dtype=weight.dtype,
        )
        e = module.embed_dim
        with torch.no_grad():
            if module._qkv_same_embed_dim:
                # torch packs W_q, W_k, W_v as rows of one (3E, E) matrix
                q_w, k_w, v_w = module.in_proj_weight.split(e, dim=0)
            else:
                q_w, k_w, v_w = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
            for proj, w in ((ours.q_proj, q_w), (ours.k_proj, k_w), (ours.v_proj, v_w)):
                proj.weight.copy_(w)
            if module.in_proj_bias is not None:
                for proj, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), module.in_proj_bias.split(e)):
                    proj.bias.copy_(b)
            ours.out_proj.weight.copy_(module.out_proj.weight)
            if module.out_proj.bias is not None:
                ours.out_proj.bias.copy_(module.out_proj.bias)
        return ours

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        causal: bool = False,
        return_attn: bool = False,
        average_heads: bool = True,
        cache: KVCache | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` to ``key``/``value`` (self-attention when they are None).

        With ``cache``, the call is one step of incremental self-attention: the new tokens'
        keys and values are appended to the cache and the queries attend to everything cached
        (with ``causal=True``, each new token sees the past and itself, exactly as in the full
        causal pass).
        """
        if cache is not None and key is not None:
            raise ValueError("cache: incremental decoding is self-attention; pass key=None")
        key, value = resolve_key_value(
            query, key, value, embed_dim=self.embed_dim, kdim=self.kdim, vdim=self.vdim
        )
        batch, n_q, h = query.shape[0], query.shape[1], self.num_heads
        q = split_heads(self.q_proj(query), h)  # (B, N_q, E) -> (B, h, N_q, d)
        k = split_heads(self.k_proj(key), h)  # (B, h, N_k_new, d)
        v = split_heads(self.v_proj(value), h)  # (B, h, N_k_new, d)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, h, N_k, d) with N_k = cached + new
        mask = merge_masks_for_heads(attn_mask, key_mask, batch=batch, n_q=n_q, n_k=k.shape[-2], num_heads=h)

        result = attend(
            q,
            k,
            v,
            mask=mask,
            causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=return_attn,
        )
        heads, maps = result if isinstance(result, tuple) else (result, None)
        out = self.out_dropout(self.out_proj(merge_heads(heads)))  # (B, h, N_q, d) -> (B, N_q, E)
        if maps is None:
            return out
        return out, (maps.mean(dim=1) if average_heads else maps)
