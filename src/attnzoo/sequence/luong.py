"""Global and local (local-m, local-p) attention of Luong et al.

Luong, Pham and Manning 2015, "Effective Approaches to Attention-based Neural Machine Translation",
https://arxiv.org/abs/1508.04025 (sections 3.1 global, 3.2 local, 3.3 input feeding).

Both modules take the CURRENT decoder state h_t as the query (Bahdanau's takes the previous one)
and return the attentional hidden state ``h~_t = tanh(W_c [c_t; h_t])``, which feeds the softmax
and, with input feeding, the next decoder step. The decoder is
:class:`attnzoo.models.seq2seq.Seq2Seq` with ``attention="luong"`` or ``"luong_local"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, check_variant, parameter_dtype
from attnzoo.functional.attend import attend_with_weights, attention_weights, key_padding_to_mask
from attnzoo.registry import Paper, Sample, Sizes, example_sequence, key_mask_sample, register

__all__ = ["LOCAL_MODES", "LUONG_SCORES", "LuongAttention", "LuongLocalAttention"]

#: The scores of the paper's equation (8): three content-based ones and the location-based one.
LUONG_SCORES: tuple[str, ...] = ("dot", "general", "concat", "location")
#: local-m (monotonic, p_t = t) and local-p (predictive, p_t = S sigmoid(v_p^T tanh(W_p h_t))).
LOCAL_MODES: tuple[str, ...] = ("local-m", "local-p")

_PAPER = Paper("Effective Approaches to Attention-based Neural Machine Translation", "1508.04025")


class _LuongBase(nn.Module):
    """The content score's parameters and the attentional output layer W_c, shared by both."""

    query_dim: int
    key_dim: int
    score: str

    def _build(
        self,
        query_dim: int,
        key_dim: int | None,
        score: str,
        scores: tuple[str, ...],
        attn_dim: int | None,
        bias: bool,
        max_source_len: int | None,
        factory: dict,
    ) -> None:
        if score not in scores:
            raise ValueError(f"score: expected one of {scores}, got {score!r}")
        # before the defaults: `0 or query_dim` would take 0 for "not given"
        check_positive(query_dim=query_dim, key_dim=key_dim, attn_dim=attn_dim, max_source_len=max_source_len)
        key_dim = key_dim or query_dim
        if score == "dot" and key_dim != query_dim:
            raise ValueError(
                f"key_dim: score 'dot' needs key_dim == query_dim ({query_dim}), got {key_dim} "
                "(use score='general' to compare different widths)"
            )
        self.query_dim, self.key_dim, self.score = query_dim, key_dim, score
        self.attn_dim = attn_dim or query_dim
        self.max_source_len = max_source_len
        self.w_a: nn.Parameter | None = None
        self.v_a: nn.Parameter | None = None
        if score == "general":
            self.w_a = nn.Parameter(torch.empty(query_dim, key_dim, **factory))  # h_t^T W_a h_s
        elif score == "concat":
            # v_a^T tanh(W_a [h_t; h_s])
            self.w_a = nn.Parameter(torch.empty(self.attn_dim, query_dim + key_dim, **factory))
            self.v_a = nn.Parameter(torch.empty(self.attn_dim, **factory))
        elif score == "location":
            if max_source_len is None or max_source_len <= 0:
                raise ValueError(
                    "max_source_len: score 'location' (a_t = softmax(W_a h_t)) needs the longest "
                    f"source length as the row count of W_a, got {max_source_len}"
                )
            self.w_a = nn.Parameter(torch.empty(max_source_len, query_dim, **factory))
        # h~_t = tanh(W_c [c_t; h_t]); the paper writes no bias
        self.w_c = nn.Linear(key_dim + query_dim, query_dim, bias=bias, **factory)

    def reset_parameters(self) -> None:
        # paper, section 4.1: "parameters are uniformly initialized in [-0.1, 0.1]"
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def _score_kwargs(self) -> dict:
        if self.score == "concat":
            return {"w": self.w_a, "v_a": self.v_a}
        if self.score == "general":
            return {"w": self.w_a}
        return {}

    def _attentional(self, context: Tensor, query: Tensor) -> Tensor:
        # [c_t; h_t]: (B, N, D_k) ++ (B, N, D_q) -> (B, N, D_k + D_q)
        return torch.tanh(self.w_c(torch.cat([context, query], dim=-1)))

    def _check(self, query: Tensor, key: Tensor, key_mask: Tensor | None) -> Tensor | None:
        check_input(query, "query", ("B D", "B N D"), D=self.query_dim, dtype=parameter_dtype(self))
        check_input(
            key,
            "key",
            "B S D",
            B=query.shape[0],
            D=self.key_dim,
            dtype=query.dtype,
            dtype_source="query",
        )
        if key_mask is None:
            return None
        return key_padding_to_mask(key_mask, key.shape[0], key.shape[1], device=key.device)  # (B, 1, S)


def _example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    # current decoder states h_t of every step (teacher forcing) and a longer source
    return example_sequence(s), example_sequence(s, length=s.extent + 3, seed=1)


@register(
    "luong",
    map_kind="alignment",
    linear_memory=True,
    family="sequence",
    paper=_PAPER,
    equation="a_t(s) = softmax_s(score(h_t, h_s)), c_t = sum_s a_t(s) h_s, h~_t = tanh(W_c [c_t; h_t]); "
    "score: dot h_t^T h_s | general h_t^T W_a h_s | concat v_a^T tanh(W_a [h_t; h_s]) | location W_a h_t",
    make_kwargs=lambda s: {"query_dim": s.width},
    make_inputs=_example_inputs,
    supports_mask=True,
    channel_dim=-1,
    cost="time O(N S D + N D^2); memory O((N + S) D) for dot/general/location without maps (fused "
    "kernel), O(N S A) for concat or with return_attn",
    notes="Query is the CURRENT decoder state h_t. Default score 'dot' (the paper: dot works well for "
    "global attention, general for local). Input feeding lives in attnzoo.models.seq2seq.Seq2Seq.",
    samples=(
        key_mask_sample(key_input=1, self_attention=False),
        Sample("score=general", {"score": "general"}),
        Sample(
            "score=concat",
            {"score": "concat"},
            skips={"linear_memory": "an MLP score needs every (query, key) pair"},
        ),
        Sample("score=location", {"score": "location", "max_source_len": lambda s: s.extent + 3}),
    ),
)
class LuongAttention(_LuongBase):
    """Luong global attention with its attentional hidden state.

    ``a_t(s) = softmax_s(score(h_t, h_s))``, ``c_t = sum_s a_t(s) h_s`` and
    ``h~_t = tanh(W_c [c_t; h_t])``, where ``h_t`` is the CURRENT (top-layer) decoder state and
    ``score`` is one of (paper, equation 8)::

        dot       h_t^T h_s
        general   h_t^T W_a h_s
        concat    v_a^T tanh(W_a [h_t; h_s])
        location  a_t = softmax(W_a h_t)   (W_a: max_source_len x D; rows past S are dropped)

    dot and general run through the fused kernel when no maps are requested; location is a dot
    product of h_t with the first S rows of W_a taken as keys, so it does too.

    Args:
        query_dim: D, the decoder state width (the output width too).
        key_dim: D_k, the source state width (default D; must equal D for ``dot``).
        score: ``"dot"`` (default), ``"general"``, ``"concat"`` or ``"location"``.
        attn_dim: A, the hidden width of ``concat`` (default D).
        max_source_len: rows of the ``location`` score's W_a (required for it).
        bias: a bias in W_c (the paper has none).

    Shape:
        - query: (B, N, D), the current decoder states h_t of N steps, or (B, D) for one step.
        - key: (B, S, D_k), the encoder states h_s (the keys and the values).
        - key_mask: (B, S) bool, True at real (not padded) source positions.
        - output: the attentional state h~_t, (B, N, D) (or (B, D)); attention (``return_attn``):
          the alignment a_t, (B, N, S) (or (B, S)).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int | None = None,
        *,
        score: str = "dot",
        attn_dim: int | None = None,
        max_source_len: int | None = None,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._build(query_dim, key_dim, score, LUONG_SCORES, attn_dim, bias, max_source_len, factory)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={self.score!r}"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        *,
        key_mask: Tensor | None = None,
        return_attn: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        mask = self._check(query, key, key_mask)
        single_step = query.dim() == 2
        if single_step:
            query = query.unsqueeze(1)  # (B, D) -> (B, 1, D)
        batch, length = key.shape[0], key.shape[1]
        if self.score == "location":
            assert self.w_a is not None and self.max_source_len is not None
            if length > self.max_source_len:
                raise ValueError(
                    f"key: score 'location' was built for at most max_source_len="
                    f"{self.max_source_len} positions, got S={length}"
                )
            # W_a h_t = h_t . (rows of W_a): the location score is a dot product with learned
            # position keys, (S, D) -> (B, S, D) as a broadcast view
            position_keys = self.w_a[:length].unsqueeze(0).expand(batch, length, self.query_dim)
            context, weights = attend_with_weights(
                query, position_keys, key, score="dot", mask=mask, return_weights=return_attn
            )
        else:
            context, weights = attend_with_weights(
                query,
                key,
                key,
                score=self.score,  # type: ignore[arg-type]
                mask=mask,
                return_weights=return_attn,
                **self._score_kwargs(),
            )
        out = self._attentional(context, query)
        if single_step:
            out = out.squeeze(1)  # (B, 1, D) -> (B, D)
            weights = weights.squeeze(1) if weights is not None else None
        return out if weights is None else (out, weights)


def _local_example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    # a source longer than the window 2D + 1 = 21, so the examples exercise the gathered window
    return example_sequence(s), example_sequence(s, length=3 * s.extent + 3, seed=1)


@register(
    "luong_local",
    map_kind="alignment",
    linear_memory=True,
    family="sequence",
    paper=_PAPER,
    equation="window [p_t - D, p_t + D]; local-m p_t = t; local-p p_t = S sigmoid(v_p^T tanh(W_p h_t)), "
    "a_t(s) = softmax_window(score(h_t, h_s)) exp(-(s - p_t)^2 / (2 sigma^2)), sigma = D/2; "
    "h~_t = tanh(W_c [c_t; h_t])",
    make_kwargs=lambda s: {"query_dim": s.width},
    make_inputs=_local_example_inputs,
    supports_mask=True,
    channel_dim=-1,
    cost="time O(N (2D+1) D_k (+ A for concat)); memory O(N (2D+1) D_k) (the gathered windows), "
    "independent of the source length S",
    notes="Defaults: local-p with the 'general' score, D = 10, sigma = D/2 (the paper's best). local-p "
    "weights are NOT renormalised after the Gaussian. Window centre floor(p_t) as in the official "
    "code; variant='official' also clamps local-m's p_t = t to the last source word.",
    samples=(
        key_mask_sample(key_input=1, self_attention=False),
        Sample("mode=local-m", {"mode": "local-m"}, description="monotonic alignment p_t = t"),
        Sample("score=dot", {"score": "dot"}),
        Sample("score=concat", {"score": "concat"}),
        Sample("variant=official", {"variant": "official"}),
    ),
)
class LuongLocalAttention(_LuongBase):
    """Luong local attention (local-m and local-p) with its attentional hidden state.

    Each query attends only to the window ``[p_t - D, p_t + D]`` of source positions (0-based,
    centred at ``floor(p_t)`` as in the official code, so exactly 2D + 1 positions):

    - local-m: ``p_t = t`` (monotonic alignment; t is the decoder step).
    - local-p: ``p_t = S * sigmoid(v_p^T tanh(W_p h_t))`` with S the (unpadded) source length, and
      the alignment is multiplied by a Gaussian centred at p_t, NOT renormalised::

          a_t(s) = softmax_{s in window}(score(h_t, h_s)) * exp(-(s - p_t)^2 / (2 sigma^2))

      with ``sigma = D / 2``. (The window is chosen by floor(p_t); the gradient reaching W_p
      and v_p flows through the Gaussian, as in the paper.)

    Then ``c_t = sum_s a_t(s) h_s`` and ``h~_t = tanh(W_c [c_t; h_t])``. Positions outside the
    source or padded are masked; a window with no valid position gives ``c_t = 0``. The windows
    are gathered (no Python loop, no N x S score matrix): cost grows with D, not with S.

    Args:
        query_dim: D_h, the decoder state width (the output width too).
        key_dim: D_k, the source state width (default D_h; must equal D_h for ``dot``).
        score: ``"general"`` (default), ``"dot"`` or ``"concat"``.
        mode: ``"local-p"`` (default) or ``"local-m"``.
        window: D, the half-width of the window (paper: 10).
        sigma: the Gaussian's standard deviation (default D / 2, as in the paper).
        attn_dim: A, the hidden width of ``concat`` (default D_h).
        position_dim: rows of W_p (default D_h; the paper does not give it).
        bias: a bias in W_c (the paper has none).
        variant: ``"paper"`` (p_t = t for local-m, whatever the source length) or ``"official"``
            (the official code clamps local-m's p_t to the last source word, so targets longer
            than the source keep attending to its end).

    Shape:
        - query: (B, N, D_h), the current decoder states of N consecutive steps starting at step
          ``step`` (default 0), or (B, D_h) for the single step ``step`` (required for local-m).
        - key: (B, S, D_k), the encoder states (the keys and the values).
        - key_mask: (B, S) bool, True at real (not padded) source positions; right padding (the
          length S of local-p counts the True entries).
        - output: h~_t, (B, N, D_h) (or (B, D_h)); attention (``return_attn``): a_t scattered to
          the source positions, (B, N, S) (or (B, S)), zero outside the window.
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int | None = None,
        *,
        score: str = "general",
        mode: str = "local-p",
        window: int = 10,
        sigma: float | None = None,
        attn_dim: int | None = None,
        position_dim: int | None = None,
        bias: bool = False,
        variant: str = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in LOCAL_MODES:
            raise ValueError(f"mode: expected one of {LOCAL_MODES}, got {mode!r}")
        if window < 0:
            raise ValueError(f"window: expected a half-width D >= 0, got {window}")
        check_variant(variant)
        sigma = window / 2 if sigma is None else sigma
        if mode == "local-p" and not sigma > 0:
            raise ValueError(
                f"sigma: expected a positive standard deviation (default window / 2), got {sigma} "
                f"with window={window}"
            )
        check_positive(position_dim=position_dim)
        factory = {"device": device, "dtype": dtype}
        self._build(query_dim, key_dim, score, ("dot", "general", "concat"), attn_dim, bias, None, factory)
        self.mode, self.window, self.sigma, self.variant = mode, window, float(sigma), variant
        self.position_dim = position_dim or query_dim
        self.w_p: nn.Parameter | None = None
        self.v_p: nn.Parameter | None = None
        if mode == "local-p":
            self.w_p = nn.Parameter(torch.empty(self.position_dim, query_dim, **factory))
            self.v_p = nn.Parameter(torch.empty(self.position_dim, **factory))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={self.score!r}, "
            f"mode={self.mode!r}, window={self.window}, sigma={self.sigma}"
        )

    def positions(
        self, query: Tensor, source_len: int, *, key_mask: Tensor | None = None, step: int = 0
    ) -> Tensor:
        """The aligned source positions p_t, (B, N), for (B, N, D_h) queries of steps step, ...

        Float32 for half-precision queries (a bfloat16 p_t would be off by whole positions).
        """
        batch, n_q = query.shape[0], query.shape[1]
        pos_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        if key_mask is not None:
            lengths = key_mask.sum(dim=-1).to(pos_dtype).unsqueeze(-1)  # (B,) -> (B, 1)
        else:
            lengths = torch.full((batch, 1), float(source_len), dtype=pos_dtype, device=query.device)
        if self.mode == "local-m":
            steps = torch.arange(n_q, dtype=pos_dtype, device=query.device) + step  # (N,)
            positions = steps.expand(batch, n_q)
            if self.variant == "official":
                positions = torch.minimum(positions, lengths - 1)
            return positions
        assert self.w_p is not None and self.v_p is not None
        hidden = torch.tanh(F.linear(query, self.w_p))  # (B, N, D_h) -> (B, N, P)
        logit = (hidden @ self.v_p).to(pos_dtype)  # (B, N, P) -> (B, N)
        return lengths * torch.sigmoid(logit)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        *,
        key_mask: Tensor | None = None,
        step: int | None = None,
        return_attn: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        self._check(query, key, key_mask)
        single_step = query.dim() == 2
        if single_step:
            if self.mode == "local-m" and step is None:
                raise ValueError(
                    "step: local-m aligns step t with source position p_t = t; a single-step "
                    "(B, D) query needs its decoder step, got None"
                )
            query = query.unsqueeze(1)  # (B, D_h) -> (B, 1, D_h)
        batch, n_q, length = query.shape[0], query.shape[1], key.shape[1]
        positions = self.positions(query, length, key_mask=key_mask, step=step or 0)  # (B, N)

        # The window [floor(p) - D, floor(p) + D] lies inside a run of `span` source positions that
        # starts at `start`; with span = min(2D + 1, S) that run always fits in the source.
        span = min(2 * self.window + 1, length)
        centre = torch.floor(positions).long()  # (B, N)
        start = (centre - self.window).clamp(0, length - span)
        index = start.unsqueeze(-1) + torch.arange(span, device=query.device)  # (B, N, W)
        valid = (index - centre.unsqueeze(-1)).abs() <= self.window  # inside the window
        if key_mask is not None:
            # (B, S) -> (B, N W) -> (B, N, W): padded source positions are never attended
            valid = valid & key_mask.gather(1, index.reshape(batch, n_q * span)).reshape(batch, n_q, span)
            # and hold zeros, so that whatever they held (0 x NaN is NaN) cannot reach real outputs
            key = torch.where(key_mask.unsqueeze(-1), key, 0.0)  # (B, S, 1) over (B, S, D_k)
        # gather each query's window from the flattened source: (B, S, D_k) -> (B S, D_k) ->
        # (B N W, D_k) -> (B, N, W, D_k)
        rows = index + (torch.arange(batch, device=query.device) * length).view(batch, 1, 1)
        windows = key.reshape(batch * length, self.key_dim).index_select(0, rows.reshape(batch * n_q * span))
        windows = windows.reshape(batch, n_q, span, self.key_dim)

        # softmax over the window, (B, N, 1, D_h) against (B, N, W, D_k) -> (B, N, 1, W) -> (B, N, W)
        weights = attention_weights(
            query.unsqueeze(-2),
            windows,
            score=self.score,  # type: ignore[arg-type]
            mask=valid.unsqueeze(-2),
            **self._score_kwargs(),
        ).squeeze(-2)
        if self.mode == "local-p":
            # NOTE: multiplied, not renormalised (paper, eq. 10): the weights sum to less than 1
            offset = index.to(positions.dtype) - positions.unsqueeze(-1)  # (B, N, W)
            weights = weights * torch.exp(-offset.square() / (2 * self.sigma**2)).to(weights.dtype)
        # (B, N, 1, W) @ (B, N, W, D_k) -> (B, N, 1, D_k) -> (B, N, D_k)
        context = (weights.to(key.dtype).unsqueeze(-2) @ windows).squeeze(-2)
        out = self._attentional(context, query)
        if single_step:
            out = out.squeeze(1)  # (B, 1, D_h) -> (B, D_h)
        if not return_attn:
            return out
        # the window weights at their source positions, for plotting: (B, N, W) -> (B, N, S)
        full = weights.new_zeros(batch, n_q, length).scatter(-1, index, weights)
        return out, (full.squeeze(1) if single_step else full)
