"""Additive (Bahdanau) attention, the alignment model of RNNsearch.

Bahdanau, Cho and Bengio 2014, "Neural Machine Translation by Jointly Learning to Align and
Translate", https://arxiv.org/abs/1409.0473 (section 3.1 and appendix A.1.2).

The decoder that uses it (``s_i = f(s_{i-1}, y_{i-1}, c_i)``, the query being the PREVIOUS state
``s_{i-1}``) is :class:`attnzoo.models.seq2seq.Seq2Seq` with ``attention="bahdanau"``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.attend import attend_with_weights, key_padding_to_mask
from attnzoo.registry import Paper, Sample, Sizes, example_sequence, key_mask_sample, register

__all__ = ["BahdanauAttention"]


def _example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    # queries s_{i-1} for every decoder step (teacher forcing) and the annotations of a
    # bidirectional encoder, h_j = [fwd_j; bwd_j] of width 2n, over a longer source
    return (
        example_sequence(s),
        example_sequence(s, length=s.extent + 3, width=2 * s.width, seed=1),
    )


@register(
    "bahdanau",
    map_kind="alignment",
    family="sequence",
    paper=Paper("Neural Machine Translation by Jointly Learning to Align and Translate", "1409.0473"),
    equation="e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j), alpha_ij = softmax_j(e_ij), "
    "c_i = sum_j alpha_ij h_j (query: the PREVIOUS decoder state s_{i-1})",
    make_kwargs=lambda s: {"query_dim": s.width, "key_dim": 2 * s.width},
    make_inputs=_example_inputs,
    supports_mask=True,
    shape_preserving=False,
    channel_dim=-1,
    cost="time O(N_q N_k A + (N_q D_q + N_k D_k) A); memory O(N_q N_k A) (the MLP needs every pair)",
    notes="Initialisation follows the paper's appendix B.1: W_a, U_a ~ N(0, 0.001^2), v_a = 0 "
    "(attention starts uniform); init='xavier' for a generic one. Ships with "
    "attnzoo.models.seq2seq.Seq2Seq(attention='bahdanau').",
    samples=(
        key_mask_sample(key_input=1, self_attention=False),
        Sample("init=xavier", {"init": "xavier"}, description="Xavier initialisation"),
        Sample("bias=True", {"bias": True}, description="a bias in the alignment MLP"),
    ),
)
class BahdanauAttention(nn.Module):
    """Additive attention: ``c_i = sum_j alpha_ij h_j``, ``alpha_ij = softmax_j(e_ij)``.

    ``e_ij = a(s_{i-1}, h_j) = v_a^T tanh(W_a s_{i-1} + U_a h_j)`` where ``s_{i-1}`` is the
    decoder state BEFORE step i (the previous one: the new state ``s_i`` is computed from ``c_i``,
    so it cannot be the query) and ``h_j`` are the encoder annotations. The module is the
    alignment model only; it is vectorised over any number of queries, so a decoder calls it once
    per step with ``(B, D_q)`` and an analysis can call it with every stored ``s_{i-1}`` at once.

    Args:
        query_dim: D_q, the decoder state width n.
        key_dim: D_k, the annotation width (2n for a bidirectional encoder; default D_q).
        attn_dim: A, the hidden width n' of the alignment MLP (default D_q; paper: n' = n = 1000).
        bias: a bias b_a inside the tanh (the paper's equation has none; default False).
        init: ``"paper"`` (W_a, U_a ~ N(0, 0.001^2), v_a = 0, appendix B.1: every source word
            gets the same weight at the start) or ``"xavier"``.

    Shape:
        - query: (B, N, D_q), the previous decoder states s_{i-1} of N steps, or (B, D_q) for
          one decoder step (the output then drops N).
        - key: (B, S, D_k), the annotations h_j; value: (B, S, D_v), default the key.
        - key_mask: (B, S) bool, True at real (not padded) source positions.
        - output: the context c_i, (B, N, D_v); attention (``return_attn``): (B, N, S).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int | None = None,
        attn_dim: int | None = None,
        *,
        bias: bool = False,
        init: str = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(
            query_dim=query_dim, key_dim=key_dim, attn_dim=attn_dim
        )  # before `or`: 0 is no default
        key_dim = key_dim or query_dim
        attn_dim = attn_dim or query_dim
        if init not in ("paper", "xavier"):
            raise ValueError(f"init: expected 'paper' or 'xavier', got {init!r}")
        self.query_dim, self.key_dim, self.attn_dim, self.init = query_dim, key_dim, attn_dim, init
        factory = {"device": device, "dtype": dtype}
        self.w_a = nn.Parameter(torch.empty(attn_dim, query_dim, **factory))  # W_a: n' x n
        self.u_a = nn.Parameter(torch.empty(attn_dim, key_dim, **factory))  # U_a: n' x 2n
        self.v_a = nn.Parameter(torch.empty(attn_dim, **factory))
        self.b_a = nn.Parameter(torch.empty(attn_dim, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "paper":
            nn.init.normal_(self.w_a, std=0.001)
            nn.init.normal_(self.u_a, std=0.001)
            nn.init.zeros_(self.v_a)
        else:
            nn.init.xavier_uniform_(self.w_a)
            nn.init.xavier_uniform_(self.u_a)
            bound = self.attn_dim**-0.5
            nn.init.uniform_(self.v_a, -bound, bound)
        if self.b_a is not None:
            nn.init.zeros_(self.b_a)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, attn_dim={self.attn_dim}"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        return_attn: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        check_input(query, "query", ("B D", "B N D"), D=self.query_dim, dtype=parameter_dtype(self))
        check_input(
            key, "key", "B S D", B=query.shape[0], D=self.key_dim, dtype=query.dtype, dtype_source="query"
        )
        value = key if value is None else value
        check_input(
            value,
            "value",
            "B S D",
            B=query.shape[0],
            S=key.shape[1],
            dtype=key.dtype,
            dtype_source="key",
        )
        single_step = query.dim() == 2
        if single_step:
            query = query.unsqueeze(1)  # (B, D_q) -> (B, 1, D_q)
        mask = None
        if key_mask is not None:
            mask = key_padding_to_mask(key_mask, key.shape[0], key.shape[1], device=key.device)  # (B, 1, S)
        out, weights = attend_with_weights(
            query,
            key,
            value,
            score="additive",
            mask=mask,
            return_weights=return_attn,
            w_q=self.w_a,
            w_k=self.u_a,
            v_a=self.v_a,
            b_a=self.b_a,
        )
        if single_step:
            out = out.squeeze(1)  # (B, 1, D_v) -> (B, D_v)
            weights = weights.squeeze(1) if weights is not None else None
        return out if weights is None else (out, weights)
