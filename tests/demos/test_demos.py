"""The main job and demos: compare, translate and show write what they promise, reproducibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnzoo.cli import main
from attnzoo.demos.compare import CompareConfig, run_compare, spatial_map, write_report

PIL = pytest.importorskip("PIL.Image")


def png_size(path: Path) -> tuple[int, int]:
    with PIL.open(path) as image:
        return image.size


def tiny_compare(tmp_path: Path, **overrides) -> CompareConfig:
    config = dict(
        mechanisms=["none", "cbam"], epochs=1, seeds=[0, 1], depth=20, width=4, batch_size=32,
        limit=96, output=str(tmp_path / "report"), progress=False, sample_images=3,
    )  # fmt: skip
    config.update(overrides)
    return CompareConfig(**config)


def test_compare_writes_report_plots_and_maps(tmp_path):
    config = tiny_compare(tmp_path)
    results, data, heatmaps = run_compare(config)
    report = write_report(results, data, heatmaps, config)
    text = report.read_text()
    for name in config.mechanisms:
        assert f"| {name} |" in text
    assert "Δ acc" in text and "cluttered digits" in text
    for png in ("accuracy_vs_cost.png", "training_curves.png", "attention_maps.png"):
        width, height = png_size(report.parent / png)
        assert width >= 300 and height >= 200, png
        assert png in text
    # one row of maps per mechanism plus the inputs; cbam has spatial maps, none has none
    assert heatmaps["none"] is None and heatmaps["cbam"].shape == (3, 32, 32)
    assert float(heatmaps["cbam"].min()) >= 0 and float(heatmaps["cbam"].max()) <= 1
    saved = json.loads((report.parent / "results.json").read_text())
    assert [r["name"] for r in saved["results"]] == ["none", "cbam"]
    cbam = results[1]
    assert cbam.params > results[0].params and cbam.mflops > 0 and cbam.latency_ms > 0
    assert all(r.latency_ms > 0 and r.peak_mib > 0 for r in results)  # the plain network's too
    assert len(cbam.accuracies) == 2 and all(0 <= a <= 1 for a in cbam.accuracies)


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


def test_compare_cli_rejects_unknown_mechanisms(capsys):
    assert main(["compare", "--mechanisms", "none,cbamm", "--quiet"]) == 2
    assert "did you mean 'cbam'" in capsys.readouterr().err


def test_spatial_map_understands_each_layout():
    assert spatial_map(torch.rand(2, 8, 1, 1), 16) is None  # channel gates
    assert spatial_map(torch.rand(2, 1, 4, 4), 16).shape == (2, 16, 16)
    assert spatial_map({"channel": torch.rand(2, 8, 1, 1), "spatial": torch.rand(2, 1, 4, 4)}, 8).shape == (
        2,
        8,
        8,
    )
    assert spatial_map(torch.softmax(torch.rand(2, 16, 16), -1), 8).shape == (2, 8, 8)  # pairwise
    # sub-sampled keys (non-local's pooled phi): 64 queries on 8x8, 16 keys on 4x4
    keys = torch.zeros(1, 64, 16)
    keys[..., 6] = 1.0  # every query attends to key (row 1, column 2) of the 4x4 grid
    heat = spatial_map(keys, 8)
    # on the 8x8 image: rows 2-3, columns 4-5; rows and columns swapped would light (4-5, 2-3)
    assert heat.shape == (1, 8, 8) and heat[0, 2:4, 4:6].min() > heat[0, 4:6, 2:4].max()
    assert spatial_map(torch.rand(2, 1, 16), 8).shape == (2, 8, 8)  # pooling weights


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


@pytest.mark.parametrize("name", ["cbam", "mha", "se"])
def test_show_draws_maps(tmp_path, name):
    from attnzoo.demos.show import show

    path = show(name, output=tmp_path)
    width, height = png_size(path)
    assert width >= 500 and height >= 200


def test_show_cli_errors(capsys, tmp_path):
    assert main(["show", "cbam", "--image", str(tmp_path / "missing.png")]) == 2
    assert "no file at" in capsys.readouterr().err
    assert main(["show", "cbam", "--query", "999,0", "-o", str(tmp_path)]) == 2
    assert "query" in capsys.readouterr().err
