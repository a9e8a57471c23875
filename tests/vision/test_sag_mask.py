"""sag_mask: the CenterMask head in float64 (convs, 3x3 spatial attention, deconv, class masks)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import randomize_
from attnzoo.vision.sag_mask import SAGMask

F64 = torch.float64


def conv_ref(x, weight, bias=None):
    """'same' k x k convolution as a sum over taps of shifted einsums (zero padding)."""
    k = weight.shape[-1]
    h, w = x.shape[-2:]
    padded = F.pad(x, (k // 2,) * 4)
    out = sum(
        torch.einsum("bchw,oc->bohw", padded[:, :, p : p + h, q : q + w], weight[:, :, p, q])
        for p in range(k)
        for q in range(k)
    )
    return out if bias is None else out + bias[None, :, None, None]


def deconv2x2_ref(x, weight, bias):
    """Transposed conv, kernel 2, stride 2: out[2i + p, 2j + q] = sum_c x[c, i, j] W[c, o, p, q] + b."""
    batch, _, h, w = x.shape
    out = torch.einsum("bcij,copq->boipjq", x, weight).reshape(batch, weight.shape[1], 2 * h, 2 * w)
    return out + bias[None, :, None, None]


def sag_reference(m: SAGMask, x, order=("max", "mean")):
    convs = [layer for layer in m.convs if isinstance(layer, torch.nn.Conv2d)]
    for conv in convs:
        x = torch.relu(conv_ref(x, conv.weight, conv.bias))
    pooled = {"max": x.amax(1, keepdim=True), "mean": x.mean(1, keepdim=True)}
    attn = torch.sigmoid(conv_ref(torch.cat([pooled[o] for o in order], 1), m.attn_conv.weight))
    up = torch.relu(deconv2x2_ref(x * attn, m.deconv.weight, m.deconv.bias))
    masks = torch.einsum("bchw,kc->bkhw", up, m.predictor.weight[:, :, 0, 0])
    return masks + m.predictor.bias[None, :, None, None], attn


randomise = partial(randomize_, scale=0.1)


def test_matches_equations():
    torch.manual_seed(0)
    module = SAGMask(16, num_classes=5, conv_channels=12, dtype=F64)
    randomise(module)
    x = torch.randn(2, 16, 14, 14, dtype=F64)
    expected, attn = sag_reference(module, x)
    out, weights = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, attn, rtol=1e-10, atol=1e-10)


def test_roi_to_mask_shapes_and_defaults():
    module = SAGMask(256)
    assert len([m for m in module.convs if isinstance(m, torch.nn.Conv2d)]) == 4
    assert module.attn_conv.kernel_size == (3, 3)  # 3x3, not CBAM's 7x7
    assert module.attn_conv.bias is None
    assert module.deconv.kernel_size == (2, 2) and module.deconv.stride == (2, 2)
    assert module.predictor.out_channels == 80 and module.predictor.kernel_size == (1, 1)
    assert module.deconv.out_channels == 256
    x = torch.randn(3, 256, 14, 14)
    with torch.no_grad():
        masks, attn = module(x, return_attn=True)
    assert masks.shape == (3, 80, 28, 28)
    assert attn.shape == (3, 1, 14, 14) and ((attn > 0) & (attn < 1)).all()


def test_initialisation_as_official_mask_head():
    torch.manual_seed(1)
    module = SAGMask(64, num_classes=20)
    assert module.predictor.weight.std() < 0.003 and (module.predictor.bias == 0).all()
    assert all((c.bias == 0).all() for c in module.convs if isinstance(c, torch.nn.Conv2d))
    # MSRA fill: std sqrt(2 / fan_out) = sqrt(2 / (64 * 9))
    std = module.convs[0].weight.std().item()
    assert 0.8 * (2 / 576) ** 0.5 < std < 1.2 * (2 / 576) ** 0.5


def test_pooling_order_paper_vs_official():
    torch.manual_seed(2)
    paper = SAGMask(8, num_classes=3, dtype=F64)
    official = SAGMask(8, num_classes=3, variant="official", dtype=F64)
    randomise(paper, seed=3)
    official.load_state_dict(paper.state_dict())
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    torch.testing.assert_close(official(x), sag_reference(paper, x, order=("mean", "max"))[0])
    assert not torch.allclose(official(x), paper(x))
    # swapping the two input channels of the attention conv maps one onto the other
    with torch.no_grad():
        official.attn_conv.weight.copy_(paper.attn_conv.weight.flip(1))
    torch.testing.assert_close(official(x), paper(x), rtol=1e-12, atol=1e-12)


def test_zero_rois_pass_through_in_train_and_eval():
    module = SAGMask(16, num_classes=4)
    empty = torch.zeros(0, 16, 14, 14, requires_grad=True)
    out = module(empty)
    assert out.shape == (0, 4, 28, 28)
    out.sum().backward()
    assert empty.grad.shape == empty.shape
    with torch.no_grad():
        masks, attn = module.eval()(empty, return_attn=True)
    assert masks.shape == (0, 4, 28, 28) and attn.shape == (0, 1, 14, 14)


def test_registered_and_errors():
    spec = attnzoo.get_spec("sag_mask")
    assert spec.cls is SAGMask and not spec.shape_preserving
    with pytest.raises(ValueError, match="kernel_size"):
        SAGMask(16, kernel_size=4)
    with pytest.raises(ValueError, match="num_classes"):
        SAGMask(16, num_classes=0)
    with pytest.raises(ValueError, match="variant"):
        SAGMask(16, variant="v2")
