"""Multi-head linear attention of the Linformer.

Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity", https://arxiv.org/abs/2006.04768
(section 4, eq. 7; parameter sharing in "Additional Efficiency Techniques"). Official code:
fairseq ``examples/linformer`` (``multihead_linear_attention.py``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_dtypes, check_positive, check_variant
from attnzoo.functional.attend import attend_with_weights, key_padding_to_mask
from attnzoo.functional.heads import check_heads, project_heads, resolve_key_value, split_heads
from attnzoo.registry import Paper, Sample, example_sequence, key_mask_sample, register, sequence_input

__all__ = ["Linformer", "LinformerProjection"]

Sharing = Literal["none", "headwise", "kv", "layerwise"]
SHARING: tuple[str, ...] = ("none", "headwise", "kv", "layerwise")


class LinformerProjection(nn.Module):
    """A learned projection along the sequence axis, E in R^{k x n} (one per head, or shared).

    ``project(x)`` maps (B, H, m, d) to (B, H, k, d) with ``E[:, :m]``: an input shorter than
    ``max_seq_len`` uses the first m columns, as the official code does. Pass one instance to
    several :class:`Linformer` layers (``sharing="layerwise"``) to share it across layers.

    Args:
        max_seq_len: n, the longest sequence the projection accepts.
        proj_dim: k, the projected length.
        num_heads: how many separate projections (1 = shared by every head).

    Shape:
        - weight: (num_heads, k, n).
        - project: (B, H, m, d) with m <= n and H = num_heads (or any H when num_heads = 1)
          -> (B, H, k, d).
    """

    def __init__(
        self,
        max_seq_len: int,
        proj_dim: int,
        num_heads: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(max_seq_len=max_seq_len, proj_dim=proj_dim, num_heads=num_heads)
        self.max_seq_len, self.proj_dim, self.num_heads = max_seq_len, proj_dim, num_heads
        self.weight = nn.Parameter(torch.empty(num_heads, proj_dim, max_seq_len, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The paper gives no initialisation; the official code uses xavier_uniform with gain
        # 1/sqrt(2) on each (k, n) matrix (fan_in = n, fan_out = k).
        n, k = self.max_seq_len, self.proj_dim
        bound = math.sqrt(6.0 / (n + k)) / math.sqrt(2.0)
        nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"max_seq_len={self.max_seq_len}, proj_dim={self.proj_dim}, num_heads={self.num_heads}"

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[-2]
        if length > self.max_seq_len:
            raise ValueError(
                f"sequence length: expected at most max_seq_len={self.max_seq_len} positions, got {length}; "
                "build the layer with a larger max_seq_len"
            )
        weight = self.weight[..., :length]  # (H', k, n) -> (H', k, m): the first m columns
        # (H', k, m) x (B, H, m, d) -> (B, H, k, d); H' = 1 broadcasts over the heads
        return torch.matmul(weight, x)


@register(
    "linformer",
    map_kind="pairwise",
    linear_memory=True,
    family="sequence",
    paper=Paper("Linformer: Self-Attention with Linear Complexity", "2006.04768"),
    equation="head_i = softmax(Q W_i^Q (E_i K W_i^K)^T / sqrt(d_k)) F_i V W_i^V, E_i, F_i in R^{k x n}, "
    "k = n/4; out = Concat(head_1..head_h) W^O",
    make_kwargs=lambda s: {"embed_dim": s.width, "num_heads": 4, "max_seq_len": s.extent},
    make_inputs=sequence_input,
    supports_mask=True,
    channel_dim=-1,
    cost="time O(N k d + N d^2); memory O(N d + h N k) with return_attn, O(N d + k d) without "
    "(fused kernel over the k projected keys)",
    notes="sharing: 'none' (E_i, F_i per head, the paper's eq. 7), 'headwise', 'kv', 'layerwise' "
    "(pass one LinformerProjection as shared_projection to several layers). variant='official' "
    "compresses the inputs before W^K, W^V as fairseq does (needs a projection shared by the heads).",
    samples=(
        key_mask_sample(),
        Sample(
            "cross",
            inputs=lambda s: (example_sequence(s, length=s.extent - 3), example_sequence(s, seed=1)),
            description="fewer queries than the memory's max_seq_len keys",
        ),
        Sample("sharing=headwise", {"sharing": "headwise"}, description="one E, F per layer"),
        Sample("sharing=kv", {"sharing": "kv"}, description="E = F"),
        Sample(
            "variant=official",
            {"variant": "official", "sharing": "headwise"},
            description="E X before W^K (fairseq), one projection for every head",
        ),
    ),
)
class Linformer(nn.Module):
    """Multi-head linear self-attention: keys and values projected along the sequence to k rows.

    ``head_i = softmax(Q W_i^Q (E_i K W_i^K)^T / sqrt(d_head)) (F_i V W_i^V)`` and
    ``out = Concat(head_1, ..., head_h) W^O``, with E_i, F_i in R^{k x n}: the n x n attention map
    becomes n x k, so time and memory are linear in n for a fixed k. Inputs shorter than n use the
    first columns of E_i and F_i. Padded keys (``key_mask``) are zeroed before the projection, so
    they contribute nothing to the k projected keys and values; a sequence padded at the end gives
    the same outputs at its real positions as the unpadded sequence.

    Sharing (paper, "Additional Efficiency Techniques"):

    - ``"none"`` (default, eq. 7): separate E_i and F_i for every head.
    - ``"headwise"``: one E and one F shared by every head of the layer.
    - ``"kv"``: one E = F shared by every head and by keys and values.
    - ``"layerwise"``: one E shared by every head, keys, values and every layer that is given the
      same ``shared_projection`` (a :class:`LinformerProjection`; made here when not given).

    Args:
        embed_dim: model width d.
        num_heads: h; must divide ``embed_dim``.
        max_seq_len: n, the longest sequence; a longer input raises ``ValueError``.
        proj_dim: k, the projected length (default n / 4, at least 1).
        sharing: ``"none"``, ``"headwise"``, ``"kv"`` or ``"layerwise"``.
        shared_projection: the projection of ``sharing="layerwise"``, shared with other layers.
        bias: biases in the four linear maps.
        dropout: dropout on the attention weights (training only).
        variant: ``"paper"`` (default) projects ``K W^K`` as in eq. 7; ``"official"`` compresses the
            inputs first and then applies W^K, W^V as fairseq does (cheaper, O(n k d + k d^2); the
            same without bias, with bias the bias is not multiplied by E 1). It needs a projection
            shared by the heads (any sharing but ``"none"``).

    Shape:
        - query: (B, N, d); key: (B, N_k, d), default the query; value: (B, N_k, d), default the
          key; N_k <= n.
        - key_mask: (B, N_k) bool, True at real (not padded) keys.
        - output: (B, N, d); maps (``return_attn``): (B, N, k) averaged over heads, or
          (B, h, N, k) with ``average_heads=False``: weights over the k projected keys.

    Example:
        >>> layer = Linformer(64, 4, max_seq_len=128)
        >>> x = torch.randn(2, 100, 64)
        >>> layer(x, key_mask=torch.ones(2, 100, dtype=torch.bool)).shape
        torch.Size([2, 100, 64])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_seq_len: int,
        proj_dim: int | None = None,
        *,
        sharing: Sharing = "none",
        shared_projection: LinformerProjection | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        variant: Literal["paper", "official"] = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads)
        check_positive(max_seq_len=max_seq_len)
        proj_dim = max(1, max_seq_len // 4) if proj_dim is None else proj_dim
        check_positive(proj_dim=proj_dim)
        if sharing not in SHARING:
            raise ValueError(f"sharing: expected one of {SHARING}, got {sharing!r}")
        check_variant(variant)
        if variant == "official" and sharing == "none":
            raise ValueError(
                "variant: 'official' compresses the inputs before the per-head split, so it needs a "
                "projection shared by the heads: sharing='headwise', 'kv' or 'layerwise'"
            )
        if shared_projection is not None and sharing != "layerwise":
            raise ValueError(
                f"shared_projection: only used with sharing='layerwise', got sharing={sharing!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.max_seq_len, self.proj_dim = max_seq_len, proj_dim
        self.sharing, self.variant, self.dropout = sharing, variant, dropout
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

        self.proj_v: LinformerProjection | None = None
        if sharing == "layerwise":
            if shared_projection is None:
                shared_projection = LinformerProjection(max_seq_len, proj_dim, 1, **factory)
            if not isinstance(shared_projection, LinformerProjection):
                raise TypeError(
                    "shared_projection: expected a LinformerProjection, got "
                    f"{type(shared_projection).__name__}"
                )
            got = (shared_projection.max_seq_len, shared_projection.proj_dim, shared_projection.num_heads)
            if got != (max_seq_len, proj_dim, 1):
                raise ValueError(
                    f"shared_projection: expected (max_seq_len, proj_dim, num_heads) = "
                    f"({max_seq_len}, {proj_dim}, 1), got {got}"
                )
            self.proj_k = shared_projection
        else:
            heads = num_heads if sharing == "none" else 1
            self.proj_k = LinformerProjection(max_seq_len, proj_dim, heads, **factory)
            if sharing in ("none", "headwise"):
                self.proj_v = LinformerProjection(max_seq_len, proj_dim, heads, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        # the projections initialise themselves; a shared one is left as the caller made it

    @property
    def shared_projection(self) -> LinformerProjection:
        """The projection E (also F unless ``sharing`` is ``"none"``/``"headwise"``); with
        ``sharing="layerwise"``, pass it to the next layer."""
        return self.proj_k

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, max_seq_len={self.max_seq_len}, "
            f"proj_dim={self.proj_dim}, sharing={self.sharing!r}, variant={self.variant!r}"
        )

    def _compress(self, x: Tensor, projection: LinformerProjection) -> Tensor:
        """Project a (B, N, E) sequence to (B, k, E) along the positions (official order)."""
        # (B, N, E) -> (B, 1, N, E) -> (B, 1, k, E) -> (B, k, E)
        return projection(x.unsqueeze(1)).squeeze(1)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        return_attn: bool = False,
        average_heads: bool = True,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` to the k projected keys and values (self-attention when None)."""
        e = self.embed_dim
        key, value = resolve_key_value(query, key, value, embed_dim=e, kdim=e, vdim=e)
        check_dtypes(self, query=query, key=key, value=value)
        batch, n_k = query.shape[0], key.shape[1]
        if n_k > self.max_seq_len:
            raise ValueError(
                f"key: expected at most max_seq_len={self.max_seq_len} positions, got {n_k} "
                f"(shape {tuple(key.shape)}); build the layer with a larger max_seq_len"
            )
        keep = None
        if key_mask is not None:
            # (B, 1, N_k) -> (B, N_k, 1)
            keep = key_padding_to_mask(key_mask, batch, n_k, key.device).transpose(1, 2)

        proj_v = self.proj_v if self.proj_v is not None else self.proj_k
        q = split_heads(self.q_proj(query), self.num_heads)  # (B, h, N, d)
        if self.variant == "official":
            # NOTE: deviates from eq. 7 (official fairseq order): E X, then W^K (bias after E).
            if keep is not None:
                key, value = key.masked_fill(~keep, 0.0), value.masked_fill(~keep, 0.0)
            k = split_heads(self.k_proj(self._compress(key, self.proj_k)), self.num_heads)  # (B, h, k, d)
            v = split_heads(self.v_proj(self._compress(value, proj_v)), self.num_heads)  # (B, h, k, d)
        else:
            k_full, v_full = self.k_proj(key), self.v_proj(value)  # (B, N_k, E)
            if keep is not None:
                # padded keys get zero rows, so no column of E or F picks them up
                k_full, v_full = k_full.masked_fill(~keep, 0.0), v_full.masked_fill(~keep, 0.0)
            k = self.proj_k(split_heads(k_full, self.num_heads))  # (B, h, N_k, d) -> (B, h, k, d)
            v = proj_v(split_heads(v_full, self.num_heads))  # (B, h, N_k, d) -> (B, h, k, d)

        heads, maps = attend_with_weights(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=return_attn,
        )
        # (B, h, N, d) -> (B, N, E), and the maps averaged over heads unless asked otherwise
        return project_heads(heads, self.out_proj, maps, average_heads=average_heads)
