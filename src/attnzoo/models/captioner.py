"""A Show, Attend and Tell captioning decoder over precomputed annotation vectors.

Xu et al. 2015, "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention",
https://arxiv.org/abs/1502.03044 (section 3.1.2, equations 1-7; training in sections 4.1, 4.2.1).

The CNN is not part of the model: it takes the annotation vectors ``a = {a_1, ..., a_L}`` (the
paper's 14 x 14 x 512 conv5_4 map of VGG, as (B, L, D) or (B, D, H, W)), so any backbone fits.

Example:
    >>> model = ShowAttendTellCaptioner(vocab_size=30, feature_dim=16, hidden=32)
    >>> features = torch.randn(2, 16, 4, 4); captions_in = torch.randint(3, 30, (2, 6))
    >>> logits, attn = model(features, captions_in)
    >>> logits.shape, attn["alpha"].shape
    (torch.Size([2, 6, 30]), torch.Size([2, 6, 16]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive
from attnzoo.functional.softmax import compute_dtype
from attnzoo.sequence.show_attend_tell import (
    FEATURE_LAYOUTS,
    MovingAverageBaseline,
    ShowAttendTellAttention,
    doubly_stochastic_penalty,
    hard_attention_loss,
)

__all__ = ["ShowAttendTellCaptioner"]


def _check_captions(captions: object, name: str, batch: int) -> Tensor:
    if not isinstance(captions, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids, got {type(captions).__name__}")
    if captions.is_floating_point() or captions.is_complex() or captions.dtype == torch.bool:
        raise TypeError(
            f"{name}: expected integer token ids (int64), not float or bool, got {captions.dtype}"
        )
    if captions.dim() != 2 or captions.shape[0] != batch:
        raise ValueError(
            f"{name}: expected a (B={batch}, T) tensor of token ids, got shape {tuple(captions.shape)}"
        )
    if captions.shape[1] == 0:
        raise ValueError(f"{name}: the caption length T is empty, shape {tuple(captions.shape)}")
    return captions


class ShowAttendTellCaptioner(nn.Module):
    """An LSTM that attends over annotation vectors at every word (Show, Attend and Tell).

    - initial state (section 3.1.2): ``c_0 = tanh(f_init,c(mean_i a_i))``,
      ``h_0 = tanh(f_init,h(mean_i a_i))``;
    - at step t: ``z_t = phi(a, h_{t-1})`` by :class:`ShowAttendTellAttention` (soft: gated
      expectation; hard: a sampled location), then ``(h_t, c_t) = LSTM([E y_{t-1}; z_t], h_{t-1},
      c_{t-1})`` (eq. 1-3);
    - deep output (eq. 7): ``p(y_t) = softmax(L_o(E y_{t-1} + L_h h_t + L_z z_t))``.

    Training (:meth:`loss`): soft, ``-log p(y|a) + lambda sum_i (1 - sum_t alpha_ti)^2`` (eq. 14);
    hard, the REINFORCE rule of eq. 12 with a moving-average baseline and an entropy bonus.

    Args:
        vocab_size: K words.
        feature_dim: D, the annotation width (paper: 512).
        hidden: n, the LSTM width.
        embed_dim: m, the word embedding width (default ``hidden``).
        attn_dim: the attention MLP width (default D).
        mode: ``"soft"`` (default) or ``"hard"``.
        gate: the attention gate beta (paper: yes).
        penalty: lambda of the doubly stochastic penalty (default 1 for soft, 0 for hard: the
            paper introduces it for the soft model).
        lambda_r, lambda_e: hard mode, the REINFORCE and entropy weights of eq. 12.
        dropout: dropout before the deep output.
        padding_idx: the padding token (its embedding stays zero; :meth:`loss` ignores it).

    Shape:
        - features: (B, L, D) or (B, D, H, W); captions_in: (B, T) token ids (BOS first).
        - output of ``forward``: logits (B, T, K) and a dict of maps: ``alpha`` (B, T, L),
          ``beta`` (B, T, 1) with the gate, and in hard-mode training ``location``, ``log_prob``
          and ``entropy`` (B, T).
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        hidden: int = 512,
        *,
        embed_dim: int | None = None,
        attn_dim: int | None = None,
        mode: str = "soft",
        gate: bool = True,
        penalty: float | None = None,
        lambda_r: float = 1.0,
        lambda_e: float = 0.01,
        dropout: float = 0.0,
        padding_idx: int | None = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(vocab_size=vocab_size, feature_dim=feature_dim, hidden=hidden)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        embed_dim = embed_dim or hidden
        self.vocab_size, self.feature_dim, self.hidden, self.mode = vocab_size, feature_dim, hidden, mode
        self.penalty = (1.0 if mode == "soft" else 0.0) if penalty is None else penalty
        self.lambda_r, self.lambda_e, self.padding_idx = lambda_r, lambda_e, padding_idx
        self.attention = ShowAttendTellAttention(
            hidden, feature_dim, attn_dim, mode=mode, gate=gate, **factory
        )
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx, **factory)  # E
        self.init_h = nn.Linear(feature_dim, hidden, **factory)  # f_init,h
        self.init_c = nn.Linear(feature_dim, hidden, **factory)  # f_init,c
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden, **factory)
        self.out_h = nn.Linear(hidden, embed_dim, **factory)  # L_h
        self.out_z = nn.Linear(feature_dim, embed_dim, bias=False, **factory)  # L_z
        self.out = nn.Linear(embed_dim, vocab_size, **factory)  # L_o
        self.dropout = nn.Dropout(dropout)
        self.baseline = MovingAverageBaseline(**factory) if mode == "hard" else None

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, feature_dim={self.feature_dim}, hidden={self.hidden}"

    def _annotations(self, features: Tensor) -> Tensor:
        check_input(features, "features", FEATURE_LAYOUTS, D=self.feature_dim)
        if features.dim() == 4:
            features = features.flatten(2).transpose(1, 2)  # (B, D, H, W) -> (B, HW, D)
        return features

    def initial_state(self, annotations: Tensor) -> tuple[Tensor, Tensor]:
        """``(h_0, c_0)`` from the mean annotation vector, each (B, n)."""
        mean = annotations.mean(dim=1)  # (B, L, D) -> (B, D)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def _step(
        self,
        embedded: Tensor,
        state: tuple[Tensor, Tensor],
        annotations: Tensor,
        use_expectation: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], dict[str, Tensor]]:
        kwargs = {"use_expectation": use_expectation} if use_expectation is not None else {}
        # the attention reads the PREVIOUS state h_{t-1}
        z, maps = self.attention(state[0], annotations, return_attn=True, **kwargs)
        h, c = self.cell(torch.cat([embedded, z], dim=-1), state)  # [E y_{t-1}; z_t] -> (B, n)
        logits = self.out(self.dropout(embedded + self.out_h(h) + self.out_z(z)))  # eq. 7
        return logits, (h, c), maps

    def forward(
        self, features: Tensor, captions_in: Tensor, *, use_expectation: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher forcing: logits (B, T, K) and the per-step maps (``alpha`` (B, T, L), ...).

        In hard mode and training, ``use_expectation`` (B,) bool picks the captions that use alpha
        rather than a sampled location (default: drawn once per caption with probability 0.5).
        """
        annotations = self._annotations(features)
        batch = annotations.shape[0]
        captions_in = _check_captions(captions_in, "captions_in", batch)
        if self.mode == "hard" and self.training and use_expectation is None:
            draw = torch.rand(batch, device=annotations.device)
            use_expectation = draw < self.attention.expectation_prob
        state = self.initial_state(annotations)
        embedded = self.embed(captions_in)  # (B, T) -> (B, T, m)
        logits, maps = [], []
        for t in range(captions_in.shape[1]):  # the recurrence over words is inherent
            step_logits, state, step_maps = self._step(embedded[:, t], state, annotations, use_expectation)
            logits.append(step_logits)
            maps.append(step_maps)
        # T x (B, ...) -> (B, T, ...)
        stacked = {key: torch.stack([m[key] for m in maps], dim=1) for key in maps[0]}
        return torch.stack(logits, dim=1), stacked

    def loss(self, features: Tensor, captions_in: Tensor, captions_out: Tensor) -> dict[str, Tensor]:
        """The training loss of the paper; call ``backward`` on ``["loss"]``.

        Soft: ``mean_b [-log p(y|a)] + lambda sum_i (1 - sum_t alpha_ti)^2`` (eq. 14, the caption
        log-likelihood summed over its words). Hard: :func:`hard_attention_loss` with the moving
        baseline, which this call then updates. Steps whose target is ``padding_idx`` count for
        nothing.

        Returns:
            ``{"loss", "nll" (mean caption NLL), "penalty"}`` (+ ``"baseline"`` in hard mode).
        """
        annotations = self._annotations(features)
        captions_out = _check_captions(captions_out, "captions_out", annotations.shape[0])
        logits, maps = self(annotations, captions_in)
        if captions_out.shape != captions_in.shape:
            raise ValueError(
                f"captions_out: expected the shape of captions_in {tuple(captions_in.shape)}, "
                f"got {tuple(captions_out.shape)}"
            )
        mask = (
            captions_out != self.padding_idx
            if self.padding_idx is not None
            else torch.ones_like(captions_out, dtype=torch.bool)
        )
        # a half-precision log-softmax loses the small probabilities
        logits = logits.to(compute_dtype(logits.dtype))
        # (B, T, K) -> (B, K, T) for cross_entropy; per word, then summed over each caption
        nll = F.cross_entropy(logits.transpose(1, 2), captions_out, reduction="none") * mask
        log_likelihood = -nll.sum(dim=1)  # (B,)
        penalty = (
            doubly_stochastic_penalty(maps["alpha"], self.penalty, mask=mask)
            if self.penalty > 0
            else log_likelihood.new_zeros(())
        )
        result = {"nll": -log_likelihood.mean(), "penalty": penalty}
        if self.mode == "hard" and self.training:
            assert self.baseline is not None
            loss = hard_attention_loss(
                log_likelihood,
                maps["log_prob"].to(log_likelihood.dtype),
                maps["entropy"].to(log_likelihood.dtype),
                self.baseline.value,
                lambda_r=self.lambda_r,
                lambda_e=self.lambda_e,
                mask=mask,
            )
            self.baseline.update(log_likelihood)
            result["baseline"] = self.baseline.value.clone()
        else:
            loss = -log_likelihood.mean()
        result["loss"] = loss + penalty
        return result

    @torch.no_grad()
    def greedy_decode(
        self, features: Tensor, max_len: int = 20, bos: int = 1, eos: int = 2
    ) -> tuple[Tensor, Tensor]:
        """Greedy captions (B, L <= max_len) without BOS, and their attention (B, L, L_loc).

        After its ``eos`` a caption is padded with ``eos`` and zero attention.
        """
        check_positive(max_len=max_len)
        annotations = self._annotations(features)
        batch = annotations.shape[0]
        state = self.initial_state(annotations)
        token = torch.full((batch,), bos, dtype=torch.long, device=annotations.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=annotations.device)
        tokens, alphas = [], []
        for _ in range(max_len):
            logits, state, maps = self._step(self.embed(token), state, annotations, None)
            token = logits.argmax(dim=-1).masked_fill(finished, eos)
            tokens.append(token)
            alphas.append(maps["alpha"].masked_fill(finished.unsqueeze(-1), 0.0))
            finished = finished | (token == eos)
            if bool(finished.all()):
                break
        return torch.stack(tokens, dim=1), torch.stack(alphas, dim=1)
