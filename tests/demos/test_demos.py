"""The main job and demos: compare, translate and show write what they promise, reproducibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo.cli import main
from attnzoo.demos.compare import (
    CompareConfig,
    _spatial_values,
    load_trained,
    map_row,
    run_compare,
    write_report,
)

PIL = pytest.importorskip("PIL.Image")


def png_size(path: Path) -> tuple[int, int]:
    with PIL.open(path) as image:
        return image.size


def tiny_compare(tmp_path: Path, **overrides) -> CompareConfig:
    config = dict(
        mechanisms=["none", "cbam_spatial"], epochs=1, seeds=[0, 1], depth=8, width=4, batch_size=32,
        limit=96, output=str(tmp_path / "report"), progress=False, sample_images=3,
    )  # fmt: skip
    config.update(overrides)
    return CompareConfig(**config)


def test_compare_writes_report_plots_maps_and_networks(tmp_path, monkeypatch):
    config = tiny_compare(tmp_path)
    results, data, maps = run_compare(config)
    report = write_report(results, data, maps, config)
    text = report.read_text()
    for r in results:
        # the mean, then every seed's result, and the number of seeds in the header
        per_seed = " / ".join(f"{100 * a:.2f}" for a in r.accuracies)
        assert f"| {r.name} | {100 * r.mean:.2f} | {per_seed} |" in text
    assert "mean of 2 seeds" in text and "Δ acc" in text and "cluttered digits" in text
    assert "adds over the idle process" in text  # what peak MiB measures
    assert "latency ms [IQR]" in text and "Δ latency [range]" in text
    for png in ("accuracy_vs_cost.png", "training_curves.png", "attention_maps.png"):
        width, height = png_size(report.parent / png)
        assert width >= 300 and height >= 200, png
        assert png in text
    # cbam_spatial's row: its spatial gates, on the fixed 0-1 scale; the plain network has no row
    assert (
        maps["none"] is None
        and maps["cbam_spatial"].kind == "spatial"
        and maps["cbam_spatial"].values.shape == (3, 32, 32)
    )
    assert (maps["cbam_spatial"].vmin, maps["cbam_spatial"].vmax) == (0.0, 1.0)
    assert float(maps["cbam_spatial"].values.min()) >= 0 and float(maps["cbam_spatial"].values.max()) <= 1
    saved = json.loads((report.parent / "results.json").read_text())
    assert [r["name"] for r in saved["results"]] == ["none", "cbam_spatial"]
    assert len(saved["results"][1]["latency_samples_ms"]) == 7
    cbam = results[1]  # the spatial branch of CBAM: a gate over positions
    assert cbam.params > results[0].params and cbam.mflops > 0 and cbam.latency_ms > 0
    assert cbam.train_mflops > 2 * cbam.mflops  # a training step: forward and backward
    assert all(r.latency_ms > 0 and r.peak_mib > 0 for r in results)  # the plain network's too
    assert len(cbam.accuracies) == 2 and all(0 <= a <= 1 for a in cbam.accuracies)

    # the trained networks are kept, loadable without unpickling code, and give the same outputs
    checkpoint = torch.load(report.parent / "models" / "cbam_spatial.pt", weights_only=True)
    assert checkpoint["mechanism"] == "cbam_spatial" and checkpoint["seed"] == 0
    model, _ = load_trained(report.parent / "models" / "cbam_spatial.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(data.test_x[:4]), cbam.model.eval()(data.test_x[:4]))

    # `attnzoo show cbam_spatial --from REPORT` draws the trained network, and says so on the picture
    from attnzoo import viz
    from attnzoo.demos.show import show

    titles = []
    save = viz.save_figure
    monkeypatch.setattr(
        viz,
        "save_figure",
        lambda fig, path, *a, **k: titles.append(fig._suptitle.get_text()) or save(fig, path, *a, **k),
    )
    path = show("cbam_spatial", report=report.parent, output=tmp_path / "trained.png")
    assert path == tmp_path / "trained.png" and min(png_size(path)) >= 300
    assert titles[-1].startswith("cbam_spatial: TRAINED by attnzoo compare")
    assert main(["show", "se", "--from", str(report.parent)]) == 2  # not in this report: says what is


def test_compare_is_reproducible(tmp_path):
    config = tiny_compare(tmp_path, mechanisms=["se"], seeds=[3])
    first, _, _ = run_compare(config)
    second, _, _ = run_compare(config)
    assert first[0].curves == second[0].curves and first[0].losses == second[0].losses


def test_compare_takes_an_image_folder(tmp_path):
    root = tmp_path / "images"
    generator = torch.Generator().manual_seed(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(20, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
            PIL.fromarray(pixels).save(root / label / f"{i}.png")
    config = tiny_compare(tmp_path, mechanisms=["se"], seeds=[0], data=str(root), image_size=16, limit=None)
    results, data, heatmaps = run_compare(config)
    assert data.classes == ["cats", "dogs"] and data.in_chans == 3
    assert data.train_x.shape[1:] == (3, 16, 16)
    report = write_report(results, data, heatmaps, config)
    assert "images" in report.read_text()


def test_compare_builds_conv_replacing_networks_beside_gating_ones(tmp_path):
    """`compare --mechanisms none,se,sasa`: each network with the placement its spec declares:
    SASA replaces the blocks' strided 3x3 convolution (the stem stays a conv), SE sits on the
    residual branch with every 3x3 conv kept."""
    from types import SimpleNamespace

    from attnzoo.demos.compare import build_model
    from attnzoo.vision.sasa import SASA

    config = tiny_compare(tmp_path, mechanisms=["none", "se", "sasa"])
    data = SimpleNamespace(classes=list("0123456789"), in_chans=1)
    sasa = build_model("sasa", config, data)
    blocks = [b for stage in sasa.stages for b in stage.blocks]
    assert attnzoo.get_spec("sasa").placement == "conv"
    assert all(isinstance(b.conv1, SASA) and b.attn is None for b in blocks)
    assert isinstance(sasa.stem[0], torch.nn.Conv2d)
    assert [b.conv1.stride for b in blocks] == [1, 2, 2]  # the stride moves into the attention layer
    se = build_model("se", config, data)
    se_blocks = [b for stage in se.stages for b in stage.blocks]
    assert all(b.attn.registry_name == "se" for b in se_blocks)
    assert all(isinstance(b.conv1, torch.nn.Conv2d) and b.conv1.kernel_size == (3, 3) for b in se_blocks)
    x = torch.randn(2, 1, 32, 32)
    assert sasa(x).shape == se(x).shape == build_model("none", config, data)(x).shape == (2, 10)


def test_compare_cli_rejects_unknown_mechanisms(capsys):
    assert main(["compare", "--mechanisms", "none,cbamm", "--quiet"]) == 2
    assert "did you mean 'cbam'" in capsys.readouterr().err


def test_maps_are_read_by_kind_with_an_honest_scale():
    torch.manual_seed(0)
    images = torch.randn(2, 1, 32, 32)
    # channel-only: the channel weights of the last module, per image (not a copy of the input)
    se = map_row(attnzoo.models.resnet(8, "se", in_chans=1, width=4), images)
    assert se.kind == "channel" and se.values.shape == (2, 16) and (se.vmin, se.vmax) == (0.0, 1.0)
    # pairwise: the attention each position receives, relative to uniform (1 everywhere = uniform)
    non_local = map_row(attnzoo.models.resnet(8, "non_local", in_chans=1, width=4), images)
    assert non_local.kind == "spatial" and non_local.label == "received / uniform"
    assert non_local.values.shape == (2, 32, 32) and non_local.vmin == 0.0 and non_local.vmax >= 1.0
    # sub-sampled keys (non-local's pooled phi): 64 queries on 8x8, 16 keys on a 4x4 grid
    keys = torch.zeros(1, 64, 16)
    keys[..., 6] = 1.0  # every query attends to key (row 1, column 2)
    grid, relative = _spatial_values("pairwise", keys)
    assert relative and grid.shape == (1, 4, 4) and grid[0, 1, 2] == 16.0 and grid.sum() == 16.0
    # softmax pooling weights (GC's context mask) read as relative to uniform; gates as they are
    pooling = torch.softmax(torch.randn(2, 1, 4, 4).flatten(1), -1).view(2, 1, 4, 4)
    assert _spatial_values("spatial", pooling)[1] is True
    assert _spatial_values("spatial", torch.rand(2, 1, 4, 4) * 0.9)[1] is False


def test_translate_trains_and_draws_alignments(tmp_path, capsys):
    out = tmp_path / "translate"
    argv = ["translate", "--epochs", "1", "--train-size", "192", "--hidden", "16", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "exact match" in printed
    report = (out / "report.md").read_text()
    assert "luong" in report and "| source | target | prediction |" in report
    alignments = sorted(out.glob("alignment_*.png"))
    assert len(alignments) == 4
    assert all(min(png_size(p)) >= 100 for p in alignments)


@pytest.mark.slow
def test_translate_learns_the_dates_task(tmp_path):
    from attnzoo.demos.translate import TranslateConfig, run_translate

    config = TranslateConfig(attention="luong", score="general", epochs=6, n_train=3000, n_test=200,
                             hidden=48, progress=False)  # fmt: skip
    result, _, _ = run_translate(config)
    assert result.exact_match > 0.5, result.curve


DRAWABLE = [
    name
    for name in attnzoo.list_modules()
    if attnzoo.get_spec(name).returns_attn
    and getattr(attnzoo.get_spec(name), "map_kind", None) != "edges"
    and attnzoo.get_spec(name).family != "graph"
]


@pytest.mark.parametrize("name", DRAWABLE)
def test_show_reads_every_mechanism_with_maps(name):
    from attnzoo.demos.maps import entries
    from attnzoo.demos.show import _panels, _run, _stem, load_image

    spec = attnzoo.get_spec(name)
    picture = load_image(None, side=32)  # an 8 x 8 feature map: the reading, not the resolution
    with torch.no_grad():
        features = _stem(16)(picture[None])
    maps = _run(spec, features)
    panels = [p for e in entries(spec, maps, 8, 8) for p in _panels(e, 8, 16, (4, 4), spec.channel_dim == 1)]
    assert panels, f"{name}: nothing to draw from {type(maps).__name__}"
    for title, values, how in panels:
        assert how in ("spatial", "profile", "bars", "matrix") and torch.isfinite(values).all(), title
        if how == "spatial":
            assert values.dim() == 2


@pytest.mark.parametrize("name", ["cbam", "mha", "se", "criss_cross"])
def test_show_draws_maps_and_says_they_are_untrained(tmp_path, name, monkeypatch):
    from attnzoo import viz
    from attnzoo.demos.show import show

    titles = []
    save = viz.save_figure
    monkeypatch.setattr(
        viz,
        "save_figure",
        lambda fig, path, *a, **k: titles.append(fig._suptitle.get_text()) or save(fig, path, *a, **k),
    )
    path = show(name, output=tmp_path)
    assert path == tmp_path / f"{name}.png"
    width, height = png_size(path)
    assert width >= 500 and height >= 200
    assert "UNTRAINED" in titles[-1]


def test_show_explains_what_it_cannot_draw(tmp_path):
    from attnzoo.demos.show import show

    with pytest.raises(ValueError, match="per-edge weights of a graph"):
        show("graph_self_attention", output=tmp_path)


def test_show_cli_errors(capsys, tmp_path):
    assert main(["show", "cbam", "--image", str(tmp_path / "missing.png")]) == 2
    assert "no file at" in capsys.readouterr().err
    assert main(["show", "cbam", "--query", "999,0", "-o", str(tmp_path)]) == 2
    assert "query" in capsys.readouterr().err
