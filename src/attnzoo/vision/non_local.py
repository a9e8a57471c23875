"""Non-local block (1D, 2D and 3D space-time), with the paper's four pairwise functions.

Wang, Girshick, Gupta and He 2018, "Non-local Neural Networks", https://arxiv.org/abs/1711.07971.
Official code: facebookresearch/video-nonlocal-net (Caffe2); mmcv's ``NonLocal1d/2d/3d``.

None of the four pairwise functions materialises the N x N matrix unless the maps are requested:

- embedded Gaussian and Gaussian are a softmax over keys: the fused attention kernel.
- dot product: ``(theta phi^T / N) g = theta (phi^T g) / N`` by associativity, O(N C'^2).
- concatenation: ``f_ij = ReLU(w^T [theta_i; phi_j]) = ReLU(a_i + b_j)`` with scalars
  ``a_i = w_theta . theta_i`` and ``b_j = w_phi . phi_j``; so
  ``sum_j f_ij g_j = a_i * sum_{j: b_j > -a_i} g_j + sum_{j: b_j > -a_i} b_j g_j``, two prefix sums
  over the keys sorted by b: exact, O(N log N) time and O(N C') memory. A ``concat_project``
  with hooks (pruning, adapters) or replaced by another module is called on every pair instead,
  as the official code does: its hooks run, at O(N^2 C') memory.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.attend import attend_with_weights
from attnzoo.functional.softmax import compute_dtype
from attnzoo.layers import NormLayer, plain_layer, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._spatial import (
    SPATIAL_LAYOUTS,
    check_poolable,
    max_pool_tokens,
    subsample_kernel,
    to_tokens,
)
from attnzoo.vision._token_norm import apply_token_norm, create_token_norm, zero_init_last_norm

__all__ = ["PAIRWISE_FUNCTIONS", "NonLocalBlock", "relu_pair_sum"]

Pairwise = Literal["embedded_gaussian", "gaussian", "dot_product", "concatenation"]
PAIRWISE_FUNCTIONS: tuple[str, ...] = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


def relu_pair_sum(a: Tensor, b: Tensor, values: Tensor) -> Tensor:
    """``out_i = sum_j ReLU(a_i + b_j) v_j`` exactly, without the N_q x N_k matrix.

    ``ReLU(a_i + b_j) = (a_i + b_j) [-b_j < a_i]``: put the keys at -b_j and the queries at a_i on
    one line; the keys that count for query i are exactly those left of it. One sort of that line
    and running sums of v_j and b_j v_j give ``out_i = a_i sum_{left} v_j + sum_{left} b_j v_j``.
    Ties (-b_j = a_i) contribute ReLU(0) = 0 on either side. Time O(M log M + M D), memory
    O(M D) with M = N_q + N_k; sums run in float32 for half-precision inputs. Built from sort,
    gather, cumsum and scatter only, so it exports to ONNX.

    Args:
        a: (B, N_q) per-query scalars.
        b: (B, N_k) per-key scalars.
        values: (B, N_k, D).

    Returns:
        (B, N_q, D) in float32 for half-precision ``values``, else in their dtype.
    """
    # sums over all N positions overflow float16 and lose bfloat16's 8 bits: accumulate in float32
    dtype = compute_dtype(values.dtype)
    a, b, values = a.to(dtype), b.to(dtype), values.to(dtype)
    batch, n_k, width = values.shape
    n_q = a.shape[1]
    line = torch.cat([-b, a], dim=1)  # (B, N_k + N_q): keys first, then queries
    order = torch.argsort(line, dim=1)  # (B, M)
    # queries carry nothing, so a running sum read at a query is the sum over the keys left of it
    blank = values.new_zeros(batch, n_q, 2 * width)
    payload = torch.cat([torch.cat([values, b.unsqueeze(-1) * values], dim=-1), blank], dim=1)  # (B, M, 2D)
    index = order.unsqueeze(-1).expand(batch, n_k + n_q, 2 * width)  # (B, M) -> (B, M, 2D)
    running = torch.gather(payload, 1, index).cumsum(dim=1)  # along the sorted line
    unsorted = torch.zeros_like(running).scatter(1, index, running)  # back to the input order
    left_v, left_bv = unsorted[:, n_k:].split(width, dim=-1)  # (B, N_q, D) each
    return a.unsqueeze(-1) * left_v + left_bv


@register(
    "non_local",
    placement="stage",
    map_kind="pairwise",
    linear_memory=True,
    family="non_local",
    paper=Paper("Non-local Neural Networks", "1711.07971"),
    equation="y_i = (1/C(x)) sum_j f(x_i, x_j) g(x_j); z_i = BN(W_z y_i) + x_i; default embedded "
    "Gaussian f = exp(theta(x_i)^T phi(x_j)), C(x) = sum_j f (a softmax over j); theta, phi, g to C/2",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B N^2 C) for the Gaussian forms, O(B N C^2) for dot_product, O(B N (C + log N)) "
    "for concatenation; memory O(B N C) without maps (fused kernel / associativity / sorting), "
    "O(B N^2) with return_attn",
    notes="official options: use_scale=True (embedded-Gaussian logits / sqrt(C'), mmcv's and the "
    "video code's default), sub_sample=True (max-pool phi and g), norm_layer=None (zero-init W_z "
    "instead of BN, mmcv's default). Key bias dropped where the softmax makes it a no-op.",
    samples=(
        *(Sample(f"pairwise={f}", {"pairwise": f}) for f in ("gaussian", "dot_product", "concatenation")),
        *(
            Sample(f"pairwise={f},sub_sample", {"pairwise": f, "sub_sample": True})
            for f in ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
        ),
        Sample(
            "norm_layer=GroupNorm",
            {"norm_layer": lambda s: functools.partial(nn.GroupNorm, 2)},
            description="GroupNorm on the output (trains with a batch of one)",
        ),
        Sample("norm_layer=None", {"norm_layer": None}, description="no norm; W_z zero-initialised"),
    ),
)
class NonLocalBlock(nn.Module):
    """Non-local block: every position attends to every position, residual added.

    ``y_i = (1 / C(x)) sum_j f(x_i, x_j) g(x_j)`` (paper eq. 1), ``z_i = W_z y_i + x_i``
    (eq. 6) with ``g(x_j) = W_g x_j`` and W_z followed by BatchNorm whose scale is
    zero-initialised, so the block starts as the identity. Pairwise functions (section 3.2):

    ======================= ======================================= =====================
    ``pairwise``            f(x_i, x_j)                             C(x)
    ======================= ======================================= =====================
    ``embedded_gaussian``   exp(theta(x_i)^T phi(x_j))              sum_j f (softmax)
    ``gaussian``            exp(x_i^T x_j)                          sum_j f (softmax)
    ``dot_product``         theta(x_i)^T phi(x_j)                   N
    ``concatenation``       ReLU(w_f^T [theta(x_i); phi(x_j)])      N
    ======================= ======================================= =====================

    theta, phi, g are 1x1 (x 1) convolutions to C' = C/2 channels, written here as ``Linear``
    layers on the (B, N, C) tokens (the same map; any number of spatial dims). With
    ``sub_sample``, phi and g are max-pooled (2, 2x2, or 1x2x2 for video) and the sums run over
    the N' pooled positions: ``y_i = (1 / C(x^)) sum_j f(x_i, x^_j) g(x^_j)``, so N above is N'.

    Args:
        channels: C.
        rd_ratio: C' / C (paper: 1/2).
        rd_channels: C' directly, overriding ``rd_ratio``.
        pairwise: one of :data:`PAIRWISE_FUNCTIONS` (paper default: embedded Gaussian).
        sub_sample: max-pool phi and g (the paper's sub-sampling trick); every spatial dim must be
            at least the window.
        use_scale: divide the embedded-Gaussian logits by sqrt(C'). NOTE: not in the paper; the
            official code (video-nonlocal-net ``USE_SCALE``, mmcv ``use_scale=True``) does it.
        norm_layer: the normalisation after W_z, a vision ``norm_layer`` called as
            ``norm_layer(C)`` on (B, C, H, W) maps: here the (B, C, N) tokens of every input rank
            viewed as (B, C, 1, N). Default ``nn.BatchNorm2d``: over (B, N) per channel it has
            exactly the statistics of the paper's BatchNorm1d/2d/3d on the input, for sequences,
            images and video alike, and the state_dict keys of earlier releases (their
            BatchNorm1d), whose checkpoints load. E.g. ``functools.partial(nn.GroupNorm, 32)``,
            ``nn.SyncBatchNorm``; a norm that rejects 4-D maps (``nn.BatchNorm1d``,
            ``nn.LayerNorm``) is refused with a clear error. Its weight, when it has one, is
            zero-initialised (the paper's init: the block starts as the identity). None: no
            norm, W_z with a bias and itself zero-initialised (mmcv's default ``norm_cfg=None,
            zero_init=True``).

    Shape:
        - x: (B, C, L), (B, C, H, W) or (B, C, T, H, W); output: the same.
        - attention (``return_attn``): the normalised pairwise weights f / C(x), (B, N, N')
          with N = prod(spatial) (and N' the pooled count with ``sub_sample``).

    Example:
        >>> block = NonLocalBlock(64)
        >>> x = torch.randn(2, 64, 8, 8, 8)  # a (T, H, W) clip
        >>> block(x).shape
        torch.Size([2, 64, 8, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 2,
        rd_channels: int | None = None,
        *,
        pairwise: Pairwise = "embedded_gaussian",
        sub_sample: bool = False,
        use_scale: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        if pairwise not in PAIRWISE_FUNCTIONS:
            raise ValueError(f"pairwise: expected one of {PAIRWISE_FUNCTIONS}, got {pairwise!r}")
        if use_scale and pairwise != "embedded_gaussian":
            raise ValueError(
                f"use_scale: scales embedded-Gaussian logits only, expected False with "
                f"pairwise={pairwise!r}, got True"
            )
        self.channels, self.pairwise = channels, pairwise
        self.sub_sample, self.use_scale = sub_sample, use_scale
        self.inner = reduced_width(channels, rd_ratio, rd_channels)
        factory = {"device": device, "dtype": dtype}
        embedded = pairwise != "gaussian"
        # theta_i . bias_phi is the same for every key j: a softmax over j cancels it, so the
        # embedded Gaussian's phi has no bias (it would get an exactly zero gradient).
        self.theta = nn.Linear(channels, self.inner, **factory) if embedded else None
        self.phi = (
            nn.Linear(channels, self.inner, bias=pairwise != "embedded_gaussian", **factory)
            if embedded
            else None
        )
        self.g = nn.Linear(channels, self.inner, **factory)
        # w_f of the concatenation form: [theta_i; phi_j] (2C') -> a scalar, no bias (paper 3.2)
        self.concat_project = (
            nn.Linear(2 * self.inner, 1, bias=False, **factory) if pairwise == "concatenation" else None
        )
        # a bias before the norm is cancelled (BN: by the batch mean) or redundant with its own
        # shift: W_z has one only without a norm
        self.w_z = nn.Linear(self.inner, channels, bias=norm_layer is None, **factory)
        self.norm = create_token_norm(norm_layer, channels, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: theta, phi, g, W_z ~ N(0, 0.01); the norm's scale 0 (paper) or W_z = 0."""
        for layer in (self.theta, self.phi, self.g, self.w_z):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        if self.concat_project is not None:
            self.concat_project.reset_parameters()
        # z = norm(W_z y) = 0 at init: the block is the identity
        zero_init_last_norm(self.norm, self.w_z)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner={self.inner}, pairwise={self.pairwise!r}, "
            f"sub_sample={self.sub_sample}, use_scale={self.use_scale}"
        )

    def _aggregate(
        self, query: Tensor, key: Tensor, value: Tensor, return_attn: bool
    ) -> tuple[Tensor, Tensor | None]:
        """y = (1/C(x)) sum_j f(q_i, k_j) v_j on (B, N, D) tokens; the maps only when asked."""
        n_keys = key.shape[1]
        if self.pairwise in ("embedded_gaussian", "gaussian"):
            scale = query.shape[-1] ** -0.5 if self.use_scale else 1.0
            return attend_with_weights(
                query, key, value, score="dot", scale=scale, return_weights=return_attn
            )

        dtype = compute_dtype(value.dtype)
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        if self.pairwise == "dot_product":
            if return_attn:
                maps = (q @ k.transpose(1, 2)) / n_keys  # (B, N, N')
                return (maps @ v).to(value.dtype), maps
            # (theta phi^T / N) g = theta (phi^T g) / N: a C' x C' matrix instead of N x N'
            context = (k.transpose(1, 2) @ v) / n_keys  # (B, C', N') @ (B, N', C') -> (B, C', C')
            return (q @ context).to(value.dtype), None

        assert self.concat_project is not None
        if plain_layer(self.concat_project, nn.Linear):
            w = self.concat_project.weight.to(dtype)  # (1, 2C'): [w_theta, w_phi]
            bias = self.concat_project.bias  # None as built; a replacement Linear may have one
            bias = None if bias is None else bias.to(dtype)
            a = F.linear(q, w[:, : self.inner], bias).squeeze(-1)  # (B, N, 1) -> (B, N)
            b = F.linear(k, w[:, self.inner :]).squeeze(-1)  # (B, N', 1) -> (B, N')
            if not return_attn:
                return (relu_pair_sum(a, b, v) / n_keys).to(value.dtype), None
            # (B, N, 1) + (B, 1, N') -> (B, N, N'): every pair, only when the maps are asked for
            scores = a.unsqueeze(-1) + b.unsqueeze(-2)
        else:
            # hooks (pruning, weight norm, adapters, taps) or a replaced layer: call it on the pairs
            scores = self._concatenation_scores_by_module(query, key).to(dtype)  # (B, N, N')
        maps = torch.relu(scores) / n_keys
        return (maps @ v).to(value.dtype), (maps if return_attn else None)

    def _concatenation_scores_by_module(self, query: Tensor, key: Tensor) -> Tensor:
        """``w^T [theta_i; phi_j]`` for every pair, by calling ``concat_project`` on the pairs.

        The fallback for a ``concat_project`` that is not a plain ``nn.Linear``: its hooks run
        (``torch.nn.utils.prune`` recomputes the weight from ``weight_orig * mask`` in a pre-hook,
        which the fast path's read of ``.weight`` would skip). It forms the pairs as the official
        code does, a (B, N, N', 2C') tensor: quadratic memory, acceptable only on this fallback.
        The layer runs in its parameters' dtype (the inputs'; it may not accept float32 inputs in
        half precision), and the caller casts the scores up for the ReLU, 1/N and sum over keys.

        Args:
            query: (B, N, C') theta.
            key: (B, N', C') phi (pooled with ``sub_sample``).

        Returns:
            (B, N, N') the scores before the ReLU, in the layer's output dtype.
        """
        n_queries, n_keys = query.shape[1], key.shape[1]
        pairs = torch.cat(
            [
                query.unsqueeze(2).expand(-1, -1, n_keys, -1),  # (B, N, C') -> (B, N, N', C'): theta_i
                key.unsqueeze(1).expand(-1, n_queries, -1, -1),  # (B, N', C') -> (B, N, N', C'): phi_j
            ],
            dim=-1,
        )  # (B, N, N', 2C'): [theta_i; phi_j]
        assert self.concat_project is not None
        return self.concat_project(pairs).squeeze(-1)  # (B, N, N', 1) -> (B, N, N')

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", SPATIAL_LAYOUTS, C=self.channels, dtype=parameter_dtype(self))
        spatial = x.shape[2:]
        kernel = subsample_kernel(len(spatial))
        if self.sub_sample:
            check_poolable(x, "x", kernel)
        tokens = to_tokens(x)  # (B, C, *S) -> (B, N, C), contiguous
        if self.theta is not None and self.phi is not None:
            query, key = self.theta(tokens), self.phi(tokens)  # (B, N, C')
        else:
            query, key = tokens, tokens  # Gaussian: f compares the inputs themselves
        value = self.g(tokens)  # (B, N, C')
        if self.sub_sample:
            key = max_pool_tokens(key, spatial, kernel)  # (B, N', D)
            value = max_pool_tokens(value, spatial, kernel)  # (B, N', C')
        y, maps = self._aggregate(query, key, value, return_attn)
        z = apply_token_norm(self.norm, self.w_z(y).transpose(1, 2))  # (B, N, C) -> (B, C, N)
        out = x + z.unflatten(2, spatial)  # (B, C, N) -> (B, C, *S)
        if maps is None:
            return out
        return out, maps
