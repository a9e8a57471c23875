"""mha: against torch.nn.MultiheadAttention with the same weights, a float64 einsum reference,
incremental decoding, and bad input."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.sequence.mha import KVCache, MultiheadAttention
from attnzoo.testing import randomize_

B, NQ, NK, E, H = 3, 5, 7, 16, 4


def torch_pair(kdim=None, vdim=None, bias=True):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(
        E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, dtype=torch.float64
    )
    randomize_(theirs, scale=0.1, shift=True)  # torch zero-inits its biases: make them count
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
    # dtype, width, batch, empty and mask dtype/shape errors: the conformance suite, every sample;
    # here the forms only mha has (unbatched inputs, torch's (B*h, ...) masks)
    with pytest.raises(ValueError, match=r"3-D tensor \(B, N, D\) or 2-D tensor \(N, D\)"):
        ours(x[None])
    with pytest.raises(ValueError, match="key: expected a 2-D tensor"):
        ours(x[0], x)  # an unbatched query with batched keys
    with pytest.raises(TypeError, match=r"key_mask: expected a \(B, N_k\) bool .* or additive float mask"):
        ours(x, key_mask=torch.ones(5, dtype=torch.bool))  # (N_k,) is for unbatched inputs
    # (h, N_q, N_k) with B = 2: neither (B, ...) nor torch's (B*h, ...); the message lists both
    with pytest.raises(ValueError, match=r"attn_mask: expected .*\(B\*h, N_q, N_k\).* got shape \(4, 5, 5\)"):
        ours(x, attn_mask=torch.ones(H, 5, 5, dtype=torch.bool))


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


# -- issue 10: the documented (B, N_q, N_k) mask, masks on another device -----------------------


def einsum_reference(module, q, k, v, mask):
    """softmax(Q_i K_i^T / sqrt(d) + M) V_i W^O from the paper, M broadcast to (B, h, N_q, N_k)
    (bool True = may attend, or additive); float64, written without the module's code."""
    d = module.head_dim
    h = module.num_heads
    wq, wk, wv = (p.weight.view(h, d, -1) for p in (module.q_proj, module.k_proj, module.v_proj))
    bq, bk, bv = (p.bias.view(h, d) for p in (module.q_proj, module.k_proj, module.v_proj))
    qh = torch.einsum("bnd,hkd->bhnk", q, wq) + bq[None, :, None]
    kh = torch.einsum("bnd,hkd->bhnk", k, wk) + bk[None, :, None]
    vh = torch.einsum("bnd,hkd->bhnk", v, wv) + bv[None, :, None]
    logits = torch.einsum("bhik,bhjk->bhij", qh, kh) / math.sqrt(d)
    logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    a = torch.softmax(logits, dim=-1)
    heads = torch.einsum("bhij,bhjk->bihk", a, vh).reshape(q.shape[0], q.shape[1], -1)
    return heads @ module.out_proj.weight.T + module.out_proj.bias


def random_bool_mask(*shape, seed=7):
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[..., 0] = True  # every query keeps a key
    return mask


@pytest.mark.parametrize("module_cls", ["mha", "gated_mha"])
@pytest.mark.parametrize("batch", [1, 3, H])
@pytest.mark.parametrize("return_attn", [False, True])
def test_batch_mask_of_the_documented_shape_for_any_batch(module_cls, batch, return_attn):
    """(B, N_q, N_k) is the same mask for every head, whatever B is (B = 3 used to raise)."""
    torch.manual_seed(0)
    module = attnzoo.create(module_cls, E, H, dtype=torch.float64).eval()
    with torch.no_grad():
        for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            proj.bias.add_(0.1 * torch.randn_like(proj.bias))  # gated_mha's gates stay open
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, NQ, E, generator=g, dtype=torch.float64)
    kv = torch.randn(batch, NK, E, generator=g, dtype=torch.float64)
    mask = random_bool_mask(batch, NQ, NK)
    result = module(q, kv, attn_mask=mask, return_attn=return_attn)
    out = result[0] if return_attn else result
    expected = einsum_reference(module, q, kv, kv, mask[:, None])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_torch_head_mask_layout_equals_the_4d_mask():
    """(B*h, N_q, N_k), items outer as torch lays it out, means (B, h, N_q, N_k)."""
    torch.manual_seed(0)
    module = MultiheadAttention(E, H, dtype=torch.float64)
    q, k, v = inputs()
    additive = torch.randn(B, H, NQ, NK, dtype=torch.float64)
    expected = module(q, k, v, attn_mask=additive)
    torch.testing.assert_close(module(q, k, v, attn_mask=additive.reshape(B * H, NQ, NK)), expected)
    # and differs from the same numbers read head-outer (a transposed layout would pass otherwise)
    wrong = additive.transpose(0, 1).reshape(B * H, NQ, NK)
    assert not torch.allclose(module(q, k, v, attn_mask=wrong), expected)


@pytest.mark.parametrize("module_cls", ["mha", "gated_mha"])
@pytest.mark.parametrize("argument", ["attn_mask", "key_mask"])
def test_a_mask_on_another_device_is_an_error_naming_both(module_cls, argument):
    module = attnzoo.create(module_cls, E, H)
    x = torch.randn(2, 5, E)
    shape = (5, 5) if argument == "attn_mask" else (2, 5)
    mask = torch.ones(shape, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=f"{argument}: expected a tensor on cpu .* got one on meta"):
        module(x, **{argument: mask})


# -- issue 14: everything torch's MultiheadAttention has -------------------------------------------


def randomised_torch(seed=0, **kwargs):
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    return randomize_(theirs, seed=seed, scale=0.1, shift=True).eval()


@pytest.mark.parametrize("add_bias_kv", [False, True])
@pytest.mark.parametrize("add_zero_attn", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("return_attn", [False, True])
def test_torch_options_match_torch(add_bias_kv, add_zero_attn, batch_first, return_attn):
    theirs = randomised_torch(add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, batch_first=batch_first)
    ours = MultiheadAttention.from_torch(theirs)
    assert (ours.bias_k is not None, ours.add_zero_attn, ours.batch_first) == (
        add_bias_kv,
        add_zero_attn,
        batch_first,
    )
    q, k, v = inputs()
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (N, B, D)
    padded = torch.zeros(B, NK, dtype=torch.bool)
    padded[0, -3:] = True
    blocked = random_bool_mask(B * H, NQ, NK, seed=3)
    expected, expected_maps = theirs(q, k, v, key_padding_mask=padded, attn_mask=~blocked)
    result = ours(q, k, v, key_mask=~padded, attn_mask=blocked, return_attn=return_attn)
    out = result[0] if return_attn else result
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if return_attn:
        extra = add_bias_kv + add_zero_attn
        assert result[1].shape == (B, NQ, NK + extra)  # one column per extra key, as torch
        torch.testing.assert_close(result[1], expected_maps, rtol=1e-10, atol=1e-10)


def test_bias_kv_and_zero_attn_from_the_definition():
    """The extra keys, written out: K' = [K W^K; bias_k; 0], V' = [V W^V; bias_v; 0] per head."""
    torch.manual_seed(5)
    ours = MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True, dtype=torch.float64)
    with torch.no_grad():
        ours.q_proj.bias.normal_()
        ours.k_proj.bias.normal_()
        ours.v_proj.bias.normal_()
    q, k, v = inputs()
    d = E // H
    qh = (q @ ours.q_proj.weight.T + ours.q_proj.bias).view(B, NQ, H, d)
    kh = torch.cat([k @ ours.k_proj.weight.T + ours.k_proj.bias, ours.bias_k.expand(B, 1, E)], 1)
    vh = torch.cat([v @ ours.v_proj.weight.T + ours.v_proj.bias, ours.bias_v.expand(B, 1, E)], 1)
    kh = torch.cat([kh.view(B, NK + 1, H, d), torch.zeros(B, 1, H, d, dtype=torch.float64)], 1)
    vh = torch.cat([vh.view(B, NK + 1, H, d), torch.zeros(B, 1, H, d, dtype=torch.float64)], 1)
    a = torch.softmax(torch.einsum("bihd,bjhd->bhij", qh, kh) / math.sqrt(d), dim=-1)
    expected = torch.einsum("bhij,bjhd->bihd", a, vh).reshape(B, NQ, E) @ ours.out_proj.weight.T
    torch.testing.assert_close(ours(q, k, v), expected + ours.out_proj.bias, rtol=1e-10, atol=1e-10)
    _, maps = ours(q, k, v, return_attn=True, average_heads=False)
    torch.testing.assert_close(maps, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_causal_with_extra_keys_sees_them_from_every_query(add_bias_kv):
    """Causality is over the real keys; bias_k and the zero key stay visible (torch pads its mask)."""
    theirs = randomised_torch(add_bias_kv=add_bias_kv, add_zero_attn=True, batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    x = inputs()[0]
    future = torch.ones(NQ, NQ, dtype=torch.bool).triu(1)  # torch: True = masked
    expected = theirs(x, x, x, attn_mask=future)[0]
    torch.testing.assert_close(ours(x, causal=True), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(x, causal=True, return_attn=True)[0], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False])
def test_unbatched_inputs_match_torch(batch_first):
    theirs = randomised_torch(add_bias_kv=True, batch_first=batch_first)
    ours = MultiheadAttention.from_torch(theirs)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(NQ, E, generator=g, dtype=torch.float64)
    kv = torch.randn(NK, E, generator=g, dtype=torch.float64)
    padded = torch.tensor([False] * (NK - 2) + [True] * 2)
    per_head = random_bool_mask(H, NQ, NK, seed=8)
    expected, expected_maps = theirs(
        q, kv, kv, key_padding_mask=padded, attn_mask=~per_head, average_attn_weights=False
    )
    out, maps = ours(q, kv, key_mask=~padded, attn_mask=per_head, return_attn=True, average_heads=False)
    assert out.shape == (NQ, E) and maps.shape == (H, NQ, NK + 1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)
    # the same as a batch of one
    torch.testing.assert_close(
        ours(q, kv)[None] if batch_first else ours(q, kv)[:, None],
        ours(q[None], kv[None]) if batch_first else ours(q[:, None], kv[:, None]),
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"bias": False}, {"kdim": 6, "vdim": 10}, {"add_bias_kv": True, "add_zero_attn": True}],
)
def test_torch_state_dict_loads_directly(options):
    theirs = randomised_torch(**options)
    ours = MultiheadAttention(
        E,
        H,
        kdim=options.get("kdim"),
        vdim=options.get("vdim"),
        bias=options.get("bias", True),
        add_bias_kv=options.get("add_bias_kv", False),
        add_zero_attn=options.get("add_zero_attn", False),
        dtype=torch.float64,
    )
    ours.load_state_dict(theirs.state_dict())  # strict: every key maps
    q, k, v = inputs(kdim=options.get("kdim", E), vdim=options.get("vdim", E))
    theirs.batch_first = True
    torch.testing.assert_close(ours(q, k, v), theirs(q, k, v)[0], rtol=1e-10, atol=1e-10)
    # our own state_dict still round-trips
    again = MultiheadAttention(E, H, **options, dtype=torch.float64)
    again.load_state_dict(ours.state_dict())
    torch.testing.assert_close(again(q, k, v), ours(q, k, v), rtol=0, atol=0)


def test_a_torch_state_dict_that_cannot_map_is_a_clear_error():
    with_bias_kv = randomised_torch(add_bias_kv=True).state_dict()
    with pytest.raises(RuntimeError, match="bias_k: .* add_bias_kv=True, but this one was built without"):
        MultiheadAttention(E, H).load_state_dict(with_bias_kv)
    with pytest.raises(RuntimeError, match="in_proj_bias: .* built with bias=False"):
        MultiheadAttention(E, H, bias=False).load_state_dict(randomised_torch().state_dict())
    other_width = nn.MultiheadAttention(2 * E, H).state_dict()
    with pytest.raises(RuntimeError, match=r"in_proj_weight: expected torch's packed .* \(48, 16\)"):
        MultiheadAttention(E, H).load_state_dict(other_width)


def test_from_torch_keeps_layout_dropout_and_mode():
    theirs = nn.MultiheadAttention(E, H, dropout=0.25, batch_first=False, add_zero_attn=True).train()
    ours = MultiheadAttention.from_torch(theirs)
    assert (ours.batch_first, ours.dropout, ours.training, ours.add_zero_attn) == (False, 0.25, True, True)
    assert not MultiheadAttention.from_torch(theirs.eval()).training


def test_new_options_stay_on_the_fused_path():
    """No N x N matrix without maps, with every new option (the op recorder sees every buffer)."""
    from attnzoo.testing import OpRecorder

    n = 256  # q, k, v of one packed projection: 3 B n E = 2^15 * 1.5 elements, below n^2
    ours = MultiheadAttention(32, 4, add_bias_kv=True, add_zero_attn=True, batch_first=False).eval()
    x = torch.randn(n, 2, 32)
    key_mask = torch.zeros(2, n)
    key_mask[1, -5:] = float("-inf")
    for call in (
        lambda: ours(x),
        lambda: ours(x, key_mask=key_mask),
        lambda: ours(x[:, 0]),  # unbatched
        lambda: ours(x, causal=True),  # the extra keys in front, the fused causal kernel
    ):
        with torch.no_grad(), OpRecorder() as recorder:
            call()
        assert recorder.ran("scaled_dot_product")
        assert recorder.largest_storage < n * n, recorder.formed(lambda size: size >= n * n)


def _gemm_count(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    from attnzoo.testing import OpRecorder

    with torch.no_grad(), OpRecorder() as recorder:
        module(*inputs)
    return sum(name.startswith(("aten.addmm", "aten.mm", "aten.bmm")) for name in recorder.names())


def test_self_attention_projects_q_k_v_in_one_gemm_with_the_same_result():
    """From B N >= d tokens on (or with at most 2^14 stacked weights), self-attention's q, k, v come
    from one GEMM of the stacked weights (then the out projection: 2 GEMMs), equal to three separate
    projections; few tokens beside many weights, cross
    attention, a hooked or replaced projection and fx tracing keep one call per projection."""
    torch.manual_seed(0)
    mha = MultiheadAttention(32, 4).eval()
    x = torch.randn(2, 16, 32)  # 32 tokens = d
    assert _gemm_count(mha, x) == 2
    separate = MultiheadAttention(32, 4).eval()
    separate.load_state_dict(mha.state_dict())
    calls = []
    separate.q_proj.register_forward_hook(lambda *args: calls.append(1))  # a hook must run
    assert _gemm_count(separate, x) == 4 and calls
    torch.testing.assert_close(mha(x), separate(x), rtol=1e-5, atol=1e-6)
    # the packed path's gradients are those of the separate projections
    grads = [torch.autograd.grad(m(x).square().sum(), list(m.parameters())) for m in (mha, separate)]
    for packed_grad, separate_grad in zip(*grads):
        torch.testing.assert_close(packed_grad, separate_grad, rtol=1e-5, atol=1e-6)
    assert _gemm_count(mha, x[:, :4]) == 2  # 8 tokens < d, but 3 d^2 = 3072 weights: a cheap copy
    wide = MultiheadAttention(128, 4).eval()  # 3 d^2 = 49152 weights
    assert _gemm_count(wide, torch.randn(2, 4, 128)) == 4  # 8 tokens < d: the copy would cost more
    assert _gemm_count(wide, torch.randn(2, 64, 128)) == 2
    assert _gemm_count(mha, x, x.clone()) == 4  # key is another tensor: not self-attention
    # sequence-first and unbatched inputs are self-attention too
    seq_first = MultiheadAttention(32, 4, batch_first=False).eval()
    assert _gemm_count(seq_first, x.transpose(0, 1)) == 2
    assert _gemm_count(mha, x.reshape(32, 32)) == 2


def test_shared_input_projections_stay_modules_under_fx():
    """fx symbolic tracing keeps one call_module node per projection (what fx quantization and
    graph rewrites look for), where eager mode runs one GEMM of the stacked weights."""
    from attnzoo.functional.heads import project_shared_input

    class Projections(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return project_shared_input(x, (self.a, self.b), 2)

    module, x = Projections(), torch.randn(2, 8, 8)  # 16 tokens >= 8: packed in eager mode
    traced = torch.fx.symbolic_trace(module)
    assert [str(n.target) for n in traced.graph.nodes if n.op == "call_module"] == ["a", "b"]
    for got, expected in zip(traced(x), module(x)):
        torch.testing.assert_close(got, expected)
    assert _gemm_count(module, x) == 1


def test_the_output_projection_runs_as_its_module_where_a_call_would_differ():
    """W^O is F.linear on out_proj's parameters only where that is what calling it computes: a
    hook still runs, a replaced projection runs as itself, and fx tracing keeps the module call
    (one call less: ~12 us of a small call's ~100)."""
    torch.manual_seed(0)
    mha = MultiheadAttention(32, 4).eval()
    x = torch.randn(2, 5, 32)
    expected = mha(x)
    calls = []
    handle = mha.out_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    torch.testing.assert_close(mha(x), expected)
    assert calls == [(2, 5, 32)]
    handle.remove()

    class Doubled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    patched = nn.Linear(32, 32)
    patched.load_state_dict(mha.out_proj.state_dict())
    patched.forward = lambda x: 3 * nn.functional.linear(x, patched.weight, patched.bias)
    mha.out_proj = patched
    torch.testing.assert_close(mha(x), 3 * expected)
    doubled = Doubled(32, 32)
    doubled.load_state_dict(mha.out_proj.state_dict())
    mha.out_proj = doubled
    torch.testing.assert_close(mha(x), 2 * expected)

    from attnzoo.layers import call_layer

    class Projection(torch.nn.Module):  # mha itself is an fx leaf (attnzoo.inspect.symbolic_trace)
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return call_layer(self.proj, x)

    module = Projection()
    traced = torch.fx.symbolic_trace(module)
    assert [str(n.target) for n in traced.graph.nodes if n.op == "call_module"] == ["proj"]
    torch.testing.assert_close(traced(x), module(x))
    # and a plain projection is no module call at all (nor are q, k, v: one stacked GEMM)
    with mock.patch.object(nn.Linear, "forward", side_effect=AssertionError("a module call")):
        MultiheadAttention(32, 4)(x)


def test_merged_heads_are_a_view_of_the_fused_output_in_eager_mode():
    """The fused kernel writes (B, N, h, d) when q comes from the packed projection: merging the
    heads is then free (timm's reshape); a (B, h, N, d) layout is still copied."""
    from attnzoo.functional.heads import merge_heads

    token_major = torch.randn(2, 5, 3, 4).transpose(1, 2)  # (B, h, N, d) laid out (B, N, h, d)
    merged = merge_heads(token_major)
    assert merged.shape == (2, 5, 12) and merged.data_ptr() == token_major.data_ptr()
    head_major = torch.randn(2, 3, 5, 4)
    merged = merge_heads(head_major)
    assert merged.data_ptr() != head_major.data_ptr() and merged.is_contiguous()
    torch.testing.assert_close(merged, head_major.transpose(1, 2).reshape(2, 5, 12))


def test_the_plain_call_runs_no_operator_beyond_the_computation():
    """Self-attention without masks or maps (the common call) runs the projections, the fused
    kernel and the NaN carrier, and nothing else: no checks or re-layouts that reach the
    dispatcher (each is a kernel launch on a GPU, where small calls are launch-bound). The
    metadata-only views are not counted."""
    from attnzoo.testing import OpRecorder

    mha = MultiheadAttention(32, 4).eval()
    views = ("aten.view", "aten.t.", "aten.transpose", "aten.permute", "aten.unbind", "aten.detach")
    x = torch.randn(2, 16, 32)
    for kwargs in ({}, {"causal": True}):
        with torch.no_grad(), OpRecorder() as recorder:
            mha(x, **kwargs)
        computed = [name.split(".")[1] for name in recorder.names() if not name.startswith(views)]
        computed = ["sdpa" if "scaled_dot_product" in name else name for name in computed]
        # the stacked W^Q, W^K, W^V and biases; q, k, v; the NaN carrier (row sums); attention;
        # + 0 * carrier; W^O
        assert computed == ["cat", "cat", "addmm", "sum", "sdpa", "add_", "addmm"], kwargs
