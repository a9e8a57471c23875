"""Single-headed attention of the SHA-RNN.

Merity 2019, "Single Headed Attention RNN: Stop Thinking With Your Head",
https://arxiv.org/abs/1911.11423 (section 3, Figure 2); official code:
https://github.com/Smerity/sha-rnn (``model.py``, class ``Attention``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_dtypes, check_positive, check_variant
from attnzoo.functional.attend import attend
from attnzoo.functional.heads import merge_masks_for_heads, resolve_key_value
from attnzoo.registry import (
    Paper,
    Sample,
    attn_mask_sample,
    causal,
    cross_inputs,
    key_mask_sample,
    register,
    sequence_input,
)

__all__ = ["SingleHeadAttention"]

Variant = Literal["paper", "official"]


@register(
    "sha",
    map_kind="pairwise",
    linear_memory=True,
    family="sequence",
    paper=Paper("Single Headed Attention RNN: Stop Thinking With Your Head", "1911.11423"),
    equation="q = sigmoid(s_q) * LN(W_q x + b_q), k = sigmoid(s_k) * m, v = sigmoid(s_v) * m, "
    "out = softmax(q k^T / sqrt(d)) v  (one head; no key/value projections)",
    make_kwargs=lambda s: {"embed_dim": s.width},
    make_inputs=sequence_input,
    supports_mask=True,
    channel_dim=-1,
    cost="time O(N_q N_k d + N_q d^2); memory O((N_q + N_k) d) without maps (fused kernel), "
    "O(N_q N_k) with return_attn",
    notes="variant='official' passes the value gate through the code's over-parameterisation "
    "(sigmoid(f) * tanh(c), [c, f] = W sigmoid(s_v) + b), uses LayerNorm eps 1e-12 and drops out q and v "
    "as well as the weights; collapse_value_gate() folds the over-parameterisation into one vector.",
    samples=(
        key_mask_sample(),
        attn_mask_sample("attn_mask"),
        Sample("causal", forward_kwargs=causal, description="causal self-attention"),
        Sample("cross", inputs=cross_inputs, description="cross-attention to a longer memory"),
        key_mask_sample("cross_key_mask", key_input=1, self_attention=False, inputs=cross_inputs),
        Sample("variant=official", {"variant": "official"}, description="over-parameterised value gate"),
    ),
)
class SingleHeadAttention(nn.Module):
    """SHA-RNN attention: one head, a projected and normalised query, unprojected keys and values.

    ``q = sigmoid(s_q) * LayerNorm(W_q x + b_q)``, ``k = sigmoid(s_k) * m``,
    ``v = sigmoid(s_v) * m'`` and ``out = softmax(q k^T / sqrt(d)) v`` where ``s_q, s_k, s_v`` are
    learned d-vectors (initialised to 0, so every gate starts at 0.5) and ``m, m'`` are the key and
    value inputs (the memory: in SHA-RNN both are the same layer-normed hidden states, possibly
    with cached states from the previous segment in front). Only the query has a matrix
    multiplication; the output is the mixed values, with no output projection. This is not
    multi-head attention with one head: there are no W_K, W_V, W^O.

    Args:
        embed_dim: d, the width of the queries, keys, values and output.
        bias: bias in the query projection.
        dropout: dropout on the attention weights (training only). The official code also drops
            out q and v with the same rate (``variant="official"``).
        variant: ``"paper"`` (default): the three sigmoid gates of the paper's Figure 2.
            ``"official"``: as ``model.py`` of the official code: the value gate is
            ``sigmoid(f) * tanh(c)`` with ``[c, f] = W_o sigmoid(s_v) + b_o`` (the "over-parameterised"
            static vector, which may flip the sign of a value feature), LayerNorm eps 1e-12, and
            dropout also on q and v.
        eps: LayerNorm epsilon (default 1e-5; 1e-12 with ``variant="official"``).

    Shape:
        - query: (B, N_q, d); key: (B, N_k, d), default the query (self-attention); value:
          (B, N_k, d), default the key.
        - key_mask: (B, N_k) bool, True at real (not padded) keys.
        - attn_mask: bool (True = may attend) or additive float, broadcastable to (B, N_q, N_k).
        - output: (B, N_q, d); attention (``return_attn``): (B, N_q, N_k).

    Example:
        >>> sha = SingleHeadAttention(64)
        >>> x = torch.randn(2, 10, 64)
        >>> sha(x, causal=True).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        variant: Variant = "paper",
        eps: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(embed_dim=embed_dim)
        check_variant(variant)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.embed_dim, self.variant, self.dropout = embed_dim, variant, dropout
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        # NOTE: the official code uses eps=1e-12 (apex FusedLayerNorm); 1e-5 is safer in half precision.
        if eps is None:
            eps = 1e-12 if variant == "official" else 1e-5
        self.q_norm = nn.LayerNorm(embed_dim, eps=eps, **factory)
        self.query_gate = nn.Parameter(torch.empty(embed_dim, **factory))
        self.key_gate = nn.Parameter(torch.empty(embed_dim, **factory))
        self.value_gate = nn.Parameter(torch.empty(embed_dim, **factory))
        # NOTE: deviates from the paper (official code only): the value gate goes through a
        # Linear(d, 2d) + sigmoid * tanh "over-parameterisation" of a static vector.
        self.value_overparam: nn.Linear | None = None
        if variant == "official":
            self.value_overparam = nn.Linear(embed_dim, 2 * embed_dim, **factory)
        #: True after collapse_value_gate(): value_gate then holds the gate itself, not its logit
        self.value_gate_folded = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.q_proj.reset_parameters()
        self.q_norm.reset_parameters()
        # zero logits: every gate starts at sigmoid(0) = 0.5, as in the official code
        for gate in (self.query_gate, self.key_gate, self.value_gate):
            nn.init.zeros_(gate)
        if self.value_overparam is not None:
            self.value_overparam.reset_parameters()

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, variant={self.variant!r}"

    def gates(self) -> tuple[Tensor, Tensor, Tensor]:
        """The (d,) multipliers applied to q, k and v."""
        if self.value_gate_folded:
            return torch.sigmoid(self.query_gate), torch.sigmoid(self.key_gate), self.value_gate
        value = torch.sigmoid(self.value_gate)
        if self.value_overparam is not None:
            c, f = self.value_overparam(value).split(self.embed_dim, dim=-1)
            value = torch.sigmoid(f) * torch.tanh(c)
        return torch.sigmoid(self.query_gate), torch.sigmoid(self.key_gate), value

    @torch.no_grad()
    def collapse_value_gate(self) -> None:
        """Fold the official over-parameterisation into a static value gate (after training).

        Afterwards ``value_gate`` holds the folded gate itself rather than a logit (it can be
        negative, through the tanh); the outputs are unchanged and the Linear(d, 2d) is gone, as
        with ``vq_collapse`` in the official code.
        """
        if self.value_overparam is None:
            raise ValueError("collapse_value_gate: only variant='official' has a value over-parameterisation")
        folded = self.gates()[2]
        self.value_overparam = None
        self.value_gate = nn.Parameter(folded.clone())
        self.value_gate_folded = True

    def _normed_query(self, query: Tensor) -> Tensor:
        projected = self.q_proj(query)
        if projected.dtype in (torch.float16, torch.bfloat16):
            # as the official code (``qln(query.float())``): the LayerNorm statistics in float32
            weight, bias = self.q_norm.weight, self.q_norm.bias
            normed = F.layer_norm(
                projected.float(),
                (self.embed_dim,),
                None if weight is None else weight.float(),
                None if bias is None else bias.float(),
                self.q_norm.eps,
            )
            return normed.to(projected.dtype)
        return self.q_norm(projected)

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
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` to the memory ``key``/``value`` (self-attention when None)."""
        e = self.embed_dim
        key, value = resolve_key_value(query, key, value, embed_dim=e, kdim=e, vdim=e)
        check_dtypes(self, query=query, key=key, value=value)
        batch, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]
        # one head: masks broadcast to (B, N_q, N_k)
        mask = merge_masks_for_heads(
            attn_mask, key_mask, batch=batch, n_q=n_q, n_k=n_k, num_heads=None, device=query.device
        )

        q_gate, k_gate, v_gate = self.gates()  # (d,) each
        q = q_gate * self._normed_query(query)  # (B, N_q, d)
        k = k_gate * key  # (B, N_k, d)
        v = v_gate * value  # (B, N_k, d)
        drop = self.dropout if self.training else 0.0
        if self.variant == "official" and drop > 0:
            # NOTE: official code only: dropout on q and v too (the paper does not say).
            q, v = F.dropout(q, drop), F.dropout(v, drop)
        return attend(
            q,
            k,
            v,
            mask=mask,
            causal=causal,
            dropout_p=drop,
            scale=1.0 / math.sqrt(self.embed_dim),
            return_weights=return_attn,
        )
