"""The dilated ResNet + FCN head of `compare --task segmentation`, and the ResNet's output stride."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnzoo.models import SegmentationNet, resnet
from attnzoo.models.segmentation import segmentation_placement
from attnzoo.registry import get_spec


def test_output_stride_8_dilates_the_last_two_stages_instead_of_striding():
    net = resnet(18, width=8, in_chans=1, output_stride=8)
    assert net.forward_features(torch.randn(1, 1, 64, 64)).shape == (1, 64, 8, 8)
    strides = [stage.blocks[0].conv1.stride[0] for stage in net.stages]
    dilations = [stage.blocks[-1].conv2.dilation[0] for stage in net.stages]
    assert strides == [1, 2, 1, 1]
    assert dilations == [1, 1, 2, 4]
    # padding follows the dilation: the map keeps its size through every dilated 3x3 conv
    assert net.stages[3].blocks[0].conv1.padding == (4, 4)


def test_output_stride_default_is_unchanged_and_bad_strides_are_refused():
    assert resnet(18, width=8).forward_features(torch.randn(1, 3, 64, 64)).shape[-1] == 2
    with pytest.raises(ValueError, match=r"output_stride: expected one of \[4, 8, 16, 32\]"):
        resnet(18, width=8, output_stride=12)


@pytest.mark.parametrize(
    ("name", "where"),
    [("danet", "head"), ("psa", "head"), ("non_local", "head"), ("gc", "backbone"), ("sk", "backbone")],
)
def test_placement_is_read_from_the_spec(name, where):
    assert segmentation_placement(name) == where
    net = SegmentationNet(11, 1, attention=name, width=8)
    modules = [m for m in net.modules() if getattr(type(m), "registry_name", None) == name]
    if where == "head":
        assert len(modules) == 1 and net.context is modules[0]
    else:
        assert net.context is None and len(modules) > 1
        assert all(any(m is n for n in net.backbone.modules()) for m in modules)


def test_what_cannot_go_in_a_segmentation_network_is_refused_in_one_line():
    with pytest.raises(ValueError, match="not a module for a segmentation network"):
        segmentation_placement("mha")
    with pytest.raises(ValueError, match="is an upsampler"):
        segmentation_placement("carafe")
    with pytest.raises(ValueError, match="depth: expected one of"):
        SegmentationNet(3, depth=20)


@pytest.mark.parametrize("upsample", ["bilinear", "carafe"])
def test_logits_at_the_input_resolution_and_maps_of_the_head(upsample):
    net = SegmentationNet(5, 1, attention="danet", width=8, upsample=upsample).eval()
    x = torch.randn(2, 1, 48, 48)
    logits, maps = net(x, return_attn=True)
    assert logits.shape == (2, 5, 48, 48)
    assert maps["head"]["position"].shape == (2, 36, 36)  # the head's 6 x 6 grid
    torch.testing.assert_close(net(x), logits)
    assert (get_spec("carafe").cls in {type(m) for m in net.modules()}) == (upsample == "carafe")


def test_every_parameter_gets_a_gradient():
    # DistributedDataParallel stops on a parameter without a gradient (the ResNet's classifier is
    # removed for that reason)
    net = SegmentationNet(4, 1, attention="gc", width=8)
    net(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert isinstance(net.backbone.fc, nn.Identity)
