"""Soft and hard visual attention of Show, Attend and Tell, with its training terms.

Xu, Ba, Kiros, Cho, Courville, Salakhutdinov, Zemel and Bengio 2015, "Show, Attend and Tell: Neural
Image Caption Generation with Visual Attention", https://arxiv.org/abs/1502.03044 (sections 3.1.2,
4.1 hard attention, 4.2 soft attention, 4.2.1 doubly stochastic attention).

- :class:`ShowAttendTellAttention`: ``e_ti = f_att(a_i, h_{t-1})``, ``alpha_t = softmax(e_t)``;
  soft: ``z_t = beta_t sum_i alpha_ti a_i`` with the gate ``beta_t = sigmoid(f_beta(h_{t-1}))``;
  hard: ``z_t = beta_t a_{s_t}`` with ``s_t ~ Multinoulli(alpha_t)``.
- :func:`doubly_stochastic_penalty`: ``lambda sum_i (1 - sum_t alpha_ti)^2``.
- :func:`hard_attention_loss` and :class:`MovingAverageBaseline`: the REINFORCE learning rule of
  equation (12) with the moving-average baseline and the entropy bonus.

The captioning decoder that uses them is :class:`attnzoo.models.captioner.ShowAttendTellCaptioner`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_mask, check_positive, check_variant, parameter_dtype
from attnzoo.functional.attend import attend_with_weights, attention_weights
from attnzoo.registry import Paper, Sample, Sizes, example_image, example_sequence, register

__all__ = [
    "MovingAverageBaseline",
    "ShowAttendTellAttention",
    "doubly_stochastic_penalty",
    "hard_attention_loss",
]

#: Annotation vectors as a set of L vectors, or as the CNN's (B, D, H, W) map (L = H W).
FEATURE_LAYOUTS = ("B L D", "B D H W")


def _example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    # previous LSTM states h_{t-1} of every caption step and a conv feature map, L = extent^2
    return example_sequence(s), example_image(s, seed=1)


@register(
    "show_attend_tell",
    map_kind="mixed",
    family="sequence",
    paper=Paper("Show, Attend and Tell: Neural Image Caption Generation with Visual Attention", "1502.03044"),
    equation="e_ti = w^T tanh(W_a a_i + W_h h_{t-1} + b), alpha_t = softmax_i(e_ti); "
    "soft: z_t = beta_t sum_i alpha_ti a_i, beta_t = sigmoid(f_beta(h_{t-1})); hard: z_t = beta_t a_{s_t}, "
    "s_t ~ Multinoulli(alpha_t)",
    make_kwargs=lambda s: {"hidden_dim": s.width},
    make_inputs=_example_inputs,
    channel_dim=-1,
    cost="time O(N L A + (N D_h + L D) A); memory O(N L A) (the attention MLP over every pair)",
    notes="Hard attention samples only in training (with probability expectation_prob = 0.5 an image "
    "uses the expectation alpha instead, paper section 4.1); in eval it returns the expectation, as "
    "the official sampler does. Train it with hard_attention_loss and MovingAverageBaseline.",
    samples=(
        Sample("gate=False", {"gate": False}, description="without the gating scalar beta"),
        Sample("mode=hard", {"mode": "hard"}, description="stochastic hard attention"),
    ),
)
class ShowAttendTellAttention(nn.Module):
    """Show, Attend and Tell's attention over annotation vectors, soft (gated) or hard.

    ``e_ti = f_att(a_i, h_{t-1}) = w^T tanh(W_a a_i + W_h h_{t-1} + b)`` (an MLP conditioned on
    the PREVIOUS LSTM state, as in the official code), ``alpha_ti = softmax_i(e_ti)`` and

    - soft (section 4.2): ``z_t = beta_t * sum_i alpha_ti a_i``, ``beta_t = sigmoid(f_beta(h_{t-1}))``
      a scalar gate per step (section 4.2.1; ``gate=False`` drops it);
    - hard (section 4.1): in training, ``z_t = beta_t * a_{s_t}`` with ``s_t ~ Multinoulli(alpha_t)``;
      with probability ``expectation_prob`` (0.5) an image uses the expected value ``alpha_t``
      instead of the sample. The attention parameters then learn through REINFORCE: pass the
      ``log_prob`` and ``entropy`` returned with ``return_attn`` to :func:`hard_attention_loss`.
      In eval, ``z_t`` is the expectation (deterministic, as the official sampler).

    Args:
        hidden_dim: D_h, the width of the LSTM state h_{t-1} (the query).
        feature_dim: D, the width of the annotation vectors a_i (default D_h; paper: 512).
        attn_dim: A, the hidden width of the MLP (default D, as in the official code).
        mode: ``"soft"`` (default) or ``"hard"``.
        gate: the scalar gate beta_t (paper: yes).
        expectation_prob: hard mode, the probability that an image uses alpha instead of a sample.

    Shape:
        - query: (B, N, D_h), the previous states h_{t-1} of N caption steps, or (B, D_h) for one.
        - key: (B, L, D) annotation vectors a_i (the keys and the values), or a (B, D, H, W)
          feature map (L = H W).
        - use_expectation: hard mode in training, (B,) bool: the images that use alpha rather than
          a sample (default: drawn with ``expectation_prob``). Pass the same one at every step
          of a caption.
        - output: z_t, (B, N, D) (or (B, D)); attention (``return_attn``): a dict with ``alpha``
          (B, N, L) and ``beta`` (B, N, 1) (with the gate), plus, for hard attention in training,
          ``location`` (B, N) the sampled indices, ``log_prob`` (B, N) = log alpha_{t, s_t} (0 where
          the expectation was used) and ``entropy`` (B, N) of alpha_t.
    """

    def __init__(
        self,
        hidden_dim: int,
        feature_dim: int | None = None,
        attn_dim: int | None = None,
        *,
        mode: str = "soft",
        gate: bool = True,
        expectation_prob: float = 0.5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(hidden_dim=hidden_dim, feature_dim=feature_dim, attn_dim=attn_dim)  # before `or`
        feature_dim = feature_dim or hidden_dim
        attn_dim = attn_dim or feature_dim
        if mode not in ("soft", "hard"):
            raise ValueError(f"mode: expected 'soft' or 'hard', got {mode!r}")
        if not 0.0 <= expectation_prob <= 1.0:
            raise ValueError(f"expectation_prob: expected a probability in [0, 1], got {expectation_prob}")
        self.hidden_dim, self.feature_dim, self.attn_dim = hidden_dim, feature_dim, attn_dim
        self.mode, self.expectation_prob = mode, expectation_prob
        factory = {"device": device, "dtype": dtype}
        self.w_a = nn.Parameter(torch.empty(attn_dim, feature_dim, **factory))  # annotations -> MLP
        self.w_h = nn.Parameter(torch.empty(attn_dim, hidden_dim, **factory))  # h_{t-1} -> MLP
        self.b = nn.Parameter(torch.empty(attn_dim, **factory))
        self.w = nn.Parameter(torch.empty(attn_dim, **factory))  # MLP -> score
        self.f_beta = nn.Linear(hidden_dim, 1, **factory) if gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.w_a)
        nn.init.xavier_uniform_(self.w_h)
        nn.init.zeros_(self.b)
        nn.init.uniform_(self.w, -(self.attn_dim**-0.5), self.attn_dim**-0.5)
        if self.f_beta is not None:
            self.f_beta.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"hidden_dim={self.hidden_dim}, feature_dim={self.feature_dim}, attn_dim={self.attn_dim}, "
            f"mode={self.mode!r}, gate={self.f_beta is not None}"
        )

    def _score_kwargs(self) -> dict:
        return {"w_q": self.w_h, "w_k": self.w_a, "v_a": self.w, "b_a": self.b}

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        *,
        use_expectation: Tensor | None = None,
        return_attn: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(query, "query", ("B D", "B N D"), D=self.hidden_dim, dtype=parameter_dtype(self))
        check_input(
            key,
            "key",
            FEATURE_LAYOUTS,
            B=query.shape[0],
            D=self.feature_dim,
            dtype=query.dtype,
            dtype_source="query",
        )
        if key.dim() == 4:
            key = key.flatten(2).transpose(1, 2)  # (B, D, H, W) -> (B, HW, D)
        single_step = query.dim() == 2
        if single_step:
            query = query.unsqueeze(1)  # (B, D_h) -> (B, 1, D_h)
        beta = torch.sigmoid(self.f_beta(query)) if self.f_beta is not None else None  # (B, N, 1)
        extras: dict[str, Tensor] = {}
        if self.mode == "soft" or not self.training:
            context, alpha = attend_with_weights(
                query,
                key,
                key,
                score="additive",
                return_weights=return_attn,
                **self._score_kwargs(),
            )
        else:
            context, alpha, extras = self._hard(query, key, use_expectation)
        out = context if beta is None else beta * context
        if single_step:
            out = out.squeeze(1)  # (B, 1, D) -> (B, D)
        if not return_attn:
            return out
        assert alpha is not None
        maps = {"alpha": alpha, **({"beta": beta} if beta is not None else {}), **extras}
        if single_step:
            maps = {k: v.squeeze(1) for k, v in maps.items()}
        return out, maps

    def _hard(
        self, query: Tensor, key: Tensor, use_expectation: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One stochastic pass: sample s_t ~ alpha_t, or use alpha_t for the images so chosen."""
        batch, n_q, n_loc = query.shape[0], query.shape[1], key.shape[1]
        alpha = attention_weights(query, key, score="additive", **self._score_kwargs())  # (B, N, L)
        if use_expectation is None:
            use_expectation = torch.rand(batch, device=query.device) < self.expectation_prob
        check_mask(use_expectation, "use_expectation", (batch,), device=query.device)
        if use_expectation.dtype != torch.bool or use_expectation.shape != (batch,):
            raise ValueError(
                f"use_expectation: expected a (B,) = ({batch},) bool tensor, got "
                f"{use_expectation.dtype} of shape {tuple(use_expectation.shape)}"
            )
        if batch * n_q > 0:
            # one draw per (image, step) from its own distribution: (B N, L) -> (B N, 1) -> (B, N)
            # a NaN input makes alpha NaN, which multinomial rejects: draw from a finite stand-in
            # (the NaN still reaches the context below)
            probs = alpha.detach().float().nan_to_num(nan=1.0, posinf=1.0)
            location = torch.multinomial(probs.reshape(batch * n_q, n_loc), 1)
            location = location.reshape(batch, n_q)
        else:
            location = torch.zeros(batch, n_q, dtype=torch.long, device=query.device)
        one_hot = F.one_hot(location, n_loc).to(alpha.dtype)  # (B, N, L)
        expect = use_expectation.view(batch, 1, 1)
        # sampled images get no gradient through the choice itself (REINFORCE supplies it)
        sample_weights = torch.where(expect, alpha, one_hot)
        # (B, N, L) @ (B, L, D) -> (B, N, D)
        context = sample_weights.to(key.dtype) @ key
        # a sampled one-hot hides a NaN alpha: 0 * sum(alpha) is 0, or NaN where alpha is
        context = context + 0.0 * alpha.sum(dim=-1, keepdim=True).to(context.dtype)
        log_alpha = torch.log(alpha.clamp_min(torch.finfo(alpha.dtype).tiny))
        log_prob = log_alpha.gather(-1, location.unsqueeze(-1)).squeeze(-1)  # (B, N)
        log_prob = log_prob.masked_fill(use_expectation.view(batch, 1), 0.0)
        entropy = -(alpha * log_alpha).sum(dim=-1)  # (B, N)
        return context, alpha, {"location": location, "log_prob": log_prob, "entropy": entropy}


def doubly_stochastic_penalty(
    alpha: Tensor,
    weight: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    variant: str = "paper",
) -> Tensor:
    """The doubly stochastic regulariser ``lambda * sum_i (1 - sum_t alpha_ti)^2`` (eq. 14).

    The sum inside runs over TIME for each location i (over locations it is 1 by construction
    of the softmax, so a penalty written that way is always zero): it pushes every image
    location to receive a total attention of about one over the caption.

    Args:
        alpha: the attention weights of a caption, (B, T, L).
        weight: lambda (paper: 1 for the soft model).
        mask: (B, T) bool, True at real (not padded) caption steps; padded steps add nothing.
        reduction: over the batch, ``"mean"`` (default), ``"sum"`` or ``"none"`` (shape (B,)).
        variant: ``"paper"`` (per image, summed over locations) or ``"official"``: the arctic-captions
            code sums over the BATCH and averages over locations, ignoring the caption mask:
            ``lambda * mean_i sum_b (1 - sum_t alpha_bti)^2`` (a scalar, whatever ``reduction``).

    Returns:
        The penalty: a scalar, or (B,) with ``reduction="none"``.
    """
    check_input(alpha, "alpha", "B T L")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    check_variant(variant)
    if variant == "official":
        # NOTE: deviates from the paper on purpose, as the official code: sum over the batch,
        # mean over the locations, every step counted
        return weight * (1.0 - alpha.sum(dim=1)).square().sum(dim=0).mean()
    if mask is not None:
        check_mask(mask, "mask", alpha.shape[:2])
        alpha = alpha * mask.to(alpha.dtype).unsqueeze(-1)  # (B, T) -> (B, T, 1)
    per_image = weight * (1.0 - alpha.sum(dim=1)).square().sum(dim=-1)  # (B, T, L) -> (B, L) -> (B,)
    if reduction == "none":
        return per_image
    return per_image.mean() if reduction == "mean" else per_image.sum()


class MovingAverageBaseline(nn.Module):
    """The REINFORCE baseline ``b_k = momentum * b_{k-1} + (1 - momentum) * log p(y | s~_k, a)``.

    Section 4.1: an exponential moving average (momentum 0.9) of the mini-batches' mean caption
    log-likelihood. It is a buffer (saved with the model, moved by ``.to()``), starting at 0 as
    in the official code. :meth:`update` is called once per mini-batch, after the loss is formed
    with the previous value.

    Shape:
        - log_likelihood: (B,), log p(y | s~, a) of each caption under its sampled locations.
    """

    value: Tensor

    def __init__(
        self,
        momentum: float = 0.9,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected a value in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("value", torch.zeros((), device=device, dtype=dtype or torch.float32))

    @torch.no_grad()
    def update(self, log_likelihood: Tensor) -> Tensor:
        """Fold a mini-batch's mean log-likelihood in; returns the new value."""
        mean = log_likelihood.detach().to(self.value.dtype).mean()
        self.value.mul_(self.momentum).add_((1.0 - self.momentum) * mean)
        return self.value

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


def hard_attention_loss(
    log_likelihood: Tensor,
    log_prob: Tensor,
    entropy: Tensor,
    baseline: Tensor | float,
    *,
    lambda_r: float = 1.0,
    lambda_e: float = 0.01,
    mask: Tensor | None = None,
) -> Tensor:
    """A loss whose gradient is minus the hard-attention learning rule of equation (12).

    ``dL_s/dW ~ 1/N sum_n [ dlog p(y|s~_n,a)/dW + lambda_r (log p(y|s~_n,a) - b) dlog p(s~_n|a)/dW
    + lambda_e dH[s~_n]/dW ]``, so the returned surrogate is
    ``-mean_n [ log p(y|s~_n) + lambda_r sg(log p(y|s~_n) - b) log p(s~_n) + lambda_e H[s~_n] ]``
    (``sg`` = stop-gradient). Its value is not a likelihood; minimise it.

    Args:
        log_likelihood: (B,), log p(y | s~, a) of each caption (summed over its words), with
            gradient.
        log_prob: (B, T), log p(s~_t | a) of the sampled locations (``attn["log_prob"]``); zero
            where an image used the expectation.
        entropy: (B, T), H(alpha_t) (``attn["entropy"]``): the entropy bonus.
        baseline: b, the moving average of past log-likelihoods (:class:`MovingAverageBaseline`).
        lambda_r: weight of the REINFORCE term (the paper gives no value; the official code
            uses 1/10).
        lambda_e: weight of the entropy bonus (the paper gives no value; the official code's
            ``alpha_entropy_c`` defaults to 0).
        mask: (B, T) bool, True at real (not padded) caption steps.
    """
    check_input(log_prob, "log_prob", "B T")
    check_input(
        entropy,
        "entropy",
        "B T",
        B=log_prob.shape[0],
        T=log_prob.shape[1],
        dtype=log_prob.dtype,
        dtype_source="log_prob",
    )
    check_input(
        log_likelihood,
        "log_likelihood",
        "B",
        B=log_prob.shape[0],
        dtype=entropy.dtype,
        dtype_source="entropy",
    )
    if mask is not None:
        check_mask(mask, "mask", log_prob.shape)
        keep = mask.to(log_prob.dtype)
        log_prob, entropy = log_prob * keep, entropy * keep
    advantage = (log_likelihood.detach() - baseline).to(log_prob.dtype)  # (B,)
    objective = log_likelihood + lambda_r * advantage * log_prob.sum(-1) + lambda_e * entropy.sum(-1)
    return -objective.mean()
