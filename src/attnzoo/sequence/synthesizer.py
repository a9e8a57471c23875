"""Synthesized attention: dense, random, factorized, and mixtures with dot-product attention.

Tay et al. 2020, "Synthesizer: Rethinking Self-Attention in Transformer Models",
https://arxiv.org/abs/2005.00743 (section 3). Official multi-head code:
google-research/long-range-arena, ``lra_benchmarks/models/synthesizer/synthesizer_attention.py``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.attend import and_masks, attend_with_weights
from attnzoo.functional.heads import check_heads, merge_masks_for_heads, project_heads, split_heads
from attnzoo.registry import Paper, Sample, causal, key_mask_sample, register, sequence_input

__all__ = ["COMPONENTS", "Synthesizer"]

#: The synthesizing functions and plain dot-product attention, combinable with "+".
COMPONENTS: tuple[str, ...] = ("dense", "factorized_dense", "random", "factorized_random", "dot")
_MIXTURES = ("learned", "sum")
_TILINGS = ("outer", "tile")


def _parse(synthesizer: str) -> tuple[str, ...]:
    if not isinstance(synthesizer, str):
        raise TypeError(
            f"synthesizer: expected a string such as 'dense' or 'random+dot', got {synthesizer!r}"
        )
    parts = [p.strip() for p in synthesizer.split("+")]
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown or not parts:
        raise ValueError(
            f"synthesizer: expected components from {COMPONENTS} joined by '+', got {synthesizer!r}"
        )
    if len(set(parts)) != len(parts):
        raise ValueError(f"synthesizer: each component at most once, got {synthesizer!r}")
    return tuple(c for c in COMPONENTS if c in parts)  # canonical order


def _factors(length: int, a: int | None, b: int | None) -> tuple[int, int]:
    """a x b >= length for the factorized dense synthesizer (a = ceil(sqrt(l)) by default)."""
    check_positive(factor_a=a, factor_b=b)  # ceil-dividing by 0 would raise ZeroDivisionError
    if a is None and b is None:
        a = math.isqrt(length - 1) + 1
    if a is None:
        a = -(-length // b)  # type: ignore[operator]
    if b is None:
        b = -(-length // a)
    if a <= 0 or b <= 0 or a * b < length:
        raise ValueError(
            f"factor_a, factor_b: expected positive sizes with a * b >= max_len={length}, got {a}, {b}"
        )
    return a, b


@register(
    "synthesizer",
    map_kind="pairwise",
    family="sequence",
    paper=Paper("Synthesizer: Rethinking Self-Attention in Transformer Models", "2005.00743"),
    equation="Y = softmax(B) G(X); dense: B_i = F2(relu(F1(X_i))) in R^l; random: B = R in R^{l x l}; "
    "mixture: softmax(sum_c alpha_c S_c(X)) G(X), with S = Q K^T / sqrt(d) for dot-product",
    make_kwargs=lambda s: {"embed_dim": s.width, "max_len": s.extent, "num_heads": 4},
    make_inputs=sequence_input,
    supports_mask=True,
    channel_dim=-1,
    cost="time O(N^2 d + N d^2) (dense: O(N d l) for the logits); memory O(h N^2) per sample "
    "(dense, factorized dense, mixtures with a dense part), O(h l^2) parameters and O(h N^2) for random "
    "(batch-independent)",
    notes="mixture='sum' adds the components' logits with weight 1 as the official LRA code does (the "
    "paper mixes with learned weights alpha summing to 1). tiling='tile' takes the paper's text literally "
    "for factorized dense (both vectors tiled), which degenerates when gcd(a, b) > 1.",
    samples=(
        key_mask_sample(),
        Sample("causal", forward_kwargs=causal, description="causal synthesized attention"),
        *(
            Sample(f"synthesizer={kind}", {"synthesizer": kind})
            for kind in ("random", "factorized_dense", "factorized_random", "dense+dot", "dense+random")
        ),
        Sample("mixture=sum", {"synthesizer": "dense+dot", "mixture": "sum"}),
    ),
)
class Synthesizer(nn.Module):
    """Synthesized attention: the alignment is generated, not computed from query-key pairs.

    ``Y_h = softmax(B_h) G_h(X)`` per head, ``out = Concat(Y_1, ..., Y_h) W^O``, with the values
    ``G(X) = X W^V`` and the logits ``B`` synthesized by one or a mixture of:

    - ``"dense"``: ``B_i = F2(relu(F1(X_i)))``, F1: d -> d, F2: d -> l (h*l with h heads): each
      token predicts its own row of logits over the l positions, without looking at other tokens.
    - ``"factorized_dense"``: ``A = F_A(h_i)`` in R^a, ``B = F_B(h_i)`` in R^b, ``h_i =
      relu(F1(X_i))``, and the row is ``C = H_A(A) * H_B(B)`` in R^{a b}, truncated to l. With the
      default ``tiling="outer"``, ``C[p b + q] = A_p B_q`` (a flattened outer product: H_A
      repeats each entry of A b times, H_B tiles B a times).
    - ``"random"``: ``B = R`` in R^{l x l} per head, trainable (default) or fixed
      (``fixed_random=True``, stored as a buffer); the same for every input.
    - ``"factorized_random"``: ``B = R_1 R_2^T``, R_1, R_2 in R^{l x k} per head (k = 8).
    - ``"dot"``: ``Q K^T / sqrt(d_head)`` with Q = X W^Q, K = X W^K (vanilla attention).

    Components are joined with ``+``, e.g. ``"random+dot"``: the paper mixes them as
    ``softmax(sum_c alpha_c S_c(X)) G(X)`` with learned weights alpha (softmax-normalised here, so
    they sum to 1; equal at init). An input of length N <= l uses the first N positions (the
    logits are sliced to N x N before the softmax). ``causal=True`` masks the future with -inf
    BEFORE the softmax, so every row is still a distribution over the visible positions.

    Args:
        embed_dim: model width d.
        max_len: l, the longest sequence; a longer input raises ``ValueError``.
        num_heads: h; must divide ``embed_dim`` (the paper's equations are single-head).
        synthesizer: ``"dense"`` (default), ``"factorized_dense"``, ``"random"``,
            ``"factorized_random"``, ``"dot"``, or several joined with ``+``.
        fixed_random: the random logits are fixed (a buffer), not trained.
        mixture: ``"learned"`` (default): alpha = softmax(learned logits) as in the paper;
            ``"sum"``: plain sum of the components' logits, as the official LRA code does.
        factorized_k: k of the factorized random synthesizer (paper: 8).
        factor_a, factor_b: a and b of the factorized dense synthesizer, a * b >= l
            (default a = ceil(sqrt(l)), b = ceil(l / a)).
        tiling: ``"outer"`` (default) or ``"tile"``: both vectors tiled, ``C[j] = A[j mod a] *
            B[j mod b]`` (the literal reading of the paper; degenerate when gcd(a, b) > 1).
        bias: biases in the linear maps.
        dropout: dropout on the attention weights (training only).

    Shape:
        - x: (B, N, d) with N <= l.
        - key_mask: (B, N) bool, True at real (not padded) positions.
        - output: (B, N, d); maps (``return_attn``): (B, N, N) averaged over heads, or
          (B, h, N, N) with ``average_heads=False``.

    Example:
        >>> syn = Synthesizer(64, max_len=32, num_heads=4, synthesizer="random+dot")
        >>> x = torch.randn(2, 20, 64)
        >>> syn(x, causal=True).shape
        torch.Size([2, 20, 64])
    """

    def __init__(
        self,
        embed_dim: int,
        max_len: int,
        num_heads: int = 1,
        *,
        synthesizer: str = "dense",
        fixed_random: bool = False,
        mixture: Literal["learned", "sum"] = "learned",
        factorized_k: int = 8,
        factor_a: int | None = None,
        factor_b: int | None = None,
        tiling: Literal["outer", "tile"] = "outer",
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads)
        check_positive(max_len=max_len)
        if mixture not in _MIXTURES:
            raise ValueError(f"mixture: expected one of {_MIXTURES}, got {mixture!r}")
        if tiling not in _TILINGS:
            raise ValueError(f"tiling: expected one of {_TILINGS}, got {tiling!r}")
        check_positive(factorized_k=factorized_k)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.components = _parse(synthesizer)
        self.embed_dim, self.max_len, self.num_heads = embed_dim, max_len, num_heads
        self.head_dim = embed_dim // num_heads
        self.fixed_random, self.mixture, self.tiling, self.dropout = fixed_random, mixture, tiling, dropout
        self.factorized_k = factorized_k
        self.factor_a, self.factor_b = _factors(max_len, factor_a, factor_b)
        factory = {"device": device, "dtype": dtype}
        h, l = num_heads, max_len

        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.q_proj: nn.Linear | None = None
        self.k_proj: nn.Linear | None = None
        if "dot" in self.components:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.dense_hidden: nn.Linear | None = None
        self.dense_out: nn.Linear | None = None
        if "dense" in self.components:
            self.dense_hidden = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)  # F1
            self.dense_out = nn.Linear(embed_dim, h * l, bias=bias, **factory)  # F2
        self.fd_hidden: nn.Linear | None = None
        self.fd_a: nn.Linear | None = None
        self.fd_b: nn.Linear | None = None
        if "factorized_dense" in self.components:
            self.fd_hidden = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.fd_a = nn.Linear(embed_dim, h * self.factor_a, bias=bias, **factory)  # F_A
            self.fd_b = nn.Linear(embed_dim, h * self.factor_b, bias=bias, **factory)  # F_B
        # R (h, l, l), R_1 and R_2 (h, l, k): parameters, or buffers when fixed; None when unused
        self._add_random("random_logits", (h, l, l), "random" in self.components, factory)
        self._add_random("random_left", (h, l, factorized_k), "factorized_random" in self.components, factory)
        self._add_random(
            "random_right", (h, l, factorized_k), "factorized_random" in self.components, factory
        )
        self.mix_logits: nn.Parameter | None = None
        if mixture == "learned" and len(self.components) > 1:
            # one component needs no weight (a softmax over one logit has no gradient)
            self.mix_logits = nn.Parameter(torch.empty(len(self.components), **factory))
        self.reset_parameters()

    def _add_random(self, name: str, shape: tuple[int, ...], used: bool, factory: dict) -> None:
        tensor = torch.empty(shape, **factory) if used else None
        if self.fixed_random:
            self.register_buffer(name, tensor)
        else:
            self.register_parameter(name, None if tensor is None else nn.Parameter(tensor))

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj is not None:
                nn.init.xavier_uniform_(proj.weight)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        for layer in (self.dense_hidden, self.dense_out, self.fd_hidden, self.fd_a, self.fd_b):
            if layer is not None:
                layer.reset_parameters()
        # The paper says only "randomly initialised"; as the official code (lecun normal), the
        # logits start with std 1/sqrt(l), R_1 R_2^T too.
        with torch.no_grad():
            if self.random_logits is not None:
                self.random_logits.normal_(0.0, 1.0 / math.sqrt(self.max_len))
            if self.random_left is not None and self.random_right is not None:
                self.random_left.normal_(0.0, 1.0 / math.sqrt(self.max_len))
                self.random_right.normal_(0.0, 1.0 / math.sqrt(self.factorized_k))
        if self.mix_logits is not None:
            nn.init.zeros_(self.mix_logits)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, max_len={self.max_len}, num_heads={self.num_heads}, "
            f"synthesizer={'+'.join(self.components)!r}, fixed_random={self.fixed_random}, "
            f"mixture={self.mixture!r}"
        )

    def mixture_weights(self) -> dict[str, Tensor]:
        """alpha per component (1 for a single component; 1 each with ``mixture="sum"``)."""
        if self.mix_logits is None:
            one = torch.ones((), device=self.v_proj.weight.device, dtype=self.v_proj.weight.dtype)
            return {c: one for c in self.components}
        alphas = torch.softmax(self.mix_logits, dim=0)
        return {c: alphas[i] for i, c in enumerate(self.components)}

    def _dense_logits(self, x: Tensor, n: int) -> Tensor:
        assert self.dense_hidden is not None and self.dense_out is not None
        rows = self.dense_out(F.relu(self.dense_hidden(x)))  # (B, N, h*l)
        # (B, N, h*l) -> (B, N, h, l) -> first n positions -> (B, h, N, n)
        return rows.view(x.shape[0], n, self.num_heads, self.max_len)[..., :n].transpose(1, 2)

    def _factorized_dense_logits(self, x: Tensor, n: int) -> Tensor:
        assert self.fd_hidden is not None and self.fd_a is not None and self.fd_b is not None
        hidden = F.relu(self.fd_hidden(x))
        a, b, batch = self.factor_a, self.factor_b, x.shape[0]
        left = self.fd_a(hidden).view(batch, n, self.num_heads, a)  # (B, N, h*a) -> (B, N, h, a)
        right = self.fd_b(hidden).view(batch, n, self.num_heads, b)  # (B, N, h*b) -> (B, N, h, b)
        if self.tiling == "outer":
            # (B, N, h, a, 1) * (B, N, h, 1, b) -> (B, N, h, a*b): C[p*b + q] = A_p B_q
            rows = (left.unsqueeze(-1) * right.unsqueeze(-2)).flatten(-2)
        else:
            # NOTE: the paper's literal "tile both": C[j] = A[j mod a] B[j mod b]
            rows = left.repeat(1, 1, 1, b) * right.repeat(1, 1, 1, a)  # (B, N, h, a*b)
        return rows[..., :n].transpose(1, 2)  # (B, N, h, n) -> (B, h, N, n)

    def _random_logits(self, n: int) -> Tensor:
        assert self.random_logits is not None
        return self.random_logits[:, :n, :n]  # (h, n, n): the same for every sample

    def _factorized_random_logits(self, n: int) -> Tensor:
        assert self.random_left is not None and self.random_right is not None
        # (h, n, k) @ (h, k, n) -> (h, n, n)
        return self.random_left[:, :n] @ self.random_right[:, :n].transpose(-2, -1)

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None = None,
        causal: bool = False,
        return_attn: bool = False,
        average_heads: bool = True,
    ) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B N D", D=self.embed_dim, dtype=parameter_dtype(self))
        batch, n = x.shape[0], x.shape[1]
        if n > self.max_len:
            raise ValueError(
                f"x: expected at most max_len={self.max_len} positions, got {n} (shape {tuple(x.shape)}); "
                "build the layer with a larger max_len"
            )
        # learned alphas only: a single component, or mixture="sum", multiplies by nothing
        alphas = self.mixture_weights() if self.mix_logits is not None else None
        v = split_heads(self.v_proj(x), self.num_heads)  # (B, h, N, d): G(X)

        synthesized: Tensor | None = None  # the mixed synthetic logits, (B, h, N, N) or (h, N, N)
        for component in self.components:
            if component == "dense":
                term = self._dense_logits(x, n)
            elif component == "factorized_dense":
                term = self._factorized_dense_logits(x, n)
            elif component == "random":
                term = self._random_logits(n)
            elif component == "factorized_random":
                term = self._factorized_random_logits(n)
            else:
                continue  # "dot" enters through q and k below
            if alphas is not None:
                term = alphas[component] * term
            synthesized = term if synthesized is None else synthesized + term

        if "dot" in self.components:
            assert self.q_proj is not None and self.k_proj is not None
            # alpha_dot Q K^T / sqrt(d): alpha folded into Q so the fused kernel can take it
            q = split_heads(self.q_proj(x), self.num_heads)  # (B, h, N, d)
            if alphas is not None:
                q = alphas["dot"] * q
            k = split_heads(self.k_proj(x), self.num_heads)  # (B, h, N, d)
            scale = 1.0 / math.sqrt(self.head_dim)
        else:
            # No query-key term: zero scores, and the synthetic logits enter as the additive mask,
            # so the same kernel (and its masking of empty rows) computes softmax(B) G(X).
            q = x.new_zeros(batch, self.num_heads, n, 1)
            k = x.new_zeros(batch, self.num_heads, n, 1)
            scale = 1.0

        padding = merge_masks_for_heads(
            None, key_mask, batch=batch, n_q=n, n_k=n, num_heads=self.num_heads, device=x.device
        )
        mask = and_masks(synthesized, padding) if padding is not None else synthesized
        heads, maps = attend_with_weights(
            q,
            k,
            v,
            mask=mask,
            causal=causal,  # merged into the mask as -inf, before the softmax
            dropout_p=self.dropout if self.training else 0.0,
            scale=scale,
            return_weights=return_attn,
        )
        # (B, h, N, d) -> (B, N, E), and the maps averaged over heads unless asked otherwise
        return project_heads(heads, self.out_proj, maps, average_heads=average_heads)
