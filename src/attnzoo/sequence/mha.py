"""Multi-head attention.

Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762 (section 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from attnzoo._checks import check_positive
from attnzoo.functional.attend import attend_heads, attend_with_weights, causal_mask
from attnzoo.functional.heads import (
    check_heads,
    combine_masks,
    merge_masks_for_heads,
    pad_mask,
    project_heads,
    project_shared_input,
    resolve_key_value,
    split_heads,
)
from attnzoo.layers import call_layer
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

__all__ = ["KVCache", "MultiheadAttention"]


@dataclass
class KVCache:
    """Projected keys and values of the tokens seen so far, for incremental decoding.

    Pass the same (initially empty) cache to every step; each call appends its new keys and
    values. ``key`` and ``value`` are (B, H, T, D/H).
    """

    key: Tensor | None = None
    value: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Add (B, H, T_new, d) keys and values; return everything so far."""
        if self.key is None or self.value is None:
            self.key, self.value = key, value
        else:
            # (B, H, T, d) ++ (B, H, T_new, d) along the time axis
            self.key = torch.cat([self.key, key], dim=-2)
            self.value = torch.cat([self.value, value], dim=-2)
        return self.key, self.value


@register(
    "mha",
    map_kind="pairwise",
    linear_memory=True,
    family="sequence",
    paper=Paper("Attention Is All You Need", "1706.03762"),
    equation="MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, "
    "head_i = softmax(Q W_i^Q (K W_i^K)^T / sqrt(d_k)) V W_i^V, d_k = d_model / h",
    make_kwargs=lambda s: {"embed_dim": s.width, "num_heads": 4},
    make_inputs=sequence_input,
    supports_mask=True,
    channel_dim=-1,
    cost="time O(N_q N_k d + (N_q + N_k) d^2); memory O((N_q + N_k) d) without maps "
    "(fused kernel), O(h N_q N_k) with return_attn",
    samples=(
        key_mask_sample(thorough=True),
        attn_mask_sample("attn_mask_3d"),
        attn_mask_sample("attn_mask_4d", heads=4),
        Sample("causal", forward_kwargs=causal, description="causal self-attention"),
        Sample("cross", inputs=cross_inputs, description="cross-attention to a longer memory"),
        key_mask_sample("cross_key_mask", key_input=1, self_attention=False, inputs=cross_inputs),
    ),
)
class MultiheadAttention(nn.Module):
    """Multi-head scaled dot-product attention, self or cross; every option of torch's.

    ``head_i = softmax(Q W_i^Q (K W_i^K)^T / sqrt(d_head) + M) V W_i^V`` and
    ``out = Concat(head_1, ..., head_h) W^O``, with ``d_head = embed_dim / num_heads`` (the scale
    is per head, not sqrt(d_model)). Without ``return_attn`` the heads run through the fused
    kernel and the (N_q x N_k) maps are never formed.

    ``torch.nn.MultiheadAttention``'s options are all here (``add_bias_kv``, ``add_zero_attn``,
    ``batch_first=False``, unbatched inputs, its (B*h, N_q, N_k) mask layout, additive key
    padding), with attnzoo's conventions as defaults: batch-first, and bool masks True = may
    attend (torch: True = masked). :meth:`from_torch` converts a torch module, and a torch
    ``state_dict`` loads directly (``in_proj_weight`` is split into ``q_proj``/``k_proj``/``v_proj``).

    Args:
        embed_dim: model width d (queries and output).
        num_heads: h; must divide ``embed_dim``. Paper base model: d = 512, h = 8.
        kdim, vdim: widths of keys and values for cross attention (default ``embed_dim``).
        bias: biases in the four projections.
        add_bias_kv: append one learned key ``bias_k`` and value ``bias_v`` (in the projected
            space, (embed_dim,) each) to every sequence's keys and values (torch's option).
        add_zero_attn: append one all-zero key and value per head, after ``bias_k`` (torch's
            option): a logit of 0 that every query can put weight on.
        batch_first: inputs and output are (B, N, D); False: (N, B, D), sequence first.
        dropout: dropout on the attention weights (training only).
        out_dropout: dropout on the output (training only).

    Shape:
        - query: (B, N_q, embed_dim); key: (B, N_k, kdim) (default: the query, self-attention);
          value: (B, N_k, vdim) (default: the key). (N, B, D) each with ``batch_first=False``;
          (N, D) each for one unbatched sequence.
        - key_mask: (B, N_k) (unbatched: (N_k,)), bool True at real (not padded) keys (note: the
          opposite polarity of torch's ``key_padding_mask``), or float, added to the logits.
        - attn_mask: bool (True = may attend) or additive float, of shape (N_q, N_k),
          (B, N_q, N_k), (B*h, N_q, N_k) (torch's layout, items outer) or (B, h, N_q, N_k);
          unbatched: (N_q, N_k) or (h, N_q, N_k).
        - output: the query's layout with embed_dim features; maps: (B, N_q, N_k') averaged over
          heads, or (B, h, N_q, N_k') with ``average_heads=False`` (no B when unbatched), where
          N_k' = N_k plus one column each for ``add_bias_kv`` and ``add_zero_attn``.

    Example:
        >>> mha = MultiheadAttention(64, 4)
        >>> x = torch.randn(2, 10, 64)
        >>> y, maps = mha(x, causal=True, return_attn=True)
        >>> y.shape, maps.shape
        (torch.Size([2, 10, 64]), torch.Size([2, 10, 10]))
    """

    bias_k: nn.Parameter | None
    bias_v: nn.Parameter | None

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = check_heads(embed_dim, num_heads)
        if not 0.0 <= dropout < 1.0 or not 0.0 <= out_dropout < 1.0:
            raise ValueError(f"dropout: expected probabilities in [0, 1), got {dropout}, {out_dropout}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        check_positive(kdim=kdim, vdim=vdim)  # before `or`: 0 is no default
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_dropout = nn.Dropout(out_dropout)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(embed_dim, **factory))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        for extra in (self.bias_k, self.bias_v):
            if extra is not None:
                # torch's init: Xavier-normal of a (1, 1, E) tensor, std = sqrt(2 / (E + E))
                nn.init.normal_(extra, std=extra.shape[0] ** -0.5)

    def extra_repr(self) -> str:
        options = [
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}"
        ]
        if self.bias_k is not None:
            options.append("add_bias_kv=True")
        if self.add_zero_attn:
            options.append("add_zero_attn=True")
        if not self.batch_first:
            options.append("batch_first=False")
        return ", ".join(options)

    # -- torch compatibility ----------------------------------------------------------------------

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, **kwargs: Any) -> MultiheadAttention:
        """Build an equivalent module with the weights of a ``torch.nn.MultiheadAttention``.

        Every torch configuration converts: packed or separate projections, ``bias``,
        ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim``, ``batch_first`` (kept, so that
        torch's inputs work unchanged), dropout and the training flag. Given torch's inputs, it
        returns torch's outputs and weights once bool masks are inverted (True = may attend here;
        float masks are the same). ``kwargs`` go to the constructor (``out_dropout``, or
        :class:`GatedMultiheadAttention`'s options when called on that class).
        """
        weight = module.out_proj.weight
        ours = cls(
            module.embed_dim,
            module.num_heads,
            kdim=module.kdim,
            vdim=module.vdim,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            batch_first=module.batch_first,
            dropout=module.dropout,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        # not strict: a subclass may add parameters of its own (gated_mha's log_alpha)
        result = ours.load_state_dict(module.state_dict(), strict=False)
        ours_alone = ("q_proj.", "k_proj.", "v_proj.", "out_proj.", "bias_k", "bias_v")
        missing = [name for name in result.missing_keys if name.startswith(ours_alone)]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"module: its state_dict does not map onto {cls.__name__}: missing {missing}, "
                f"unexpected {result.unexpected_keys}"
            )
        return ours.train(module.training)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a torch.nn.MultiheadAttention state_dict: rename its keys to ours before the usual load
        _from_torch_keys(self, state_dict, prefix, error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- forward ----------------------------------------------------------------------------------

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
        average_heads: bool = True,
        cache: KVCache | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` to ``key``/``value`` (self-attention when they are None).

        With ``cache``, the call is one step of incremental self-attention: the new tokens'
        keys and values are appended to the cache and the queries attend to everything cached
        (with ``causal=True``, each new token sees the past and itself, exactly as in the full
        causal pass).
        """
        if cache is not None and key is not None:
            raise ValueError("cache: incremental decoding is self-attention; pass key=None")
        if key is None and value is None and self._well_formed(query):
            key = value = query  # self-attention on an input that passes every check below
        else:
            layouts = ("B N D", "N D") if self.batch_first else ("N B D", "N D")
            key, value = resolve_key_value(
                query,
                key,
                value,
                embed_dim=self.embed_dim,
                kdim=self.kdim,
                vdim=self.vdim,
                layouts=layouts,
                dtype=self.out_proj.weight.dtype,
            )
        unbatched = query.dim() == 2
        self_attention = key is query and value is query  # kept through the re-layouts below
        if unbatched:
            # (N, D) -> (1, N, D); masks: (N_k,) -> (1, N_k) and (h, N_q, N_k) reads as (B*h, ...)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if isinstance(key_mask, Tensor) and key_mask.dim() == 1:
                key_mask = key_mask.unsqueeze(0)
        elif not self.batch_first:
            # (N, B, D) -> (B, N, D): views; the projections read them in place
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if self_attention:
            key = value = query
        result = self._attend_heads(
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
        out, maps = result if isinstance(result, tuple) else (result, None)
        if unbatched:
            out = out.squeeze(0)  # (1, N_q, E) -> (N_q, E)
            maps = maps.squeeze(0) if maps is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (B, N_q, E) -> (N_q, B, E)
        return out if maps is None else (out, maps)

    def _well_formed(self, query: object) -> bool:
        """Whether ``query`` is a batch-first (B, N, E) tensor with N > 0 in the parameters' dtype:
        one that passes every check of :func:`resolve_key_value` as query, key and value. A few
        comparisons instead of the general check (about 10 us, which shows in small calls); any
        other input goes through that check and its messages."""
        return (
            self.batch_first
            and isinstance(query, Tensor)
            and query.dim() == 3
            and query.shape[1] != 0
            and query.shape[2] == self.embed_dim
            and query.dtype == self.out_proj.weight.dtype
        )

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
        """The computation on checked batch-first (B, N, D) inputs: project, attend, merge."""
        batch, n_q, h = query.shape[0], query.shape[1], self.num_heads
        if key is query and value is query and cache is None:
            # self-attention: one GEMM of the stacked W^Q, W^K, W^V; three (B, h, N, d) views. Not
            # with a cache, which would keep the queries alive through its views of k and v.
            q, k, v = project_shared_input(query, (self.q_proj, self.k_proj, self.v_proj), h)
        else:
            q = split_heads(self.q_proj(query), h)  # (B, N_q, E) -> (B, h, N_q, d)
            k = split_heads(self.k_proj(key), h)  # (B, h, N_k_new, d)
            v = split_heads(self.v_proj(value), h)  # (B, h, N_k_new, d)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, h, N_k, d) with N_k = cached + new
        n_k = k.shape[-2]
        dropout_p = self.dropout if self.training else 0.0
        plain = attn_mask is None and key_mask is None and self.bias_k is None and not self.add_zero_attn
        if plain and not return_attn and (n_q == n_k or not causal) and not isinstance(q, fx.Proxy):
            # the common call (no mask, no extra keys, no maps): q, k, v are right by construction,
            # so none of attend's checks and re-layouts (a third of a small call's time)
            heads = attend_heads(q, k, v, causal=causal, dropout_p=dropout_p)
            del q, k, v
            return project_heads(self.scale_heads(heads), self._output)
        mask = merge_masks_for_heads(
            attn_mask,
            key_mask,
            batch=batch,
            n_q=n_q,
            n_k=n_k,
            num_heads=h,
            device=query.device,
            additive_key_mask=True,
        )
        q, k, v, mask, causal, dummies = self._append_extra_keys(q, k, v, mask, causal, return_attn)
        heads, maps = attend_with_weights(
            q,
            k,
            v,
            mask=mask,
            causal=causal,
            dropout_p=dropout_p,
            return_weights=return_attn,
        )
        # q, k, v are dead: free them before the heads are merged and projected (peak memory)
        del q, k, v
        if dummies:
            heads = heads[:, :, dummies:]  # (B, h, extra + N_q, d) -> (B, h, N_q, d)
        heads = self.scale_heads(heads)
        return project_heads(heads, self._output, maps, average_heads=average_heads)

    def _output(self, merged: Tensor) -> Tensor:
        """W^O and the output dropout, on the merged heads (B, N_q, h*d)."""
        out = call_layer(self.out_proj, merged)
        # not even called where it is the identity: one operator less per call
        return self.out_dropout(out) if self.training and self.out_dropout.p > 0 else out

    def scale_heads(self, heads: Tensor) -> Tensor:
        """Hook on the heads' outputs (B, h, N_q, d) before they are merged; identity here
        (:class:`~attnzoo.sequence.gated_mha.GatedMultiheadAttention` multiplies by its gates)."""
        return heads

    def _append_extra_keys(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, return_attn: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool, int]:
        """Add ``bias_k``/``bias_v`` and the zero key/value, which every query may attend to.

        They go after the real keys, as in torch (the maps' last columns), with mask columns that
        allow them. Causal self-attention without another mask stays on the fused causal kernel
        instead: the extra keys go in front, behind as many zero queries (dropped from the
        output), so that row ``extra + i`` of the square causal pattern sees the extra keys and
        the real keys ``0..i``, and no (N_q, N_k) mask is built.

        Returns:
            q, k, v, mask, causal, and how many leading output rows to drop.
        """
        batch, h, n_k, d = k.shape
        n_q = q.shape[-2]
        extra_k, extra_v = [], []
        if self.bias_k is not None and self.bias_v is not None:
            # (E,) -> (1, h, 1, d) -> (B, h, 1, d): head i owns entries i*d .. (i+1)*d - 1
            extra_k.append(self.bias_k.view(1, h, 1, d).expand(batch, h, 1, d).to(k.dtype))
            extra_v.append(self.bias_v.view(1, h, 1, d).expand(batch, h, 1, d).to(v.dtype))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros(batch, h, 1, d))
            extra_v.append(v.new_zeros(batch, h, 1, v.shape[-1]))
        extra = len(extra_k)
        if not extra:
            return q, k, v, mask, causal, 0
        if causal and mask is None and n_q == n_k and not return_attn:
            # (B, h, N, d) -> (B, h, extra + N, d) each, extra keys and zero queries in front
            k = torch.cat([*extra_k, k], dim=-2)
            v = torch.cat([*extra_v, v], dim=-2)
            q = torch.cat([q.new_zeros(batch, h, extra, d), q], dim=-2)
            return q, k, v, None, True, extra
        k = torch.cat([k, *extra_k], dim=-2)  # (B, h, N_k + extra, d)
        v = torch.cat([v, *extra_v], dim=-2)
        if causal:
            # causality is over the real keys; the extra ones stay visible to every query
            mask = combine_masks(mask, causal_mask(n_q, n_k, device=k.device))
        if mask is not None:
            mask = pad_mask(mask, extra)
        return q, k, v, mask, False, 0


def _from_torch_keys(
    module: MultiheadAttention, state_dict: dict[str, Any], prefix: str, errors: list[str]
) -> None:
    """Rename a ``torch.nn.MultiheadAttention`` state_dict's entries to ours, in place.

    ``in_proj_weight`` (3E, E) and ``in_proj_bias`` (3E,) are split into ``q_proj``, ``k_proj``
    and ``v_proj``; ``q_proj_weight`` etc. (torch's layout for other kdim/vdim) become
    ``q_proj.weight`` etc.; ``bias_k``/``bias_v`` (1, 1, E) become (E,). What has no counterpart
    in ``module`` is reported in ``errors`` (load_state_dict raises with every message).
    """
    e = module.embed_dim
    packed_weight = state_dict.pop(prefix + "in_proj_weight", None)
    if packed_weight is not None:
        if packed_weight.dim() != 2 or packed_weight.shape[0] != 3 * e:
            errors.append(
                f"in_proj_weight: expected torch's packed (3 * embed_dim, embed_dim) = ({3 * e}, {e}) "
                f"matrix, got {tuple(packed_weight.shape)}"
            )
        else:
            # torch packs W_q, W_k, W_v as rows of one (3E, E) matrix
            for name, w in zip("qkv", packed_weight.split(e, dim=0)):
                state_dict[f"{prefix}{name}_proj.weight"] = w
    for name in "qkv":
        separate = state_dict.pop(f"{prefix}{name}_proj_weight", None)
        if separate is not None:
            state_dict[f"{prefix}{name}_proj.weight"] = separate
    packed_bias = state_dict.pop(prefix + "in_proj_bias", None)
    if packed_bias is not None:
        if module.q_proj.bias is None:
            errors.append(
                "in_proj_bias: the state_dict has projection biases, but this module was built with "
                "bias=False; build it with bias=True (or use MultiheadAttention.from_torch)"
            )
        elif packed_bias.shape != (3 * e,):
            errors.append(f"in_proj_bias: expected shape ({3 * e},), got {tuple(packed_bias.shape)}")
        else:
            for name, b in zip("qkv", packed_bias.split(e)):
                state_dict[f"{prefix}{name}_proj.bias"] = b
    for name in ("bias_k", "bias_v"):
        extra = state_dict.get(prefix + name)
        if extra is None:
            continue
        if getattr(module, name) is None:
            state_dict.pop(prefix + name)
            errors.append(
                f"{name}: the state_dict comes from a module with add_bias_kv=True, but this one was "
                "built without; build it with add_bias_kv=True (or use MultiheadAttention.from_torch)"
            )
        elif extra.dim() == 3:
            state_dict[prefix + name] = extra.reshape(-1)  # torch's (1, 1, E) -> (E,)
