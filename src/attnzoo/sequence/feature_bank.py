"""Feature bank operator (FBO) of long-term feature banks: short-term features attend to a bank.

Wu et al. 2019, "Long-Term Feature Banks for Detailed Video Understanding",
https://arxiv.org/abs/1812.05038.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.attend import attend_with_weights
from attnzoo.registry import Paper, Sample, Sizes, example_sequence, register

__all__ = ["FeatureBankLayer", "FeatureBankOperator"]

Mode = Literal["nl", "avg", "max"]


class FeatureBankLayer(nn.Module):
    """One modified non-local block of FBO-NL (paper Fig. 3).

    ``S' = S + Dropout(W_out ReLU(LN(softmax(theta(S) phi(L)^T / sqrt(d)) g(L))))``: the query
    side S (B, N, d) attends to the bank L (B, M, d); theta, phi, g, W_out are linear maps d -> d,
    W_out zero-initialised (the official init, so the layer starts as the identity); LayerNorm
    without affine parameters, as the official Caffe2 op.

    Shape:
        - query: (B, N, d); key: (B, M, d), the bank; output: (B, N, d); weights (B, N, M).
    """

    def __init__(
        self,
        dim: int,
        *,
        dropout: float = 0.2,
        scale: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dim, self.scaled = dim, scale
        self.theta = nn.Linear(dim, dim, **factory)
        self.phi = nn.Linear(dim, dim, **factory)
        self.g = nn.Linear(dim, dim, **factory)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, **factory)
        self.out = nn.Linear(dim, dim, **factory)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # official: N(0, 0.01) for theta, phi, g; zeros for the output layer; zero biases
        for layer in (self.theta, self.phi, self.g):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, query: Tensor, key: Tensor, *, return_attn: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        scale = 1.0 / math.sqrt(self.dim) if self.scaled else 1.0
        q, k, v = self.theta(query), self.phi(key), self.g(key)
        context, weights = attend_with_weights(q, k, v, score="dot", scale=scale, return_weights=return_attn)
        update = self.dropout(self.out(F.relu(self.norm(context))))  # pre-activation: LN, ReLU, W_out
        return query + update, weights


def _example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    # the bank is several times longer than the short-term window, as in the paper
    return (example_sequence(s), example_sequence(s, length=4 * s.extent, seed=1))


@register(
    "feature_bank",
    map_kind="pairwise",
    linear_memory=True,
    family="sequence",
    paper=Paper("Long-Term Feature Banks for Detailed Video Understanding", "1812.05038"),
    equation="FBO-NL: S^(l) = S^(l-1) + Dropout(W_out ReLU(LN(softmax(theta(S^(l-1)) phi(L)^T / sqrt(d)) "
    "g(L)))), l = 1, 2, with S^(0) and L reduced to d = 512; FBO-Avg/Max: pool L over the bank",
    make_kwargs=lambda s: {"channels": s.width, "inner_channels": s.width},
    make_inputs=_example_inputs,
    channel_dim=-1,
    shape_preserving=False,
    cost="time O(B (N + M) C d + L B (N + M) d^2 + L B N M d); memory O(B (N + M) d) without maps "
    "(fused kernel), O(L B N M) with return_attn",
    notes="inputs (short-term (B, N, C), bank (B, M, C_bank)); the output width is inner_channels "
    "(the paper's 512); mode='avg'/'max' pool the bank instead of attending (FBO-Avg/FBO-Max)",
    samples=(
        *(
            Sample(
                f"mode={mode}",
                {"mode": mode},
                description=f"FBO-{mode.title()}: the bank pooled for every short-term feature",
                skips={
                    "gradients": "FBO-Avg/Max have no parameters",
                    "nan": "FBO-Avg/Max read only the bank: the short-term features give the shape",
                },
            )
            for mode in ("avg", "max")
        ),
        Sample("inner_channels", {"inner_channels": lambda s: 2 * s.width}, description="d != C (64 -> 512)"),
    ),
)
class FeatureBankOperator(nn.Module):
    """The feature bank operator FBO(S, L): short-term features read a long-term feature bank.

    FBO-NL (the paper's best; Fig. 3 and the official code): S and L are first reduced to
    ``inner_channels`` d = 512 by linear layers followed by dropout, then ``num_layers`` = 2
    stacked modified non-local blocks (:class:`FeatureBankLayer`) let every short-term feature
    attend to the whole bank::

        S^(0) = Dropout(W_s S),  L~ = Dropout(W_l L)
        S^(l) = S^(l-1) + Dropout(W_out^(l) ReLU(LN(softmax(theta^(l)(S^(l-1)) phi^(l)(L~)^T / sqrt(d))
                                                      g^(l)(L~))))
        FBO(S, L) = S^(num_layers)                                                    (B, N, d)

    FBO-Avg / FBO-Max (``mode="avg"`` / ``"max"``) have no parameters: they average or max-pool
    the bank over its M entries and give that vector to every short-term feature, (B, N, C_bank).
    In the paper's model the FBO output is concatenated with the short-term features before the
    classifier; that concatenation belongs to the caller.

    Args:
        channels: C, the width of the short-term features S.
        bank_channels: C_bank, the width of the bank L (default C).
        inner_channels: d (paper: 512); also the output width of FBO-NL.
        num_layers: stacked blocks (paper: 2; 3 in an ablation).
        mode: ``"nl"`` (attention), ``"avg"`` or ``"max"`` (pooling).
        dropout: on the reduced inputs and on each block's update (official: 0.2).
        scale: divide logits by sqrt(d) (paper and official: yes).

    Shape:
        - query: (B, N, C), the short-term features S; key: (B, M, C_bank), the bank L (keys and
          values), M usually much larger than N.
        - output: (B, N, d) for ``"nl"``; (B, N, C_bank) for ``"avg"``/``"max"``.
        - attention (``return_attn``): ``"nl"``: (B, num_layers, N, M), each layer's softmax over
          the bank; ``"avg"``: (B, 1, N, M) uniform 1/M; ``"max"``: (B, M, C_bank), 1 where a bank
          entry attains a channel's maximum. Float32 for half-precision inputs.
    """

    def __init__(
        self,
        channels: int,
        bank_channels: int | None = None,
        inner_channels: int = 512,
        num_layers: int = 2,
        *,
        mode: Mode = "nl",
        dropout: float = 0.2,
        scale: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels, bank_channels=bank_channels)
        check_positive(inner_channels=inner_channels, num_layers=num_layers)
        if mode not in ("nl", "avg", "max"):
            raise ValueError(f"mode: expected 'nl', 'avg' or 'max', got {mode!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.channels, self.bank_channels = channels, bank_channels or channels
        self.inner_channels, self.num_layers, self.mode = inner_channels, num_layers, mode
        factory = {"device": device, "dtype": dtype}
        self.layers = nn.ModuleList()
        if mode == "nl":
            self.in_proj = nn.Linear(channels, inner_channels, **factory)
            self.bank_proj = nn.Linear(self.bank_channels, inner_channels, **factory)
            self.in_dropout = nn.Dropout(dropout)
            self.bank_dropout = nn.Dropout(dropout)
            self.layers.extend(
                FeatureBankLayer(inner_channels, dropout=dropout, scale=scale, **factory)
                for _ in range(num_layers)
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.mode == "nl":
            # official: the input reductions are N(0, 0.01) with zero bias
            for layer in (self.in_proj, self.bank_proj):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
            for block in self.layers:
                block.reset_parameters()  # type: ignore[operator]

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, bank_channels={self.bank_channels}, "
            f"inner_channels={self.inner_channels}, num_layers={self.num_layers}, mode={self.mode!r}"
        )

    def forward(
        self, query: Tensor, key: Tensor, *, return_attn: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        check_input(query, "query", "B N C", C=self.channels, dtype=parameter_dtype(self))
        check_input(
            key,
            "key",
            "B M C",
            B=query.shape[0],
            C=self.bank_channels,
            dtype=query.dtype,
            dtype_source="query",
        )
        batch, length = query.shape[0], query.shape[1]
        if self.mode != "nl":
            pooled = key.mean(dim=1) if self.mode == "avg" else key.max(dim=1).values  # (B, C_bank)
            # the same bank summary for every short-term feature: (B, C_bank) -> (B, N, C_bank)
            out = pooled.unsqueeze(1).expand(batch, length, self.bank_channels)
            if not return_attn:
                return out
            if self.mode == "avg":
                size = key.shape[1]
                weights = torch.full(
                    (batch, 1, length, size), 1.0 / size, device=query.device, dtype=query.dtype
                )
            else:
                weights = (key == pooled.unsqueeze(1)).to(query.dtype)  # (B, M, C_bank)
            return out, weights

        state = self.in_dropout(self.in_proj(query))  # (B, N, d)
        memory = self.bank_dropout(self.bank_proj(key))  # (B, M, d)
        maps: list[Tensor] = []
        for block in self.layers:  # the stacked layers (2), each attending to the same bank
            state, weights = block(state, memory, return_attn=return_attn)
            if weights is not None:
                maps.append(weights)
        if return_attn:
            return state, torch.stack(maps, dim=1)  # (B, num_layers, N, M)
        return state
