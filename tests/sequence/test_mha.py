"""mha: against torch.nn.MultiheadAttention with the same weights, a float64 einsum reference,
incremental decoding, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.sequence.mha import KVCache, MultiheadAttention

B, NQ, NK, E, H = 3, 5, 7, 16, 4


def torch_pair(kdim=None, vdim=None, bias=True):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(
        E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, dtype=torch.float64
    )
    with torch.no_grad():  # torch zero-inits its biases: make them count
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return theirs, MultiheadAttention.from_torch(theirs)


def inputs(kdim=E, vdim=E, n_k=NK, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NQ, E, generator=g, dtype=torch.float64)
    k = torch.randn(B, n_k, kdim, generator=g, dtype=torch.float64)
    v = torch.randn(B, n_k, vdim, generator=g, dtype=torch.float64)
    return q, k, v


def test_registered_and_created_by_name():
    assert isinstance(attnzoo.create("mha", 64, 8), MultiheadAttention)
    assert attnzoo.get_spec("mha").paper.arxiv == "1706.03762"


def mask_cases():
    g = torch.Generator().manual_seed(5)
    padded = torch.zeros(B, NK, dtype=torch.bool)  # torch polarity: True = ignore
    padded[0, -3:] = True
    padded[2, -1] = True
    blocked = torch.rand(NQ, NK, generator=g) > 0.7
    blocked[:, 0] = False  # no fully blocked row: torch returns NaN there, we return zeros
    additive = torch.randn(NQ, NK, generator=g, dtype=torch.float64)
    per_head = torch.rand(B * H, NQ, NK, generator=g) > 0.7
    per_head[..., 0] = False
    causal = torch.ones(NQ, NK, dtype=torch.bool).triu(1)
    # (torch kwargs, our kwargs)
    return {
        "none": ({}, {}),
        "key_padding": ({"key_padding_mask": padded}, {"key_mask": ~padded}),
        "bool_2d": ({"attn_mask": blocked}, {"attn_mask": ~blocked}),
        "additive_2d": ({"attn_mask": additive}, {"attn_mask": additive}),
        "bool_per_head": ({"attn_mask": per_head}, {"attn_mask": ~per_head.view(B, H, NQ, NK)}),
        "causal": ({"attn_mask": causal, "is_causal": True}, {"causal": True}),
        "causal_and_padding": (
            {"attn_mask": causal, "key_padding_mask": padded},
            {"causal": True, "key_mask": ~padded},
        ),
        "additive_and_padding": (
            {"attn_mask": additive, "key_padding_mask": padded},
            {"attn_mask": additive, "key_mask": ~padded},
        ),
    }


@pytest.mark.parametrize("case", list(mask_cases()))
@pytest.mark.parametrize("return_attn", [False, True])
def test_matches_torch_multihead_attention_under_every_mask(case, return_attn):
    theirs, ours = torch_pair()
    q, k, v = inputs()
    their_kwargs, our_kwargs = mask_cases()[case]
    if case.startswith("causal"):
        q, k, v = inputs(n_k=NQ)  # causal self-attention: equal lengths
        k, v = q, q
        their_kwargs = dict(their_kwargs)
        their_kwargs["attn_mask"] = their_kwargs["attn_mask"][:, :NQ]
        if "key_padding_mask" in their_kwargs:
            their_kwargs["key_padding_mask"] = their_kwargs["key_padding_mask"][:, :NQ]
            our_kwargs = {**our_kwargs, "key_mask": our_kwargs["key_mask"][:, :NQ]}
    expected, expected_maps = theirs(q, k, v, need_weights=True, average_attn_weights=False, **their_kwargs)
    result = ours(q, k, v, return_attn=return_attn, average_heads=False, **our_kwargs)
    out = result[0] if return_attn else result
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if return_attn:
        torch.testing.assert_close(result[1], expected_maps, rtol=1e-10, atol=1e-10)


def test_cross_attention_with_other_widths_matches_torch():
    theirs, ours = torch_pair(kdim=6, vdim=10)
    q, k, v = inputs(kdim=6, vdim=10)
    expected, maps = theirs(q, k, v)  # head-averaged maps by default
    out, our_maps = ours(q, k, v, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(our_maps, maps, rtol=1e-10, atol=1e-10)
    assert our_maps.shape == (B, NQ, NK)


def test_no_bias_loads_from_torch():
    theirs, ours = torch_pair(bias=False)
    q, k, v = inputs()
    torch.testing.assert_close(ours(q, k, v), theirs(q, k, v)[0], rtol=1e-10, atol=1e-10)
    assert ours.q_proj.bias is None


def test_einsum_reference_from_the_paper():
    torch.manual_seed(2)
    ours = MultiheadAttention(E, H, dtype=torch.float64)
    q, k, v = inputs()
    d = E // H
    # W_i^Q etc. as (h, d_head, E): head i owns rows i*d .. (i+1)*d of each projection
    wq, wk, wv = (p.weight.view(H, d, -1) for p in (ours.q_proj, ours.k_proj, ours.v_proj))
    wo = ours.out_proj.weight
    bq, bk, bv = (p.bias.view(H, d) for p in (ours.q_proj, ours.k_proj, ours.v_proj))
    # head_i = softmax(Q W_i^Q (K W_i^K)^T / sqrt(d_k)) V W_i^V; scale by the HEAD width
    qh = torch.einsum("bnd,hkd->bhnk", q, wq) + bq[None, :, None]
    kh = torch.einsum("bnd,hkd->bhnk", k, wk) + bk[None, :, None]
    vh = torch.einsum("bnd,hkd->bhnk", v, wv) + bv[None, :, None]
    a = torch.softmax(torch.einsum("bhik,bhjk->bhij", qh, kh) / math.sqrt(d), dim=-1)
    heads = torch.einsum("bhij,bhjk->bihk", a, vh).reshape(B, NQ, E)
    expected = heads @ wo.T + ours.out_proj.bias
    torch.testing.assert_close(ours(q, k, v), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunks", [[1] * 6, [2, 1, 3], [6]])
def test_kv_cache_steps_equal_the_full_causal_pass(chunks):
    torch.manual_seed(3)
    ours = MultiheadAttention(E, H, dtype=torch.float64).eval()
    x = torch.randn(2, sum(chunks), E, dtype=torch.float64)
    full = ours(x, causal=True)
    cache = KVCache()
    steps, start = [], 0
    for size in chunks:
        steps.append(ours(x[:, start : start + size], causal=True, cache=cache))
        start += size
    assert len(cache) == sum(chunks)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


def test_kv_cache_is_self_attention_only():
    ours = MultiheadAttention(E, H)
    x = torch.randn(1, 2, E)
    with pytest.raises(ValueError, match="cache"):
        ours(x, x, cache=KVCache())


def test_fully_masked_query_gives_zeros_not_nan():
    ours = MultiheadAttention(E, H, bias=False)
    x = torch.randn(2, 4, E)
    key_mask = torch.tensor([[True] * 4, [False] * 4])
    for return_attn in (False, True):
        result = ours(x, key_mask=key_mask, return_attn=return_attn)
        out = result[0] if return_attn else result
        assert torch.isfinite(out).all()
        assert torch.equal(out[1], torch.zeros(4, E))  # no bias: zero context -> zero output


def test_dropout_only_in_training():
    ours = MultiheadAttention(E, H, dropout=0.5, out_dropout=0.5)
    x = torch.randn(2, 5, E)
    ours.eval()
    torch.testing.assert_close(ours(x), ours(x))
    ours.train()
    torch.manual_seed(0)
    a = ours(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, ours(x))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="num_heads: expected a divisor of embed_dim=16, got 3"):
        MultiheadAttention(16, 3)
    ours = MultiheadAttention(E, H)
    x = torch.randn(2, 5, E)
    with pytest.raises(ValueError, match=f"query: expected D={E}"):
        ours(torch.randn(2, 5, E + 1))
    with pytest.raises(ValueError, match="3-D tensor"):
        ours(x[0])
    with pytest.raises(TypeError, match="floating-point"):
        ours(x.long())
    with pytest.raises(ValueError, match="key_mask: shape"):
        ours(x, key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_mask: expected a .* bool mask"):
        ours(x, key_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="attn_mask: shape"):
        ours(x, attn_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key: expected B=2"):
        ours(x, torch.randn(3, 5, E))
    with pytest.raises(ValueError, match="empty"):
        ours(x[:, :0])


def test_bfloat16_close_to_float32():
    torch.manual_seed(4)
    ours = MultiheadAttention(64, 8)
    x = torch.randn(2, 32, 64)
    reference = ours(x, causal=True)
    low = ours.to(torch.bfloat16)(x.bfloat16(), causal=True)
    assert low.dtype == torch.bfloat16
    assert ((low.float() - reference).norm() / reference.norm()) < 2e-2


@pytest.mark.parametrize("mask_kind", ["key_mask", "additive_per_head"])
def test_onnx_export_with_batch_masks_and_dynamic_batch(mask_kind):
    ort = pytest.importorskip("onnxruntime")
    import warnings

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = MultiheadAttention(32, 4)

        def forward(self, x, key_mask):
            if mask_kind == "key_mask":
                return self.mha(x, key_mask=key_mask, causal=True)
            # a float (B, h, N, N) mask built inside the model from a batch-sized input
            bias = torch.zeros(x.shape[0], 4, x.shape[1], x.shape[1]).masked_fill(
                ~key_mask[:, None, None, :], float("-inf")
            )
            return self.mha(x, attn_mask=bias)

    model = Wrapped().eval()
    x, key_mask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool)
    key_mask[1, 4:] = False
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (x, key_mask), dynamo=True, dynamic_shapes=({0: batch}, {0: batch})
        )
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x3, mask3 = torch.randn(3, 6, 32), torch.ones(3, 6, dtype=torch.bool)
    mask3[2, 3:] = False
    result = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x3, mask3))})[0]
    torch.testing.assert_close(torch.from_numpy(result), model(x3, mask3), rtol=1e-4, atol=1e-4)
