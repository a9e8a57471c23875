"""`attnzoo compare --task segmentation`: the generated scenes, the scores, the data folder checks,
the query maps, and (slow) a tiny run end to end and a short training that learns."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from attnzoo.demos import segmentation as seg


@pytest.fixture(scope="module")
def scenes():
    return seg.digit_scenes(48, train=24, test=8, seed=3)


def test_scenes_are_deterministic_and_follow_the_seed(scenes):
    again = seg.digit_scenes(48, train=24, test=8, seed=3)
    other = seg.digit_scenes(48, train=24, test=8, seed=4)
    for a, b in zip(scenes, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(scenes[0].masks, other[0].masks)
    train, test = scenes
    assert train.images.shape == (24, 1, 48, 48) and test.masks.shape == (8, 48, 48)
    assert train.masks.dtype == torch.int64 and 0 <= int(train.masks.min()) and int(train.masks.max()) <= 10


def test_every_labelled_pixel_belongs_to_a_digit_of_that_class_drawn_there(scenes):
    for part in scenes:
        d = 16
        for i in range(len(part.masks)):
            allowed = torch.zeros(11, 48, 48, dtype=torch.bool)
            allowed[0] = True
            for label, (top, left) in zip(part.labels[i].tolist(), part.positions[i].tolist()):
                allowed[1 + label, top : top + d, left : left + d] = True
            mask = part.masks[i]
            assert bool(allowed.gather(0, mask[None])[0].all()), f"scene {i}: a label outside its digit's box"
            # the last digit drawn covers what lies under it: a region of its class, on ink
            label, (top, left) = part.labels[i, -1].item(), part.positions[i, -1].tolist()
            window = part.images[i, 0, top : top + d, left : left + d]
            region = mask[top : top + d, left : left + d] == 1 + label
            assert int(region.sum()) >= 40, (
                f"scene {i}: the last digit's region is {int(region.sum())} pixels"
            )
            assert float(window[region].max()) >= seg.STROKE_THRESHOLD


def test_a_scene_checked_by_hand():
    # one 6 x 6 "digit" with a single bright pixel at (2, 3), of class 7, on an 8 x 8 canvas
    digit = torch.zeros(1, 6, 6)
    digit[0, 2, 3] = 0.9
    digit[0, 0, 0] = 0.4  # too faint to be stroke: no label of its own
    scene = seg._scenes(digit, torch.tensor([7]), 1, 8, 1, 0, torch.Generator().manual_seed(0))
    top, left = scene.positions[0, 0].tolist()
    expected = torch.zeros(8, 8, dtype=torch.int64)
    # the stroke pixel widened by DILATION = 2, cut at the digit's 6 x 6 box: rows 0-4, cols 1-5
    expected[top : top + 5, left + 1 : left + 6] = 8
    assert torch.equal(scene.masks[0], expected)
    assert scene.images[0, 0, top + 2, left + 3] == pytest.approx(0.9)
    assert scene.labels.tolist() == [[7]]


def test_scores_against_hand_computed_values():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, seg.IGNORE, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    confusion = seg.confusion_matrix(pred, target, 4)
    # rows: true 0 -> predicted (0, 1, 0, 0)... ; the ignored pixel is left out, class 3 absent
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    miou, pixel_accuracy = seg.scores(confusion)
    # IoU: class 0: 2 / (3 + 3 - 2) = 1/2; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 1 / (2 + 1 - 1) = 1/2
    assert miou == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert pixel_accuracy == pytest.approx(5 / 7)


def test_query_pixel_is_the_centre_of_the_largest_region():
    mask = torch.zeros(1, 8, 8, dtype=torch.int64)
    mask[0, 1:4, 1:4] = 3  # 9 pixels, centre (2, 2)
    mask[0, 6, 6:8] = 5  # 2 pixels
    assert seg.query_pixels(mask) == [(2, 2)]
    assert seg.query_pixels(torch.zeros(1, 6, 6, dtype=torch.int64)) == [(3, 3)]


def test_query_maps_read_the_query_row():
    h = w = 3
    pairwise = torch.softmax(torch.randn(2, 9, 9), dim=-1)
    values = seg._query_values("pairwise", pairwise, [(1, 2), (0, 0)], h, w)
    torch.testing.assert_close(values[0].flatten(), pairwise[0, 5] * 9)
    torch.testing.assert_close(values[1].flatten(), pairwise[1, 0] * 9)
    # criss-cross (B, H, W, H + W): the column's weights, then the row's
    cross = torch.zeros(1, h, w, h + w)
    cross[0, 1, 2] = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.25, 0.15])
    grid = seg._query_values("criss_cross", cross, [(1, 2)], h, w)[0] / (h + w - 1)
    expected = torch.tensor([[0.0, 0.0, 0.1], [0.3, 0.25, 0.15], [0.0, 0.0, 0.2]])
    torch.testing.assert_close(grid, expected)


def _write_folder(root, masks, mode="L"):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, mask in enumerate(masks):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "images" / f"img{i}.png")
        Image.fromarray(mask.astype("uint8")).convert(mode).save(root / "masks" / f"img{i}.png")


def test_a_folder_of_images_and_label_maps(tmp_path):
    import numpy as np

    masks = [np.zeros((8, 8)) for _ in range(5)]
    masks[0][:4] = 2
    masks[1][0, 0] = 255  # ignored
    _write_folder(tmp_path, masks)
    data = seg.load_segmentation_folder(tmp_path, 16)
    assert data.classes == ["0", "1", "2"]
    assert data.train_x.shape == (4, 3, 16, 16) and data.test_y.shape == (1, 16, 16)
    labels = torch.cat([data.train_y, data.test_y])
    assert set(labels.unique().tolist()) == {seg.IGNORE, 0, 2}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "is not a directory"),
        (lambda root: (root / "images").mkdir(parents=True), "masks missing"),
        (lambda root: _write_folder(root, [__import__("numpy").ones((8, 8))] * 3), "only class 0"),
        (
            lambda root: _write_folder(root, [__import__("numpy").ones((8, 8))] * 3, mode="RGB"),
            "not a label map",
        ),
    ],
)
def test_folder_mistakes_are_one_line(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    if message == "only class 0":
        for file in (root / "masks").iterdir():  # all zeros
            from PIL import Image

            Image.new("L", (8, 8), 0).save(file)
    with pytest.raises(ValueError, match=message) as error:
        seg.load_segmentation_folder(root, 16)
    assert "\n" not in str(error.value)


def test_unmatched_stems_are_named(tmp_path):
    import numpy as np

    _write_folder(tmp_path, [np.eye(8)] * 3)
    (tmp_path / "masks" / "img1.png").rename(tmp_path / "masks" / "other.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) without a mask of the same stem: img1"):
        seg.load_segmentation_folder(tmp_path, 16)


def _args(**overrides):
    values = dict(
        mechanisms=None, epochs=None, seeds=[0], image_size=None, depth=None, width=None, batch_size=None,
        lr=None, data=None, limit=None, output=None, threads=None, workers=None, device="cpu", quiet=True,
        set=[], upsample=None,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def test_defaults_and_the_full_set_one_option_away():
    config = seg.config_from_args(_args())
    assert tuple(config.mechanisms) == seg.DEFAULT_SEGMENTATION_MECHANISMS
    assert config.output == "reports/compare-segmentation"
    assert (
        tuple(seg.config_from_args(_args(mechanisms=["all"])).mechanisms) == seg.ALL_SEGMENTATION_MECHANISMS
    )
    with pytest.raises(ValueError, match="not among the compared"):
        seg.config_from_args(_args(mechanisms=["none"], set=[("danet", {"rd_ratio": 0.5})]))


@pytest.mark.slow
def test_a_tiny_run_end_to_end(tmp_path):
    config = seg.SegmentationConfig(
        mechanisms=["none", "danet", "gc"], epochs=1, seeds=[0], limit=16, test_scenes=8, train_scenes=16,
        output=str(tmp_path), workers=1, progress=False, latency_batch=2, sample_images=2, upsample="carafe",
    )  # fmt: skip
    results, data, maps = seg.run_segmentation(config)
    report = seg.write_report(results, data, maps, config)
    text = report.read_text()
    assert "| danet | head |" in text and "| gc | backbone |" in text
    assert maps["danet"].query_specific and not maps["gc"].query_specific and maps["none"] is None
    for picture in ("masks.png", "attention.png", "training_curves.png"):
        assert (tmp_path / picture).stat().st_size > 1000
    model, checkpoint = seg.load_trained(tmp_path / "models" / "danet.pt")
    torch.testing.assert_close(model(checkpoint["samples"]), results[1].model.eval()(checkpoint["samples"]))
    assert all(r.mflops > 0 and r.params > 0 and len(r.latency_samples_ms) > 0 for r in results)


@pytest.mark.slow
def test_a_short_training_learns_above_chance():
    # chance: every pixel background, mIoU = the background's IoU (its share) over 11 classes, about
    # 0.072; 8 epochs (half the default budget) reach 0.12-0.13 (the default's 16 about 0.23): the
    # digits' regions are found, their identity only begins to be learned
    config = seg.SegmentationConfig(mechanisms=["none"], epochs=8, seeds=[0], progress=False, workers=1)
    data = seg.load_dataset(config)
    run = seg._train_run("none", 0, (config, data, seg.DistInfo()), _Quiet())
    background_share = float((data.test_y == 0).float().mean())
    assert run.curve[-1] > 1.4 * background_share / 11
    assert run.curve[-1] > run.curve[0]
    assert run.pixel_accuracy > background_share + 0.01


class _Quiet:
    def update(self, label: str, *, advance: bool = True) -> None:
        pass


def test_cross_entropy_ignores_the_ignore_value():
    # the folder's 255 becomes IGNORE, which the training loss (F.cross_entropy) leaves out
    logits = torch.randn(1, 3, 1, 2)
    target = torch.tensor([[[1, seg.IGNORE]]])
    assert F.cross_entropy(logits, target) == pytest.approx(
        float(F.cross_entropy(logits[..., :1], target[..., :1]))
    )


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_result(tmp_path):
    import importlib.util
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    script_path = Path(__file__).with_name("ddp_segmentation_script.py")
    spec = importlib.util.spec_from_file_location("ddp_segmentation_script", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.set_num_threads(1)
    _, single = script.train(script.CONFIG)
    out = tmp_path / "ddp.pt"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
        str(port), str(script_path), str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = torch.load(out)
    # global batches of 6 split 3 + 3 (the last one 3 = 2 + 1): equal up to reduction order
    assert parallel["losses"] == pytest.approx(single["losses"], rel=1e-9)
    assert parallel["curve"] == single["curve"]
    for name, value in single["state"].items():
        torch.testing.assert_close(parallel["state"][name], value, rtol=1e-7, atol=1e-9, msg=name)
