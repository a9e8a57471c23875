"""attnzoo.models.resnet: published parameter counts, placements, and small CIFAR-style runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.models.resnet import BasicBlock, Bottleneck, ResNet, resnet
from attnzoo.vision.bam import BAM
from attnzoo.vision.cbam import CBAM
from attnzoo.vision.eca import ECA, OFFICIAL_RESNET_KERNEL_SIZES
from attnzoo.vision.global_context import GlobalContext
from attnzoo.vision.squeeze_excite import SqueezeExcite


@pytest.fixture(autouse=True)
def one_thread():
    # these models are tiny: intra-op threads only add synchronisation (ruinous on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(depth: int, attention: str | None = None, **kwargs) -> ResNet:
    # parameters on the meta device: counts without allocating or initialising 25M weights
    return resnet(depth, attention, device="meta", **kwargs)


@pytest.mark.parametrize(
    ("depth", "attention", "published"),
    [
        # CBAM paper (arXiv:1807.06521), Table 4
        (18, None, 11.69e6),
        (18, "se", 11.78e6),
        (18, "cbam", 11.78e6),
        (34, None, 21.80e6),
        (34, "se", 21.96e6),
        (34, "cbam", 21.96e6),
        (50, None, 25.56e6),
        (50, "se", 28.09e6),
        (50, "cbam", 28.09e6),
        # BAM paper (arXiv:1807.06514), Table 4 (ImageNet): ResNet-50 + BAM 25.92M
        (50, "bam", 25.92e6),
    ],
)
def test_parameter_counts_match_published(depth, attention, published):
    measured = count(build_meta(depth, attention))
    assert abs(measured - published) / published < 0.005, f"{measured} vs {published}"


def test_exact_counts_of_plain_and_se_resnet50():
    assert count(build_meta(50)) == 25_557_032  # torchvision's resnet50
    # SE: 2 C^2/16 + C/16 + C per block over 3 x 256, 4 x 512, 6 x 1024, 3 x 2048
    se = sum(n * (2 * c * c // 16 + c // 16 + c) for n, c in ((3, 256), (4, 512), (6, 1024), (3, 2048)))
    assert count(build_meta(50, "se")) == 25_557_032 + se


def test_eca_per_stage_kernels_add_80_parameters_adaptive_86():
    base = count(build_meta(50))
    stages = [{"kernel_size": k} for k in OFFICIAL_RESNET_KERNEL_SIZES[50]]
    # ECA-Net paper: ECA adds 80 parameters to ResNet-50 (k = 3, 5, 5, 7 over 3, 4, 6, 3 blocks)
    assert count(build_meta(50, "eca", stage_attention_kwargs=stages)) - base == 80
    # the adaptive rule gives k = 5, 5, 5, 7: 3*5 + 4*5 + 6*5 + 3*7
    assert count(build_meta(50, "eca")) - base == 86
    model = build_meta(50, "eca", stage_attention_kwargs=stages)
    kernels = [[block.attn.kernel_size for block in stage.blocks] for stage in model.stages]
    assert kernels == [[3] * 3, [5] * 4, [5] * 6, [7] * 3]


def test_residual_placement_on_every_block_at_the_expanded_width():
    model = build_meta(50, "cbam")
    widths = [block.attn.channel.channels for stage in model.stages for block in stage.blocks]
    assert widths == [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert all(isinstance(block.attn, CBAM) for stage in model.stages for block in stage.blocks)
    assert all(stage.attn is None for stage in model.stages)
    model18 = build_meta(18, "se")
    expected = [64, 64, 128, 128, 256, 256, 512, 512]
    assert [b.attn.channels for s in model18.stages for b in s.blocks] == expected


def test_bam_goes_between_stages_only():
    model = build_meta(50, "bam")
    assert [stage.attn.channels if stage.attn is not None else None for stage in model.stages] == [
        256,
        512,
        1024,
        None,
    ]
    assert all(isinstance(s.attn, BAM) for s in model.stages[:3])
    assert all(block.attn is None for stage in model.stages for block in stage.blocks)
    assert sum(isinstance(m, BAM) for m in resnet(20, "bam").modules()) == 2  # 3 stages


@pytest.mark.parametrize("block_kind", ["basic", "bottleneck"])
def test_attention_sits_before_the_addition(block_kind):
    # out = relu(attn(bn_last(...)) + shortcut): the module sees the branch, not the sum
    torch.manual_seed(0)
    model = resnet(18 if block_kind == "basic" else 50, "se", width=8, num_classes=3).eval()
    block = model.stages[1].blocks[0]
    assert isinstance(block, BasicBlock if block_kind == "basic" else Bottleneck)
    seen = {}
    last_bn = block.bn2 if block_kind == "basic" else block.bn3
    last_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.clone()))
    block.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", (i[0].clone(), o.clone())))
    block.downsample.register_forward_hook(lambda m, i, o: seen.__setitem__("short", o.clone()))
    block.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.clone()))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    attn_in, attn_out = seen["attn"]
    torch.testing.assert_close(attn_in, seen["bn"])
    torch.testing.assert_close(seen["out"], torch.relu(attn_out + seen["short"]))


def test_attention_modules_keep_their_own_initialisation():
    model = resnet(20, "gc")
    gcs = [m for m in model.modules() if isinstance(m, GlobalContext)]
    assert len(gcs) == 9
    assert all((m.fc2.weight == 0).all() for m in gcs)  # not overwritten by the ResNet's init
    conv = model.stem[0]
    assert abs(conv.weight.std().item() - (2 / (16 * 9)) ** 0.5) < 0.05  # Kaiming fan_out


@pytest.mark.parametrize("attention", ["se", "cbam", "eca", "gc", "bam"])
def test_cifar_resnet_runs_forward_and_backward(attention):
    torch.manual_seed(0)
    model = resnet(20, attention, num_classes=10, width=8)
    x = torch.randn(3, 3, 24, 24)
    logits = model(x)
    assert logits.shape == (3, 10)
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        plain = model(x)
        logits, maps = model(x, return_attn=True)
    torch.testing.assert_close(logits, plain)
    expected = (
        {"stage1", "stage2"}
        if attention == "bam"
        else {f"stage{s}.block{b}" for s in (1, 2, 3) for b in range(3)}
    )
    assert set(maps) == expected
    spec = attnzoo.get_spec(attention)
    assert isinstance(
        model.stages[0].attn if attention == "bam" else model.stages[0].blocks[0].attn, spec.cls
    )


def test_small_variant_options():
    model = resnet(20, "eca", in_chans=1, num_classes=7, width=8)
    assert model(torch.randn(2, 1, 40, 40)).shape == (2, 7)
    assert model.num_features == 32  # 8 * 4 in the third stage
    assert count(resnet(20)) < 300_000  # cheap on CPU: He et al. report 0.27M
    cifar18 = resnet(18, "se", stem="cifar", num_classes=10)
    assert isinstance(cifar18.stem[0], nn.Conv2d) and cifar18.stem[0].stride == (1, 1)
    assert len(cifar18.stem) == 3  # no max pool
    assert resnet(20).fc.out_features == 10 and resnet(18, device="meta").fc.out_features == 1000


def test_plain_models_have_no_attention():
    model = resnet(18, width=8)
    kinds = (SqueezeExcite, CBAM, ECA, GlobalContext, BAM)
    assert not any(isinstance(m, kinds) for m in model.modules())
    assert model.attention is None


@pytest.mark.parametrize("name", ["sk", "split_attention", "scconv"])
def test_conv_replacing_mechanisms(name):
    if name not in attnzoo.list_modules():
        pytest.skip(f"{name} is not registered")
    cls = attnzoo.get_spec(name).cls
    bottleneck = resnet(50, name, width=32, num_classes=5, device="meta")
    assert all(isinstance(b.conv2, cls) for s in bottleneck.stages for b in s.blocks)
    assert all(b.attn is None for s in bottleneck.stages for b in s.blocks)
    torch.manual_seed(0)
    model = resnet(20, name, num_classes=5, width=8)
    replaced = [b.conv1 if isinstance(b.conv1, cls) else b.conv2 for s in model.stages for b in s.blocks]
    assert all(isinstance(m, cls) for m in replaced) and len(replaced) == 9
    logits = model(torch.randn(2, 3, 12, 12))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    model.eval()
    with torch.no_grad():
        _, maps = model(torch.randn(2, 3, 12, 12), return_attn=True)
    assert len(maps) == 9


def test_errors():
    with pytest.raises(ValueError, match="depth"):
        resnet(19)
    with pytest.raises(KeyError, match="unknown attention module"):
        resnet(20, "squeeze")
    with pytest.raises(ValueError, match="attention"):
        resnet(20, None, kernel_size=3)
    with pytest.raises(ValueError, match="stage_attention_kwargs"):
        resnet(20, "eca", stage_attention_kwargs=[{}] * 4)
    with pytest.raises(ValueError, match="does not preserve"):
        resnet(20, "sag_mask")
    with pytest.raises(ValueError, match="stem"):
        resnet(20, stem="imagenet")
    with pytest.raises(ValueError, match="placement"):
        resnet(20, "se", placement="head")
    with pytest.raises(ValueError, match="expected C=3"):
        resnet(20)(torch.randn(1, 1, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["cbam", "bam"])
def test_small_resnet_exports_and_compiles(attention):
    model = resnet(20, attention, width=8).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), expected)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        logits, maps = compiled(x, return_attn=True)
    torch.testing.assert_close(logits, expected)
    assert len(maps) == (2 if attention == "bam" else 9)


# ---------------------------------------------------------------------------------------------
# resnet(depth, conv=NAME): attention replacing the spatial 3x3 convolutions


@pytest.mark.parametrize(
    ("conv", "published"),
    [
        # SASA paper (arXiv:1906.05909), Table 1, conv-stem + attention ResNet-50: 18.0M; its
        # abstract: "29% fewer parameters" than ResNet-50 (25.6M)
        ("sasa", 18.0e6),
        # AA paper (arXiv:1904.09925), Table 2: AA-ResNet-50 25.8M (k = 2v = 0.2, 8 heads, >= 20
        # dimensions a key head, the last 3 stages)
        ("aa_conv", 25.8e6),
    ],
)
def test_conv_replaced_parameter_counts_match_published(conv, published):
    measured = count(resnet(50, conv=conv, device="meta"))
    assert abs(measured - published) / published < 0.01, f"{measured} vs {published}"
    if conv == "sasa":
        assert abs(1 - measured / count(build_meta(50)) - 0.29) < 0.01


def test_lr_net_26_matches_the_published_count_and_layout():
    """LR-Net (arXiv:1904.11491), Table 1: LR-Net-26 14.7M parameters (ResNet-26: 16.0M), the 3x3
    convs 7x7 local relation layers in bottlenecks of widths 100, 200, 400, 800 and the 7x7 stem
    a 1x1 conv and a 7x7 local relation layer of stride 2."""
    from attnzoo.vision.local_relation import LocalRelation

    assert abs(count(build_meta(26)) - 16.0e6) / 16.0e6 < 0.01
    model = resnet(26, conv="local_relation", device="meta")
    measured = count(model)
    assert abs(measured - 14.7e6) / 14.7e6 < 0.01, measured
    # 100 is no multiple of m = 8: the first stage is 104 wide; the others are the paper's
    assert [stage.blocks[0].conv2.channels for stage in model.stages] == [104, 200, 400, 800]
    blocks = [b for stage in model.stages for b in stage.blocks]
    assert all(isinstance(b.conv2, LocalRelation) and b.conv2.kernel_size == 7 for b in blocks)
    assert model.stem[0].kernel_size == (1, 1) and isinstance(model.stem[3], LocalRelation)
    assert model.stem[3].stride == 2 and model.stem[3].channel_sharing == 8
    # the widths and the stem belong to the paper network only: compare's conv placement keeps them
    plain = resnet(26, "local_relation", device="meta")
    assert isinstance(plain.stem[0], nn.Conv2d) and plain.stem[0].kernel_size == (7, 7)
    assert plain.stages[0].blocks[0].conv2.channels == 64


def test_conv_replaces_the_3x3_convs_of_the_papers_stages_and_keeps_bn_and_stem():
    from attnzoo.vision.aa_conv import AAConv2d
    from attnzoo.vision.sasa import SASA

    model = resnet(50, conv="aa_conv", device="meta")
    assert isinstance(model.stem[0], nn.Conv2d)
    kinds = [[type(b.conv2) for b in stage.blocks] for stage in model.stages]
    assert kinds[0] == [nn.Conv2d] * 3  # AA-ResNet: the last three stages only
    assert all(kind is AAConv2d for stage in kinds[1:] for kind in stage)
    block = model.stages[1].blocks[0]
    assert isinstance(block.bn2, nn.BatchNorm2d) and isinstance(block.act2, nn.ReLU)
    assert (block.conv2.stride, block.conv2.value_dim, block.conv2.key_dim) == (2, 16, 160)
    model = resnet(50, conv="sasa", device="meta")
    assert all(isinstance(b.conv2, SASA) for stage in model.stages for b in stage.blocks)
    assert all(isinstance(b.conv1, nn.Conv2d) for stage in model.stages for b in stage.blocks)  # 1x1
    assert model.stages[1].blocks[0].conv2.stride == 2
    chosen = resnet(18, conv="sasa", conv_stages=[3], device="meta")
    assert [isinstance(s.blocks[0].conv1, SASA) for s in chosen.stages] == [False, False, False, True]


@pytest.mark.parametrize("conv", ["sasa", "aa_conv", "conv_as_attention"])
def test_cifar_resnet_with_conv_attention_trains(conv):
    torch.manual_seed(0)
    model = resnet(8, conv=conv)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    logits, maps = model(x, return_attn=True)
    assert logits.shape == (4, 10) and set(maps) == {f"stage{s}.block0" for s in (1, 2, 3)}


def test_conv_errors():
    with pytest.raises(ValueError, match="conv: expected a mechanism with placement='conv'"):
        resnet(18, conv="se", device="meta")
    with pytest.raises(ValueError, match="pass attention= and placement= without it"):
        resnet(18, "se", conv="sasa", device="meta")
    with pytest.raises(ValueError, match="conv_stages: only with conv=NAME"):
        resnet(18, conv_stages=[1], device="meta")
    with pytest.raises(ValueError, match=r"conv_stages: expected stage indices in \[0, 3\)"):
        resnet(20, conv="sasa", conv_stages=[3], device="meta")
    with pytest.raises(KeyError, match="sasa"):
        resnet(18, conv="sas", device="meta")
