"""psa: point-wise spatial attention in float64 with loops over positions (collect and distribute,
full and partial mask windows, the official logit-0 behaviour), the re-indexing against the
psa_mask semantics, and memory: nothing quadratic beyond the predicted map and its re-indexing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.functional.global_reasoning import point_wise_attention_, point_wise_logits
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.psa import PointwiseSpatialAttention

pytestmark = pytest.mark.usefixtures("float64_default")


def cbr(block, x):
    conv, bn = block[0], block[1]
    y = F.conv2d(x, conv.weight, padding=conv.padding)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def branch_reference(branch, x, mask_size, direction, official):
    """Each position i predicts a_i (mask window centred on i). Collect: z_i = sum_j softmax_j(a_i[j-i]) x_j;
    distribute: z_j = sum_i softmax_i(a_i[j-i]) x_i. Out-of-window pairs: excluded (paper) or logit 0."""
    reduced = cbr(branch.reduce, x)
    predicted = F.conv2d(cbr(branch.predict[0], reduced), branch.predict[1].weight)
    b, c, h, w = reduced.shape
    mh, mw = mask_size
    hh, hw = (mh - 1) // 2, (mw - 1) // 2
    n = h * w
    score = torch.full((b, n, n), float("nan"))  # score[:, i, j]: what i predicted for j
    for i in range(n):
        ih, iw = divmod(i, w)
        for j in range(n):
            jh, jw = divmod(j, w)
            a, bb = jh - ih + hh, jw - iw + hw
            if 0 <= a < mh and 0 <= bb < mw:
                score[:, i, j] = predicted[:, a * mw + bb, ih, iw]
            elif official:
                score[:, i, j] = 0.0
    z = torch.zeros(b, c, n)
    weights = torch.zeros(b, n, n)
    flat = reduced.reshape(b, c, n)
    for target in range(n):
        row = score[:, target, :] if direction == "collect" else score[:, :, target]
        keep = ~row.isnan()
        e = torch.where(
            keep, torch.exp(row.nan_to_num(0.0) - row.nan_to_num(-1e300).amax(-1, keepdim=True)), 0.0
        )
        wts = e / e.sum(-1, keepdim=True)
        weights[:, target] = wts
        z[:, :, target] = torch.einsum("bk,bck->bc", wts, flat)
    return z.view(b, c, h, w), weights


def psa_reference(m, x, official=False):
    contexts, maps = [], {}
    for name, branch in m.paths.items():
        z, maps[name] = branch_reference(branch, x, m.mask_size, name, official)
        contexts.append(z)
    projected = cbr(m.proj, torch.cat(contexts, dim=1))
    return cbr(m.fuse, torch.cat([x, projected], dim=1)), maps


@pytest.mark.parametrize(
    ("mask_size", "variant"), [((7, 9), "paper"), ((3, 5), "paper"), ((3, 5), "official"), ((4, 6), "paper")]
)
def test_matches_paper(mask_size, variant):
    torch.manual_seed(0)
    module = randomize_(
        PointwiseSpatialAttention(8, mask_size=mask_size, variant=variant), norm_statistics=True
    )
    module.eval()
    x = torch.randn(2, 8, 4, 5)
    expected, maps = psa_reference(module, x, official=variant == "official")
    out, got = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), expected, rtol=1e-9, atol=1e-9)  # the fused path
    with torch.no_grad():  # (7, 9) covers the 4 x 5 map: re-indexed in the predicted map's storage
        torch.testing.assert_close(module(x), expected, rtol=1e-9, atol=1e-9)
    for name in ("collect", "distribute"):
        torch.testing.assert_close(got[name], maps[name], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[name].sum(-1), torch.ones(2, 20))


def test_reindexing_matches_the_psa_mask_op_semantics():
    # the op writes buffer[key, query] (collect) / buffer[query, key] (distribute) from the
    # predicting position's window; here rows are the position whose context is formed
    torch.manual_seed(1)
    predicted = torch.randn(1, 3 * 5, 3, 4)
    for distribute in (False, True):
        got = point_wise_logits(predicted, (3, 5), distribute=distribute, fill=0.0)
        buffer = torch.zeros(1, 12, 12)
        for h in range(3):
            for w in range(4):
                for a in range(3):
                    for b in range(5):
                        th, tw = h + a - 1, w + b - 2
                        if 0 <= th < 3 and 0 <= tw < 4:
                            p, t = h * 4 + w, th * 4 + tw
                            if distribute:
                                buffer[0, p, t] = predicted[0, a * 5 + b, h, w]  # softmax over p
                            else:
                                buffer[0, t, p] = predicted[0, a * 5 + b, h, w]  # softmax over t
        # the op normalises over dim 1 and aggregates columns: our rows are its columns
        torch.testing.assert_close(got, buffer.transpose(1, 2))


@pytest.mark.parametrize("chunks", [1, 2, 16])
@pytest.mark.parametrize("mask_size", [(9, 11), (11, 12)])
def test_in_place_reindexing_matches_the_gather(mask_size, chunks):
    # windows covering a 5 x 6 map, exactly and with room to spare; one block (copied through a
    # clone), two, and one row per block (the later blocks copied directly)
    torch.manual_seed(4)
    height, width, batch = 5, 6, 3
    predicted = torch.randn(batch, mask_size[0] * mask_size[1], height, width)
    values = torch.randn(batch, height * width, 7)
    for distribute in (False, True):
        expected = point_wise_logits(predicted, mask_size, distribute=distribute).softmax(-1) @ values
        logits = predicted.permute(2, 3, 0, 1).contiguous()  # (B, K, H, W) -> (H, W, B, K)
        got = point_wise_attention_(
            logits, values, (height, width), mask_size, distribute=distribute, chunks=chunks
        )
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_in_place_reindexing_refuses_what_it_cannot_do():
    logits, values = torch.randn(4, 4, 1, 9), torch.randn(1, 16, 2)  # a 3 x 3 window on a 4 x 4 map
    with pytest.raises(ValueError, match="covers"):
        point_wise_attention_(logits, values, (4, 4), (3, 3))
    logits = torch.randn(4, 4, 1, 49, requires_grad=True)
    with pytest.raises(RuntimeError, match="without autograd"):
        point_wise_attention_(logits, values, (4, 4), (7, 7))


def test_official_logit_zero_differs_only_for_partial_windows():
    torch.manual_seed(2)
    x = torch.randn(1, 8, 4, 4)
    for mask_size, same in (((7, 7), True), ((3, 3), False)):
        paper = randomize_(PointwiseSpatialAttention(8, mask_size=mask_size), norm_statistics=True).eval()
        official = PointwiseSpatialAttention(8, mask_size=mask_size, variant="official").eval()
        official.load_state_dict(paper.state_dict())
        _, maps_p = paper(x, return_attn=True)
        _, maps_o = official(x, return_attn=True)
        assert torch.allclose(maps_p["collect"], maps_o["collect"]) == same
        if not same:
            far = maps_o["collect"][0, 0, 15]  # (0, 0) -> (3, 3): outside the 3 x 3 window
            assert maps_p["collect"][0, 0, 15] == 0 and far > 0


def test_shrink_factor_resamples_like_the_official_code():
    torch.manual_seed(3)
    module = randomize_(
        PointwiseSpatialAttention(8, mask_size=5, shrink_factor=2), norm_statistics=True
    ).eval()
    x = torch.randn(1, 8, 5, 5)
    out, maps = module(x, return_attn=True)
    assert out.shape == x.shape and maps["collect"].shape == (1, 9, 9)  # (5 - 1) // 2 + 1 = 3


def test_memory_nothing_quadratic_beyond_the_predicted_map():
    # a window covering the map: the re-indexing overwrites the predicted map itself
    module = PointwiseSpatialAttention(16, mask_size=(31, 31)).float().eval()
    x = torch.randn(1, 16, 16, 16, dtype=torch.float32)
    n = 16 * 16
    predicted = 31 * 31 * n
    with torch.no_grad(), OpRecorder() as rec:
        module(x)
    # every storage of N^2 elements or more is a predicted map (one per branch, one at a time):
    # no (N, N) gather, index tensor, mask, softmaxed copy or attention-kernel workspace
    assert {size for size in rec.storage_sizes if size >= n * n} == {predicted}
    assert rec.ran("mm") and not rec.ran("index") and not rec.ran("scaled_dot_product")


def test_memory_partial_window_one_gather_softmaxed_in_place():
    # a window smaller than the map (mask_h mask_w < N): the (N, N) gather is the one quadratic
    # buffer, and the softmax writes into it
    module = PointwiseSpatialAttention(16, mask_size=(15, 15)).float().eval()
    x = torch.randn(1, 16, 16, 16, dtype=torch.float32)
    n = 16 * 16
    with torch.no_grad(), OpRecorder() as rec:
        module(x)
    assert rec.largest_storage == n * n
    formed = {name.split(".")[1] for name, sizes in rec.formed(lambda size: size >= n * n)}
    views = {"view", "_unsafe_view", "reshape", "expand"}
    assert formed <= {"index", "masked_fill_", "sub_", "exp_", "div_"} | views, formed
    assert rec.ran("bmm") and not rec.ran("_softmax")


def test_memory_with_autograd_one_softmax_beside_the_gather():
    # training: the softmax allocates its output (its backward needs it); nothing else (N, N)
    module = PointwiseSpatialAttention(16, mask_size=(31, 31), branches="collect").float()
    x = torch.randn(2, 16, 16, 16, dtype=torch.float32, requires_grad=True)
    n = 16 * 16
    with OpRecorder() as rec:
        module(x).sum().backward()
    forward = rec.names()[: next(i for i, name in enumerate(rec.names()) if "ones_like" in name)]
    quadratic = {
        name.split(".")[1]
        for name, sizes in rec.sizes[: len(forward)]
        if any(s >= 2 * n * n for s in sizes)
        and not any(v in name for v in ("view", "unsqueeze", "expand", "reshape", "detach"))
        and not name.split(".")[1].endswith("_")
    }
    assert quadratic == {"convolution", "index", "_softmax"}, quadratic
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_registered_and_errors():
    spec = attnzoo.get_spec("psa")
    assert spec.family == "non_local" and spec.placement == "head" and spec.map_kind == "mixed"
    assert not spec.linear_memory
    with pytest.raises(ValueError, match="mask_size"):
        PointwiseSpatialAttention(8, mask_size=(0, 3))
    with pytest.raises(ValueError, match="branches"):
        PointwiseSpatialAttention(8, branches="both_ways")
    single = PointwiseSpatialAttention(8, mask_size=5, branches="collect")
    assert set(single.paths) == {"collect"} and single(torch.randn(1, 8, 3, 3)).shape == (1, 8, 3, 3)


def test_norm_layer_replaces_every_batchnorm():
    from functools import partial

    default = PointwiseSpatialAttention(8, mask_size=5, branches="collect")
    norms = [m for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 4 and "paths.collect.reduce.1.running_mean" in default.state_dict()
    grouped = PointwiseSpatialAttention(8, mask_size=5, norm_layer=partial(torch.nn.GroupNorm, 2)).train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in grouped.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in grouped.modules()) == 6  # 2 per branch + 2
    x = torch.randn(1, 8, 3, 3)
    out = grouped(x)  # a batch of one trains: no batch statistics
    assert out.shape == x.shape and torch.isfinite(out).all()
    # the reduce block is conv -> GroupNorm -> ReLU
    block = grouped.paths["collect"].reduce
    expected = torch.relu(F.group_norm(F.conv2d(x, block[0].weight), 2, block[1].weight, block[1].bias))
    torch.testing.assert_close(block(x), expected)
    bare = PointwiseSpatialAttention(8, mask_size=5, norm_layer=None)
    convs = [m for m in bare.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels != 25]
    assert convs and all(c.bias is not None for c in convs)  # a bias where no norm follows
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in bare.modules())
