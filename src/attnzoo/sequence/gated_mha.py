"""Multi-head attention with hard-concrete head gates, prunable heads.

Voita et al. 2019, "Analyzing Multi-Head Self-Attention: Specialized Heads Do the Heavy Lifting, the
Rest Can Be Pruned", https://arxiv.org/abs/1905.09418 (section 6); the gates are the hard concrete
distribution of Louizos et al. 2018, "Learning Sparse Neural Networks through L0 Regularization",
https://arxiv.org/abs/1712.01312. Official code: lena-voita/the-story-of-heads
(``lib/layers/concrete_gate.py``, ``MultiHeadAttnConcrete`` in ``lib/layers/attn.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo.functional.heads import check_heads, merge_masks_for_heads
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
from attnzoo.sequence.mha import KVCache, MultiheadAttention

__all__ = ["GatedMultiheadAttention"]

Noise = Literal["token", "sample", "batch"]
_NOISES = ("token", "sample", "batch")


@register(
    "gated_mha",
    map_kind="pairwise",
    linear_memory=True,
    family="sequence",
    paper=Paper(
        "Analyzing Multi-Head Self-Attention: Specialized Heads Do the Heavy Lifting, the Rest Can Be Pruned",
        "1905.09418",
    ),
    equation="MultiHead(Q, K, V) = Concat(g_1 head_1, ..., g_h head_h) W^O, g_i ~ HardConcrete(log a_i, "
    "beta=0.33, stretch (-0.1, 1.1)); L0 = sum_i P(g_i != 0) = sum_i sigmoid(log a_i - beta log(0.1/1.1))",
    make_kwargs=lambda s: {"embed_dim": s.width, "num_heads": 4},
    make_inputs=sequence_input,
    supports_mask=True,
    channel_dim=-1,
    cost="time O(N_q N_k d + (N_q + N_k) d^2); memory O((N_q + N_k) d) without maps (fused kernel), "
    "O(h N_q N_k) with return_attn; prune() removes closed heads (d_head (N_q + N_k + 2 d) work each)",
    notes="Training gates draw one noise per head and query position by default (noise='token'); the "
    "official code draws one per head per step (noise='batch'). log_alpha starts at log 11, the smallest "
    "value whose deterministic gate is exactly 1: the layer starts as plain multi-head attention.",
    samples=(
        key_mask_sample(thorough=True),
        attn_mask_sample("attn_mask_3d"),
        attn_mask_sample("attn_mask_4d", heads=4),
        Sample("causal", forward_kwargs=causal, description="causal self-attention"),
        Sample("cross", inputs=cross_inputs, description="cross-attention to a longer memory"),
        key_mask_sample("cross_key_mask", key_input=1, self_attention=False, inputs=cross_inputs),
        # gates half open (log a = 0): with few draws (B h, or h), open gates (log 11) often have
        # no draw inside (0, 1), where the clamp passes log_alpha a gradient
        Sample("noise=sample", {"noise": "sample", "init_log_alpha": 0.0}, description="a gate per sequence"),
        Sample("noise=batch", {"noise": "batch", "init_log_alpha": 0.0}, description="a gate per batch"),
    ),
)
class GatedMultiheadAttention(MultiheadAttention):
    """Multi-head attention whose heads are scaled by stochastic gates, for L0 head pruning.

    ``out = Concat(g_1 head_1, ..., g_h head_h) W^O`` with ``head_i`` as in
    :class:`~attnzoo.sequence.mha.MultiheadAttention` (which this extends: every option, mask
    layout and input form of ``mha`` holds here; only the heads are scaled, in
    :meth:`scale_heads`) and a gate per head drawn from the hard concrete distribution
    (Louizos et al. 2018):

    ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log a_i) / beta)``,
    ``g_i = min(1, max(0, s (r - l) + l))`` with stretch (l, r) = (-0.1, 1.1) and temperature
    beta = 0.33. The stretch puts mass on exactly 0 and exactly 1; add ``lambda * l0_penalty()``,
    ``sum_i P(g_i != 0) = sum_i sigmoid(log a_i - beta log(-l / r))``, to the loss to close heads.
    In eval mode the gate is deterministic, ``min(1, max(0, sigmoid(log a_i) (r - l) + l))`` (as
    the official code), and :meth:`prune` removes the heads whose gate is 0 for real.

    Gradients: the clamp has no gradient where a sample is exactly 0 or 1, and a head whose gate
    is 0 in every draw gets no gradient at all. ``log_alpha`` starts at ``log((1 - l)/(r - 1)) =
    log 11`` (deterministic gate exactly 1, so the layer starts as plain attention and
    :meth:`from_mha` keeps a trained model's outputs); there a draw is 0 with probability 0.04 and
    strictly inside (0, 1) with probability 0.13. With one draw per head and query position
    (``noise="token"``, default), practically every step has draws inside (0, 1) for every head,
    so ``log_alpha`` gets a task gradient and no head is silenced for a whole batch.

    Args:
        embed_dim: model width d.
        num_heads: h; must divide ``embed_dim``.
        kdim, vdim, bias, add_bias_kv, add_zero_attn, batch_first, dropout, out_dropout: as in
            :class:`~attnzoo.sequence.mha.MultiheadAttention`.
        temperature: beta (paper and official code: 0.33).
        stretch: (l, r), with l < 0 and r > 1 (paper: (-0.1, 1.1)).
        init_log_alpha: the initial log a (default log((1 - l)/(r - 1)): gates start fully open).
        noise: how many training gates are drawn per head: ``"token"`` (default: one per sample and
            query position), ``"sample"`` (one per sample) or ``"batch"`` (one per step, shared by the
            batch: the official code's default).
        eps: the uniform noise is drawn from (eps, 1 - eps) (official: 1e-6).

    Shape:
        As :class:`~attnzoo.sequence.mha.MultiheadAttention` (h: the heads left after pruning);
        the maps (``return_attn``) are the weights before gating.

    Example:
        >>> layer = GatedMultiheadAttention(64, 8)
        >>> x = torch.randn(2, 10, 64)
        >>> loss = layer(x).pow(2).mean() + 0.01 * layer.l0_penalty()
        >>> removed = layer.eval().prune()  # the heads whose gate closed (none yet)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        batch_first: bool = True,
        dropout: float = 0.0,
        out_dropout: float = 0.0,
        temperature: float = 0.33,
        stretch: tuple[float, float] = (-0.1, 1.1),
        init_log_alpha: float | None = None,
        noise: Noise = "token",
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_heads(embed_dim, num_heads)
        if not temperature > 0:
            raise ValueError(f"temperature: expected a positive beta, got {temperature}")
        low, high = stretch
        if not (low < 0.0 and high > 1.0):
            raise ValueError(f"stretch: expected (l, r) with l < 0 < 1 < r, got {stretch}")
        if noise not in _NOISES:
            raise ValueError(f"noise: expected one of {_NOISES}, got {noise!r}")
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"eps: expected a value in [0, 0.5), got {eps}")
        # q_proj .. v_proj have num_heads * head_dim rows, which shrink when heads are pruned;
        # embed_dim does not
        super().__init__(
            embed_dim,
            num_heads,
            kdim=kdim,
            vdim=vdim,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            batch_first=batch_first,
            dropout=dropout,
            out_dropout=out_dropout,
            device=device,
            dtype=dtype,
        )
        self.temperature, self.stretch = temperature, (low, high)
        self.noise, self.eps = noise, eps
        self.init_log_alpha = (
            math.log((1.0 - low) / (high - 1.0)) if init_log_alpha is None else init_log_alpha
        )
        self.log_alpha = nn.Parameter(torch.empty(num_heads, device=device, dtype=dtype))
        self._reset_gates()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "log_alpha"):  # absent while MultiheadAttention.__init__ runs
            self._reset_gates()

    def _reset_gates(self) -> None:
        nn.init.constant_(self.log_alpha, self.init_log_alpha)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, temperature={self.temperature}, stretch={self.stretch}, "
            f"noise={self.noise!r}"
        )

    @classmethod
    def from_mha(cls, module: MultiheadAttention, **kwargs: object) -> GatedMultiheadAttention:
        """Wrap a (trained) :class:`MultiheadAttention` with gates, open at the start.

        With the default ``init_log_alpha`` the eval outputs equal those of ``module``; ``kwargs``
        go to the constructor (temperature, stretch, noise, ...).
        """
        weight = module.out_proj.weight
        ours = cls(
            module.embed_dim,
            module.num_heads,
            kdim=module.kdim,
            vdim=module.vdim,
            bias=module.q_proj.bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            batch_first=module.batch_first,
            dropout=module.dropout,
            out_dropout=module.out_dropout.p,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,  # type: ignore[arg-type]
        )
        ours.load_state_dict(module.state_dict(), strict=False)
        return ours

    # -- the gates ------------------------------------------------------------------------------

    def _log_alpha(self) -> Tensor:
        # gates in at least float32: a half-precision sigmoid would blur the clamp at 0 and 1
        return self.log_alpha.to(torch.promote_types(self.log_alpha.dtype, torch.float32))

    def gates(self) -> Tensor:
        """The deterministic (eval) gates, (h,): ``clamp(sigmoid(log a) (r - l) + l, 0, 1)``."""
        low, high = self.stretch
        return (torch.sigmoid(self._log_alpha()) * (high - low) + low).clamp(0.0, 1.0)

    def gate_open_probability(self) -> Tensor:
        """P(g_i != 0) per head, (h,): ``sigmoid(log a_i - beta log(-l / r))``."""
        low, high = self.stretch
        return torch.sigmoid(self._log_alpha() - self.temperature * math.log(-low / high))

    def l0_penalty(self) -> Tensor:
        """The expected number of open heads, ``sum_i P(g_i != 0)`` (add ``lambda *`` it to the loss)."""
        return self.gate_open_probability().sum()

    def sample_gates(self, batch: int, n_q: int) -> Tensor:
        """Training gates, broadcastable to (B, h, N_q, 1), drawn as ``noise`` says."""
        shape = {
            "token": (batch, self.num_heads, n_q, 1),
            "sample": (batch, self.num_heads, 1, 1),
            "batch": (1, self.num_heads, 1, 1),
        }[self.noise]
        low, high = self.stretch
        log_alpha = self._log_alpha().view(1, -1, 1, 1)  # (h,) -> (1, h, 1, 1)
        u = torch.rand(shape, device=log_alpha.device, dtype=log_alpha.dtype)
        u = self.eps + (1.0 - 2.0 * self.eps) * u  # keep log u and log(1 - u) finite
        concrete = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.temperature)
        return (concrete * (high - low) + low).clamp(0.0, 1.0)

    @torch.no_grad()
    def prune(self, heads: Iterable[int] | None = None) -> list[int]:
        """Remove heads for real: the closed ones (deterministic gate 0) or the ``heads`` given.

        The projections lose the heads' rows (W^Q, W^K, W^V) and columns (W^O) and ``log_alpha``
        its entries, so the layer is smaller and, in eval mode, gives the same outputs as before
        when only closed heads are removed. ``embed_dim`` is unchanged.

        Returns:
            The removed heads, as indices into the heads before this call.
        """
        if heads is None:
            removed = [int(i) for i in torch.nonzero(self.gates() == 0).flatten().tolist()]
        else:
            removed = sorted({int(i) for i in heads})
            bad = [i for i in removed if not 0 <= i < self.num_heads]
            if bad:
                raise ValueError(f"heads: expected indices in [0, {self.num_heads}), got {bad}")
        if not removed:
            return []
        keep = [i for i in range(self.num_heads) if i not in removed]
        device = self.log_alpha.device
        heads_kept = torch.tensor(keep, dtype=torch.long, device=device)
        # the rows of head i are i*d .. (i+1)*d - 1 in each projection
        offsets = torch.arange(self.head_dim, device=device)
        rows = (heads_kept.unsqueeze(1) * self.head_dim + offsets).flatten()  # (h_kept * d,)
        self.q_proj = _take_rows(self.q_proj, rows)
        self.k_proj = _take_rows(self.k_proj, rows)
        self.v_proj = _take_rows(self.v_proj, rows)
        self.out_proj = _take_columns(self.out_proj, rows)
        if self.bias_k is not None and self.bias_v is not None:
            self.bias_k = nn.Parameter(self.bias_k[rows].clone(), requires_grad=self.bias_k.requires_grad)
            self.bias_v = nn.Parameter(self.bias_v[rows].clone(), requires_grad=self.bias_v.requires_grad)
        self.log_alpha = nn.Parameter(self.log_alpha[heads_kept].clone())
        self.num_heads = len(keep)
        return removed

    # -- forward --------------------------------------------------------------------------------

    def scale_heads(self, heads: Tensor) -> Tensor:
        """``g_i head_i``: the heads (B, h, N_q, d) times their gates (sampled in training)."""
        if self.training:
            gates = self.sample_gates(heads.shape[0], heads.shape[2])  # (B or 1, h, N_q or 1, 1)
        else:
            gates = self.gates().view(1, -1, 1, 1)  # (h,) -> (1, h, 1, 1)
        return heads * gates.to(heads.dtype)

    def _attend_heads(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_mask: Tensor | None,
        attn_mask: Tensor | None,
        causal: bool,
        return_attn: bool,
        average_heads: bool,
        cache: KVCache | None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if self.num_heads > 0:
            return super()._attend_heads(
                query,
                key,
                value,
                key_mask=key_mask,
                attn_mask=attn_mask,
                causal=causal,
                return_attn=return_attn,
                average_heads=average_heads,
                cache=cache,
            )
        # every head pruned: only the output bias is left; masks are still checked, against one head
        batch, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]
        merge_masks_for_heads(
            attn_mask,
            key_mask,
            batch=batch,
            n_q=n_q,
            n_k=n_k,
            num_heads=1,
            device=query.device,
            additive_key_mask=True,
        )
        out = self._output(query.new_zeros(batch, n_q, 0))
        if not return_attn:
            return out
        n_k += (self.bias_k is not None) + self.add_zero_attn  # the extra keys' columns
        maps = query.new_zeros(batch, n_q, n_k) if average_heads else query.new_zeros(batch, 0, n_q, n_k)
        return out, maps


def _take_rows(layer: nn.Linear, rows: Tensor) -> nn.Linear:
    """A Linear with the given output rows of ``layer`` (built on meta: no wasted init)."""
    with warnings.catch_warnings():  # zero rows when every head goes: init warns on empty tensors
        warnings.simplefilter("ignore", UserWarning)
        smaller = nn.Linear(layer.in_features, rows.numel(), bias=layer.bias is not None, device="meta")
    smaller.weight = nn.Parameter(layer.weight[rows].clone(), requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        smaller.bias = nn.Parameter(layer.bias[rows].clone(), requires_grad=layer.bias.requires_grad)
    return smaller


def _take_columns(layer: nn.Linear, columns: Tensor) -> nn.Linear:
    """A Linear with the given input columns of ``layer`` (the bias is kept whole)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        smaller = nn.Linear(columns.numel(), layer.out_features, bias=layer.bias is not None, device="meta")
    smaller.weight = nn.Parameter(layer.weight[:, columns].clone(), requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        smaller.bias = nn.Parameter(layer.bias.clone(), requires_grad=layer.bias.requires_grad)
    return smaller
