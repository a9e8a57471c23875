"""Generic attention: soft addressing with a choice of score, as a module.

Seed 004 ("attention as soft addressing"); scores from Luong et al. 2015, "Effective Approaches to
Attention-based Neural Machine Translation", https://arxiv.org/abs/1508.04025, and Bahdanau et al.
2014, https://arxiv.org/abs/1409.0473.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_mask, check_positive, parameter_dtype
from attnzoo.functional.attend import SCORES, Score, and_masks, attend_with_weights, key_padding_to_mask
from attnzoo.registry import (
    Paper,
    Sample,
    Sizes,
    attn_mask_sample,
    causal,
    example_sequence,
    key_mask_sample,
    register,
)

__all__ = ["Attention"]


def _example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    # keys longer than queries so that a transposed (N_q, N_k) would fail the shape checks
    return example_sequence(s), example_sequence(s, length=s.extent + 3, seed=1)


@register(
    "attention",
    map_kind="pairwise",
    linear_memory=True,
    family="sequence",
    paper=Paper("Effective Approaches to Attention-based Neural Machine Translation", "1508.04025"),
    equation="out_i = sum_j softmax_j(score(q_i, k_j) * scale) v_j, score in "
    "{dot, scaled_dot, cosine, general, additive, concat}",
    make_kwargs=lambda s: {"query_dim": s.width},
    make_inputs=_example_inputs,
    supports_mask=True,
    channel_dim=-1,
    cost="time O(N_q N_k D); memory O((N_q + N_k) D) on the fused path (dot, scaled_dot, cosine, "
    "general), O(N_q N_k A) for additive/concat",
    samples=(
        key_mask_sample(key_input=1, self_attention=False, thorough=True),
        attn_mask_sample(key_input=1),
        Sample(
            "causal",
            forward_kwargs=causal,
            description="causal, queries aligned with the keys' end",
            skips={"linear_memory": "N_q != N_k: a bottom-right causal mask is formed (SDPA: top-left)"},
        ),
        *(Sample(f"score={score}", {"score": score}) for score in ("dot", "cosine", "general")),
        *(
            Sample(
                f"score={score}",
                {"score": score, "attn_dim": 16},
                skips={"linear_memory": "an MLP score needs every (query, key) pair"},
            )
            for score in ("additive", "concat")
        ),
        Sample(
            "single_step",
            inputs=lambda s: (example_sequence(s)[:, 0], example_sequence(s, length=s.extent + 3, seed=1)),
            description="one (B, D) decoder query",
            skips={"bad_input": "a (B, D) query has no sequence dim to empty or drop"},
        ),
    ),
)
class Attention(nn.Module):
    """Soft addressing of values by keys, with the score of your choice and no projections.

    ``out_i = sum_j a_ij v_j`` with ``a_ij = softmax_j(score(q_i, k_j) * scale)``; the scores and
    their parameters are those of :mod:`attnzoo.functional.attend`: ``general`` owns W (D_q, D_k),
    ``additive`` owns W_q (A, D_q), W_k (A, D_k), v_a (A,) and an optional bias, ``concat`` owns
    W_a (A, D_q + D_k) and v_a (A,). The other scores have no parameters.

    Args:
        query_dim: D_q, the width of the queries.
        key_dim: D_k, the width of the keys (default: D_q).
        score: ``dot``, ``scaled_dot`` (default), ``cosine``, ``general``, ``additive``, ``concat``.
        attn_dim: A, the hidden width of the additive/concat MLP (default: D_q).
        bias: additive/concat MLP bias b_a (the papers write none; default False).
        dropout: dropout on the attention weights in training.
        scale: multiplies the score (default 1/sqrt(D_k) for scaled_dot, else 1).

    Shape:
        - query: (B, N_q, D_q), or (B, D_q) for one decoder step (the output then drops N_q).
        - key: (B, N_k, D_k); value: (B, N_k, D_v), default the key.
        - attn_mask: bool (True = may attend) or additive, broadcastable to (B, N_q, N_k);
          key_mask: (B, N_k) bool, True at real (not padded) keys.
        - output: (B, N_q, D_v); attention (with ``return_attn``): (B, N_q, N_k).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int | None = None,
        *,
        score: Score = "scaled_dot",
        attn_dim: int | None = None,
        bias: bool = False,
        dropout: float = 0.0,
        scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
        check_positive(
            query_dim=query_dim, key_dim=key_dim, attn_dim=attn_dim
        )  # before `or`: 0 is no default
        key_dim = key_dim or query_dim
        if score in ("dot", "scaled_dot", "cosine") and key_dim != query_dim:
            raise ValueError(
                f"key_dim: score {score!r} needs key_dim == query_dim ({query_dim}), got {key_dim}"
            )
        self.query_dim, self.key_dim, self.score = query_dim, key_dim, score
        self.attn_dim = attn_dim or query_dim
        self.dropout, self.scale = dropout, scale
        factory = {"device": device, "dtype": dtype}
        self.w: nn.Parameter | None = None
        self.w_q: nn.Parameter | None = None
        self.w_k: nn.Parameter | None = None
        self.v_a: nn.Parameter | None = None
        self.b_a: nn.Parameter | None = None
        if score == "general":
            self.w = nn.Parameter(torch.empty(query_dim, key_dim, **factory))
        elif score == "concat":
            self.w = nn.Parameter(torch.empty(self.attn_dim, query_dim + key_dim, **factory))
        elif score == "additive":
            self.w_q = nn.Parameter(torch.empty(self.attn_dim, query_dim, **factory))
            self.w_k = nn.Parameter(torch.empty(self.attn_dim, key_dim, **factory))
        if score in ("additive", "concat"):
            self.v_a = nn.Parameter(torch.empty(self.attn_dim, **factory))
            if bias:
                self.b_a = nn.Parameter(torch.empty(self.attn_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.w, self.w_q, self.w_k):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        if self.v_a is not None:
            nn.init.uniform_(self.v_a, -1 / math.sqrt(self.attn_dim), 1 / math.sqrt(self.attn_dim))
        if self.b_a is not None:
            nn.init.zeros_(self.b_a)

    def extra_repr(self) -> str:
        return f"{self.query_dim}, {self.key_dim}, score={self.score!r}, attn_dim={self.attn_dim}"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        causal: bool = False,
        return_attn: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        check_input(query, "query", ("B D", "B N D"), D=self.query_dim, dtype=parameter_dtype(self))
        check_input(
            key, "key", "B N D", B=query.shape[0], D=self.key_dim, dtype=query.dtype, dtype_source="query"
        )
        value = key if value is None else value
        check_input(
            value, "value", "B N D", B=query.shape[0], N=key.shape[1], dtype=key.dtype, dtype_source="key"
        )
        single_step = query.dim() == 2
        if single_step:
            query = query.unsqueeze(1)  # (B, D_q) -> (B, 1, D_q)
        if attn_mask is not None:
            target = (key.shape[0], query.shape[-2], key.shape[1])  # (B, N_q, N_k)
            check_mask(attn_mask, "attn_mask", target, device=key.device)
        if key_mask is not None:
            padding = key_padding_to_mask(key_mask, key.shape[0], key.shape[1], device=key.device)
            attn_mask = and_masks(attn_mask, padding)
        out, weights = attend_with_weights(
            query,
            key,
            value,
            score=self.score,
            mask=attn_mask,
            causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            return_weights=return_attn,
            w=self.w,
            w_q=self.w_q,
            w_k=self.w_k,
            v_a=self.v_a,
            b_a=self.b_a,
        )
        if weights is None:
            return out.squeeze(1) if single_step else out
        if single_step:
            return out.squeeze(1), weights.squeeze(1)
        return out, weights
