"""An attentional RNN encoder-decoder: RNNsearch (Bahdanau) and Luong's global/local models.

- Bahdanau, Cho and Bengio 2014, "Neural Machine Translation by Jointly Learning to Align and
  Translate", https://arxiv.org/abs/1409.0473: a bidirectional GRU encoder; the decoder state
  ``s_i = f(s_{i-1}, y_{i-1}, c_i)`` where ``c_i`` attends with the PREVIOUS state ``s_{i-1}``;
  ``s_0 = tanh(W_s h<-_1)``; a maxout deep output ``p(y_i) = g(y_{i-1}, s_i, c_i)``.
- Luong, Pham and Manning 2015, "Effective Approaches to Attention-based Neural Machine
  Translation", https://arxiv.org/abs/1508.04025: an LSTM encoder whose final state starts the
  decoder; ``h_t = f(h_{t-1}, [y_{t-1}; h~_{t-1}])`` (input feeding), attention with the CURRENT
  state ``h_t``, ``h~_t = tanh(W_c [c_t; h_t])``, ``p(y_t) = softmax(W_s h~_t)``.

Example:
    >>> model = Seq2Seq(20, 20, hidden=32, attention="luong", score="general")
    >>> src = torch.randint(3, 20, (2, 7)); tgt_in = torch.randint(3, 20, (2, 5))
    >>> logits, attn = model(src, None, tgt_in)
    >>> logits.shape, attn.shape
    (torch.Size([2, 5, 20]), torch.Size([2, 5, 7]))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from attnzoo._checks import check_mask, check_positive
from attnzoo.sequence.bahdanau import BahdanauAttention
from attnzoo.sequence.luong import LOCAL_MODES, LuongAttention, LuongLocalAttention

__all__ = ["ATTENTIONS", "Seq2Seq"]

#: The attention a decoder can use.
ATTENTIONS: tuple[str, ...] = ("bahdanau", "luong", "luong_local")

#: A recurrent state: the hidden state of a GRU, or (hidden, cell) of an LSTM, each (L, B, H).
State = Tensor | tuple[Tensor, Tensor]


def _check_tokens(tokens: object, name: str, batch: int | None = None) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer token ids (int64), not float or bool, got {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D tensor (B, L) of token ids, got shape {tuple(tokens.shape)}"
        )
    if batch is not None and tokens.shape[0] != batch:
        raise ValueError(
            f"{name}: expected batch B={batch}, got {tokens.shape[0]} (shape {tuple(tokens.shape)})"
        )
    if tokens.shape[1] == 0:
        raise ValueError(f"{name}: the length dimension is empty, shape {tuple(tokens.shape)}")
    return tokens


class Seq2Seq(nn.Module):
    """RNN encoder-decoder with Bahdanau, Luong global or Luong local attention.

    ``attention="bahdanau"`` (RNNsearch): encoder annotations ``h_j = [fwd_j; bwd_j]``; the decoder
    starts from ``s_0 = tanh(W_s h<-_1)`` (the backward state at the first word) and at step i
    attends with the previous state, ``c_i = Attn(s_{i-1}, h)``, then updates
    ``s_i = RNN([E y_{i-1}; c_i], s_{i-1})`` and predicts from the maxout deep output
    ``t_i = maxout(U_o s_i + V_o E y_{i-1} + C_o c_i)``, ``logits = W_o t_i``.

    ``attention="luong"`` / ``"luong_local"``: the decoder starts from the encoder's final state,
    updates ``h_t = RNN([E y_{t-1}; h~_{t-1}], h_{t-1})`` (input feeding, ``h~_0 = 0``; without it
    the input is ``E y_{t-1}`` alone and teacher forcing runs the RNN and the attention over all
    steps at once), attends with the current state, ``h~_t = tanh(W_c [c_t; h_t])``, and predicts
    ``logits = W_s h~_t``. Local attention uses the decoder step t (local-m: p_t = t).

    Args:
        src_vocab, tgt_vocab: vocabulary sizes.
        hidden: the decoder state width n, and the encoder's per direction.
        attention: ``"bahdanau"``, ``"luong"`` or ``"luong_local"``.
        score: Luong's score: ``"dot"`` (default for ``luong``), ``"general"`` (default for
            ``luong_local``), ``"concat"`` or ``"location"`` (global only; needs
            ``max_source_len``). Bahdanau's score is additive; leave None.
        local_mode: ``"local-p"`` (default) or ``"local-m"``, for ``luong_local``.
        window: D, the local window half-width (paper: 10).
        cell: ``"gru"`` or ``"lstm"`` (default: the paper's, GRU for Bahdanau, LSTM for Luong).
        bidirectional: a bidirectional encoder (default: the paper's, yes for Bahdanau, no for
            Luong). The annotations are then 2n wide; ``score="dot"`` needs them n wide.
        num_layers: stacked layers in encoder and decoder (attention on the top layer).
        embed_dim: word embedding width (default ``hidden``).
        attn_dim: the hidden width of Bahdanau's MLP / Luong's concat score (default ``hidden``).
        input_feeding: Luong's input feeding (default True).
        maxout_dim: Bahdanau's deep output, the number of maxout units l (default ``hidden // 2``,
            as the paper's l = 500 for n = 1000).
        max_source_len: rows of the ``location`` score.
        attention_init: Bahdanau's alignment model init: ``"paper"`` (v_a = 0, uniform attention at
            the start) or ``"xavier"`` (learns alignments faster on small problems).
        dropout: dropout on embeddings and on the state that feeds the output layer.
        padding_idx: the padding token of both vocabularies (its embedding stays zero).

    Shape:
        - src: (B, S) int64 token ids; src_mask: (B, S) bool, True at real tokens, right padded
          (None: no padding); tgt_in: (B, T), the target shifted right (it starts with BOS).
        - output of ``forward``: logits (B, T, tgt_vocab) and the attention weights (B, T, S).
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        hidden: int = 256,
        *,
        attention: str = "bahdanau",
        score: str | None = None,
        local_mode: str = "local-p",
        window: int = 10,
        cell: str | None = None,
        bidirectional: bool | None = None,
        num_layers: int = 1,
        embed_dim: int | None = None,
        attn_dim: int | None = None,
        input_feeding: bool = True,
        maxout_dim: int | None = None,
        max_source_len: int | None = None,
        attention_init: str = "paper",
        dropout: float = 0.0,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
        bahdanau = attention == "bahdanau"
        if bahdanau and score not in (None, "additive"):
            raise ValueError(f"score: Bahdanau attention is additive; expected None, got {score!r}")
        if local_mode not in LOCAL_MODES:
            raise ValueError(f"local_mode: expected one of {LOCAL_MODES}, got {local_mode!r}")
        cell = cell or ("gru" if bahdanau else "lstm")
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell: expected 'gru' or 'lstm', got {cell!r}")
        bidirectional = bahdanau if bidirectional is None else bidirectional
        if (
            not bahdanau
            and bidirectional
            and (score or ("dot" if attention == "luong" else "general")) == "dot"
        ):
            raise ValueError(
                "score: 'dot' compares h_t (n wide) with the 2n-wide annotations of a bidirectional "
                "encoder; use score='general' or 'concat', or bidirectional=False"
            )
        check_positive(src_vocab=src_vocab, tgt_vocab=tgt_vocab, hidden=hidden, num_layers=num_layers)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.attention_type, self.cell, self.hidden = attention, cell, hidden
        self.bidirectional, self.num_layers = bidirectional, num_layers
        self.input_feeding = input_feeding and not bahdanau
        self.num_directions = 2 if bidirectional else 1
        embed_dim = embed_dim or hidden
        annot_dim = hidden * self.num_directions
        self.annot_dim = annot_dim
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        layer_dropout = dropout if num_layers > 1 else 0.0

        self.src_embed = nn.Embedding(src_vocab, embed_dim, padding_idx=padding_idx, **factory)
        self.tgt_embed = nn.Embedding(tgt_vocab, embed_dim, padding_idx=padding_idx, **factory)
        self.encoder = rnn(
            embed_dim,
            hidden,
            num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=layer_dropout,
            **factory,
        )
        self.dropout = nn.Dropout(dropout)

        # the decoder's initial state: Bahdanau, s_0 = tanh(W_s h<-_1) (no bias in the paper);
        # Luong, the encoder's final state as is (a unidirectional encoder of the same width),
        # otherwise tanh(W [fwd_final; bwd_final] + b)
        bridge_in = hidden if bahdanau else annot_dim
        self.bridge_h: nn.Linear | None = None
        self.bridge_c: nn.Linear | None = None
        if bahdanau or bidirectional:
            self.bridge_h = nn.Linear(bridge_in, hidden, bias=not bahdanau, **factory)
            if cell == "lstm":
                self.bridge_c = nn.Linear(bridge_in, hidden, bias=not bahdanau, **factory)

        self.attention: nn.Module
        if bahdanau:
            self.attention = BahdanauAttention(hidden, annot_dim, attn_dim, init=attention_init, **factory)
            dec_in = embed_dim + annot_dim
            self.maxout_dim = maxout_dim or max(1, hidden // 2)
            # t~_i = U_o s_i + V_o E y_{i-1} + C_o c_i, one Linear over the concatenation
            self.readout = nn.Linear(hidden + embed_dim + annot_dim, 2 * self.maxout_dim, **factory)
            self.generator = nn.Linear(self.maxout_dim, tgt_vocab, **factory)  # W_o
        else:
            if attention == "luong":
                self.attention = LuongAttention(
                    hidden,
                    annot_dim,
                    score=score or "dot",
                    attn_dim=attn_dim,
                    max_source_len=max_source_len,
                    **factory,
                )
            else:
                self.attention = LuongLocalAttention(
                    hidden,
                    annot_dim,
                    score=score or "general",
                    mode=local_mode,
                    window=window,
                    attn_dim=attn_dim,
                    **factory,
                )
            dec_in = embed_dim + (hidden if self.input_feeding else 0)
            self.readout = None
            self.generator = nn.Linear(hidden, tgt_vocab, **factory)  # W_s
        self.decoder = rnn(dec_in, hidden, num_layers, batch_first=True, dropout=layer_dropout, **factory)

    def extra_repr(self) -> str:
        return (
            f"attention={self.attention_type!r}, cell={self.cell!r}, hidden={self.hidden}, "
            f"bidirectional={self.bidirectional}, num_layers={self.num_layers}, "
            f"input_feeding={self.input_feeding}"
        )

    # ------------------------------------------------------------------------------- encoder

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> tuple[Tensor, State]:
        """Annotations (B, S, annot_dim) and the decoder's initial state.

        Padded positions are skipped by packing, so the backward direction starts at each
        sentence's last real word and the final states are those of the real words.
        """
        src = _check_tokens(src, "src")
        batch, length = src.shape
        embedded = self.dropout(self.src_embed(src))  # (B, S) -> (B, S, E)
        if src_mask is None:
            annotations, final = self.encoder(embedded)
        else:
            lengths = self._check_src_mask(src_mask, batch, length)
            packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
            packed_out, final = self.encoder(packed)
            annotations, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=length)
        return annotations, self._initial_state(final, batch)

    @staticmethod
    def _check_src_mask(src_mask: Tensor, batch: int, length: int) -> Tensor:
        check_mask(src_mask, "src_mask", (batch, length))
        if src_mask.dtype != torch.bool or tuple(src_mask.shape) != (batch, length):
            raise TypeError(
                f"src_mask: expected a ({batch}, {length}) bool mask (True = real token), got "
                f"{src_mask.dtype} of shape {tuple(src_mask.shape)}"
            )
        lengths = src_mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError(
                "src_mask: every source sentence needs at least one real token, got an empty one"
            )
        prefix = torch.arange(length, device=src_mask.device) < lengths.unsqueeze(1)
        if not bool((prefix == src_mask).all()):
            raise ValueError("src_mask: expected right padding (True for a prefix of each row, then False)")
        return lengths

    def _initial_state(self, final: State, batch: int) -> State:
        layers, dirs, hidden = self.num_layers, self.num_directions, self.hidden

        def start(states: Tensor, bridge: nn.Linear | None, squash: bool) -> Tensor:
            per_dir = states.view(layers, dirs, batch, hidden)  # (L dirs, B, H) -> (L, dirs, B, H)
            if self.attention_type == "bahdanau":
                source = per_dir[:, -1]  # the backward direction's state at the first word
            else:
                # (L, dirs, B, H) -> (L, B, dirs H): [fwd_final; bwd_final]
                source = per_dir.permute(0, 2, 1, 3).reshape(layers, batch, dirs * hidden)
            if bridge is None:
                return source.contiguous()
            out = bridge(source)
            return torch.tanh(out) if squash else out

        if isinstance(final, tuple):
            h, c = final
            return start(h, self.bridge_h, True), start(c, self.bridge_c, False)
        return start(final, self.bridge_h, True)

    # ------------------------------------------------------------------------------- decoder

    @staticmethod
    def _top(state: State) -> Tensor:
        """The top layer's hidden state (B, H): the query of the attention."""
        return (state[0] if isinstance(state, tuple) else state)[-1]

    def _bahdanau_step(
        self, embedded: Tensor, state: State, annotations: Tensor, src_mask: Tensor | None
    ) -> tuple[Tensor, State, Tensor]:
        # the query is the PREVIOUS state s_{i-1}: c_i must exist before s_i can be computed
        context, weights = self.attention(self._top(state), annotations, key_mask=src_mask, return_attn=True)
        rnn_in = torch.cat([embedded, context], dim=-1).unsqueeze(1)  # (B, E + D_k) -> (B, 1, E + D_k)
        out, state = self.decoder(rnn_in, state)
        s_i = out[:, 0]  # (B, 1, H) -> (B, H)
        assert self.readout is not None
        t_tilde = self.readout(self.dropout(torch.cat([s_i, embedded, context], dim=-1)))  # (B, 2l)
        t_i = t_tilde.view(t_tilde.shape[0], self.maxout_dim, 2).amax(dim=-1)  # maxout: (B, l, 2) -> (B, l)
        return self.generator(t_i), state, weights

    def _luong_step(
        self,
        embedded: Tensor,
        state: State,
        feed: Tensor,
        annotations: Tensor,
        src_mask: Tensor | None,
        step: int,
    ) -> tuple[Tensor, State, Tensor, Tensor]:
        rnn_in = torch.cat([embedded, feed], dim=-1) if self.input_feeding else embedded
        out, state = self.decoder(rnn_in.unsqueeze(1), state)  # (B, 1, H)
        kwargs = {"step": step} if self.attention_type == "luong_local" else {}
        # the query is the CURRENT state h_t
        attentional, weights = self.attention(
            out[:, 0], annotations, key_mask=src_mask, return_attn=True, **kwargs
        )
        return self.generator(self.dropout(attentional)), state, attentional, weights

    def forward(self, src: Tensor, src_mask: Tensor | None, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: the logits of every target step and the attention weights.

        Args:
            src: (B, S) source token ids.
            src_mask: (B, S) bool, True at real tokens (right padding), or None.
            tgt_in: (B, T) target input ids (BOS, y_1, ..., y_{T-1}).

        Returns:
            ``(logits, attn)``: (B, T, tgt_vocab) and (B, T, S).
        """
        src = _check_tokens(src, "src")
        tgt_in = _check_tokens(tgt_in, "tgt_in", src.shape[0])
        annotations, state = self.encode(src, src_mask)
        embedded = self.dropout(self.tgt_embed(tgt_in))  # (B, T) -> (B, T, E)
        steps = tgt_in.shape[1]
        if self.attention_type != "bahdanau" and not self.input_feeding:
            # without input feeding nothing feeds back: run the RNN and the attention over every
            # step at once, with the queries h_1 .. h_T
            out, _ = self.decoder(embedded, state)  # (B, T, H)
            kwargs = {"step": 0} if self.attention_type == "luong_local" else {}
            attentional, weights = self.attention(
                out, annotations, key_mask=src_mask, return_attn=True, **kwargs
            )
            return self.generator(self.dropout(attentional)), weights.to(annotations.dtype)
        logits, maps = [], []
        feed = embedded.new_zeros(src.shape[0], self.hidden)  # h~_0 = 0
        for t in range(steps):  # the recurrence over decoder time is inherent
            if self.attention_type == "bahdanau":
                step_logits, state, weights = self._bahdanau_step(
                    embedded[:, t], state, annotations, src_mask
                )
            else:
                step_logits, state, feed, weights = self._luong_step(
                    embedded[:, t], state, feed, annotations, src_mask, t
                )
            logits.append(step_logits)
            maps.append(weights)
        # T x (B, V) -> (B, T, V); T x (B, S) -> (B, T, S)
        return torch.stack(logits, dim=1), torch.stack(maps, dim=1).to(annotations.dtype)

    @torch.no_grad()
    def greedy_decode(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        max_len: int = 50,
        bos: int = 1,
        eos: int = 2,
    ) -> tuple[Tensor, Tensor]:
        """Greedy decoding: at each step feed back the most likely token.

        Stops when every sentence has produced ``eos`` or after ``max_len`` tokens; after its
        ``eos`` a sentence is padded with ``eos`` and zero attention.

        Returns:
            ``(tokens, attn)``: (B, L) int64 without the BOS, L <= max_len, and (B, L, S).
        """
        src = _check_tokens(src, "src")
        check_positive(max_len=max_len)
        batch = src.shape[0]
        annotations, state = self.encode(src, src_mask)
        token = torch.full((batch,), bos, dtype=torch.long, device=src.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
        feed = annotations.new_zeros(batch, self.hidden)
        tokens, maps = [], []
        for t in range(max_len):
            embedded = self.tgt_embed(token)  # (B,) -> (B, E)
            if self.attention_type == "bahdanau":
                step_logits, state, weights = self._bahdanau_step(embedded, state, annotations, src_mask)
            else:
                step_logits, state, feed, weights = self._luong_step(
                    embedded, state, feed, annotations, src_mask, t
                )
            token = step_logits.argmax(dim=-1).masked_fill(finished, eos)
            tokens.append(token)
            maps.append(weights.masked_fill(finished.unsqueeze(-1), 0.0).to(annotations.dtype))
            finished = finished | (token == eos)
            if bool(finished.all()):
                break
        return torch.stack(tokens, dim=1), torch.stack(maps, dim=1)
