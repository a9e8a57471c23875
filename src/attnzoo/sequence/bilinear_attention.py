"""Bilinear attention networks (BAN).

Kim, Jun and Zhang 2018, "Bilinear Attention Networks", https://arxiv.org/abs/1805.07932
(section 3: low-rank bilinear pooling, bilinear attention maps, residual learning of attention).
Official code: https://github.com/jnhwkim/ban-vqa.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_mask, check_positive, check_variant, parameter_dtype
from attnzoo.functional.softmax import masked_softmax
from attnzoo.layers import LayerSpec, create_layer
from attnzoo.registry import Paper, Sample, Sizes, example_sequence, key_mask_sample, register

__all__ = ["BilinearAttention", "joint_softmax"]


def joint_softmax(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Softmax over the last two dims together (every (i, j) pair of a map competes).

    Args:
        logits: (..., N_x, N_y).
        valid: bool, broadcastable to ``logits``; False pairs get weight 0. A map with no valid
            pair gets all zeros (not NaN).

    Returns:
        weights of the shape of ``logits``, in float32 for half-precision logits.
    """
    shape = logits.shape
    flat = logits.flatten(-2)  # (..., N_x, N_y) -> (..., N_x N_y)
    if valid is not None:
        valid = valid.expand(shape).flatten(-2)  # (..., N_x N_y)
    return masked_softmax(flat, valid).view(shape)


def _item_mask(mask: Tensor | None, name: str, batch: int, length: int, device: torch.device) -> Tensor:
    """A (B, N) bool mask, True at real items; all True when None."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    check_mask(mask, name, (batch, length), device=device)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool mask (True = real item), got {mask.dtype}")
    return mask.expand(batch, length)


def _example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    # y longer and wider than x: a swapped pair of axes fails the shape checks
    return example_sequence(s), example_sequence(s, length=s.extent + 3, width=s.width + 8, seed=1)


@register(
    "bilinear_attention",
    map_kind="pairwise",
    family="sequence",
    paper=Paper("Bilinear Attention Networks", "1805.07932"),
    equation="A_g = softmax_{i,j}(p_g^T SumPool_k(relu(U^T x_i) o relu(V^T y_j))); "
    "f_{g+1} = f_g + P_g^T f'_g 1^T, f'_g,c = sum_ij A_g,ij relu(f_g U'_g)_ic relu(Y V'_g)_jc, f_0 = X",
    make_kwargs=lambda s: {"query_dim": s.width, "key_dim": s.width + 8},
    make_inputs=_example_inputs,
    supports_mask=True,
    channel_dim=-1,
    cost="time O(G N_x N_y K k + G (N_x + N_y) K D); memory O(G N_x N_y) (the bilinear maps, "
    "which the joint softmax needs whole)",
    notes="variant='official': the glimpse vectors p_g act on the K k unpooled units (the official "
    "h_mat); the official per-glimpse logit bias is a no-op under the joint softmax and is omitted",
    samples=(
        key_mask_sample(key_input=1, self_attention=False),
        Sample("variant=official", {"variant": "official"}),
        Sample("glimpses=1", {"glimpses": 1}, description="one bilinear attention map"),
    ),
)
class BilinearAttention(nn.Module):
    """Bilinear attention between two sets with multiple glimpses and residual updates.

    For inputs X (N_x items) and Y (N_y items), the g-th bilinear attention map is a softmax over
    all (i, j) pairs jointly::

        A_g[i, j] = softmax_{i,j}( p_g^T SumPool_k( relu(U^T x_i) o relu(V^T y_j) ) )

    (low-rank bilinear pooling of rank k: U, V have K k columns, the Hadamard product is
    sum-pooled over groups of k, then p_g in R^K). U and V are shared by the glimpses. Each glimpse
    then pools a joint representation with its own U'_g, V'_g and updates the first input by
    residual learning of attention::

        f'_g[c] = sum_i sum_j A_g[i, j] relu(f_g U'_g)[i, c] relu(Y V'_g)[j, c]
        f_{g+1} = f_g + (P_g^T f'_g) 1^T,   f_0 = X

    so the output has the shape of X; ``out.sum(1)`` is the paper's classifier input. All maps
    come from X (f_0), as in the paper (eq. 9) and the official code.

    Args:
        query_dim: D_x, the width of X (the output width).
        key_dim: D_y, the width of Y (default D_x).
        hidden_dim: K, the joint width (default D_x; the paper uses 1024 to 1280).
        glimpses: G, number of attention maps (paper: 8).
        rank: k of the attention logits' low-rank bilinear pooling (paper: 3).
        joint_rank: k of the joint representation's pooling (official code: 1).
        variant: ``"paper"`` (p_g on the sum-pooled units) or ``"official"`` (p_g on the K k
            unpooled units, the official ``h_mat``; the pooling then has no effect).
        bias: biases in U, V, U'_g, V'_g (official code: yes).
        act_layer: the nonlinearity sigma on the projections (paper: ReLU).

    Shape:
        - query: X, (B, N_x, D_x), the set that is updated; key: Y, (B, N_y, D_y).
        - query_mask: (B, N_x), key_mask: (B, N_y) bool, True at real (not padded) items. To mimic
          the official code, which masks objects whose features are all zero, pass
          ``key_mask=key.abs().sum(-1) != 0``. A sample with no valid pair gets zero maps.
        - output: (B, N_x, D_x); attention (``return_attn``): (B, G, N_x, N_y), each map summing to
          one over all its entries.
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int | None = None,
        hidden_dim: int | None = None,
        glimpses: int = 8,
        rank: int = 3,
        *,
        joint_rank: int = 1,
        variant: Literal["paper", "official"] = "paper",
        bias: bool = True,
        act_layer: LayerSpec = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(query_dim=query_dim, key_dim=key_dim, hidden_dim=hidden_dim)  # before `or`
        key_dim = key_dim or query_dim
        hidden_dim = hidden_dim or query_dim
        check_positive(glimpses=glimpses, rank=rank, joint_rank=joint_rank)
        check_variant(variant)
        self.query_dim, self.key_dim, self.hidden_dim = query_dim, key_dim, hidden_dim
        self.glimpses, self.rank, self.joint_rank, self.variant = glimpses, rank, joint_rank, variant
        factory = {"device": device, "dtype": dtype}
        self.att_x = nn.Linear(query_dim, hidden_dim * rank, bias=bias, **factory)  # U
        self.att_y = nn.Linear(key_dim, hidden_dim * rank, bias=bias, **factory)  # V
        glimpse_width = hidden_dim * rank if variant == "official" else hidden_dim
        self.glimpse_vectors = nn.Parameter(torch.empty(glimpses, glimpse_width, **factory))  # p_g
        joint_width = hidden_dim * joint_rank
        self.joint_x = nn.ModuleList(  # U'_g, applied to the updated f_g
            nn.Linear(query_dim, joint_width, bias=bias, **factory) for _ in range(glimpses)
        )
        self.joint_y = nn.Linear(key_dim, glimpses * joint_width, bias=bias, **factory)  # V'_g, stacked
        self.proj = nn.ModuleList(nn.Linear(hidden_dim, query_dim, **factory) for _ in range(glimpses))  # P_g
        self.act = create_layer(act_layer, argument="act_layer")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Unit-variance logits at init: p_g ~ N(0, 1/K') over the K' units it reads.
        nn.init.normal_(self.glimpse_vectors, std=1.0 / math.sqrt(self.glimpse_vectors.shape[1]))

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}, "
            f"glimpses={self.glimpses}, rank={self.rank}, joint_rank={self.joint_rank}, "
            f"variant={self.variant!r}"
        )

    def attention_maps(
        self, query: Tensor, key: Tensor, query_mask: Tensor | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        """The G bilinear attention maps (B, G, N_x, N_y), float32 for half-precision inputs."""
        batch, n_x, n_y = query.shape[0], query.shape[1], key.shape[1]
        left = self.act(self.att_x(query))  # (B, N_x, K k)
        right = self.act(self.att_y(key))  # (B, N_y, K k)
        glimpse = self.glimpse_vectors
        if left.dtype in (torch.float16, torch.bfloat16):
            # half-precision logits overflow (float16 ends at 65504): form them in float32
            left, right, glimpse = left.float(), right.float(), glimpse.float()
        if self.variant == "paper":
            # p^T SumPool_k(a o b) = (p repeated k times)^T (a o b): the pooling groups are the
            # k consecutive units, as in the paper's sum pooling with stride k
            glimpse = glimpse.repeat_interleave(self.rank, dim=1)  # (G, K) -> (G, K k)
        # (B, 1, N_x, K k) * (1, G, 1, K k) -> (B, G, N_x, K k), @ (B, 1, K k, N_y) -> (B, G, N_x, N_y)
        logits = (left.unsqueeze(1) * glimpse[None, :, None, :]) @ right.unsqueeze(1).transpose(-2, -1)
        valid = None
        if query_mask is not None or key_mask is not None:
            x_valid = _item_mask(query_mask, "query_mask", batch, n_x, query.device)
            y_valid = _item_mask(key_mask, "key_mask", batch, n_y, query.device)
            # (B, N_x, 1) & (B, 1, N_y) -> (B, 1, N_x, N_y): the same pairs for every glimpse
            valid = (x_valid.unsqueeze(-1) & y_valid.unsqueeze(-2)).unsqueeze(1)
        return joint_softmax(logits, valid)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        *,
        query_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        return_attn: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        check_input(query, "query", "B N D", D=self.query_dim, dtype=parameter_dtype(self))
        check_input(
            key, "key", "B N D", B=query.shape[0], D=self.key_dim, dtype=query.dtype, dtype_source="query"
        )
        batch, n_y = key.shape[0], key.shape[1]
        # padded items must not reach real outputs whatever they hold (0 x NaN is NaN): zero them
        if query_mask is not None:
            real_x = _item_mask(query_mask, "query_mask", batch, query.shape[1], query.device)
            query = torch.where(real_x.unsqueeze(-1), query, 0.0)  # (B, N_x, 1) over (B, N_x, D_x)
        if key_mask is not None:
            real_y = _item_mask(key_mask, "key_mask", batch, n_y, query.device)
            key = torch.where(real_y.unsqueeze(-1), key, 0.0)  # (B, N_y, 1) over (B, N_y, D_y)
        maps = self.attention_maps(query, key, query_mask, key_mask)  # (B, G, N_x, N_y)
        width = self.hidden_dim * self.joint_rank
        # every glimpse's relu(Y V'_g) at once: (B, N_y, G K') -> (B, N_y, G, K')
        right = self.act(self.joint_y(key)).view(batch, n_y, self.glimpses, width)
        weights = maps.to(query.dtype)
        f = query
        # the glimpses are sequential: each updates f, which the next one reads
        # each glimpse's map and right factor, unbound once: (B, G, N_x, N_y) -> G x (B, N_x, N_y) and
        # (B, N_y, G, K') -> G x (B, N_y, K'). Unbind's backward stacks the glimpses' gradients into
        # one buffer; indexing per glimpse would zero-fill a whole-tensor buffer per glimpse.
        glimpse_maps, glimpse_rights = weights.unbind(1), right.unbind(2)
        for g in range(self.glimpses):
            left = self.act(self.joint_x[g](f))  # (B, N_x, K')
            attended = glimpse_maps[g] @ glimpse_rights[g]  # (B, N_x, N_y) @ (B, N_y, K') -> (B, N_x, K')
            joint = (left * attended).sum(dim=1)  # (B, K'): sum_ij A_ij left_ic right_jc
            if self.joint_rank > 1:
                # (B, K k') -> (B, K, k') -> (B, K): sum pooling over groups of k'
                joint = joint.view(batch, self.hidden_dim, self.joint_rank).sum(-1)
            f = f + self.proj[g](joint).unsqueeze(1)  # (B, D_x) -> (B, 1, D_x), broadcast over N_x
        return (f, maps) if return_attn else f
