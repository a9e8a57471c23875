"""The `attnzoo` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnzoo.cli import main


def test_list_shows_every_registered_module(capsys):
    import attnzoo

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in attnzoo.list_modules():
        assert f"\n{name} " in out
    assert "Attention Is All You Need" in out


def test_list_by_family(capsys):
    assert main(["list", "--family", "gating"]) == 0
    out = capsys.readouterr().out
    assert "se " in out and "\nmha " not in out


def test_info(capsys):
    assert main(["info", "mha"]) == 0
    out = capsys.readouterr().out
    for field in ("paper", "equation", "defaults", "inputs", "output", "params", "cost", "1706.03762"):
        assert field in out


def test_bench_json_has_every_measure(capsys):
    assert (
        main(
            [
                "bench",
                "mha",
                "se",
                "--batch",
                "2",
                "--width",
                "16",
                "--extent",
                "8",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["mha", "se"]
    for row in rows:
        assert row["params"] > 0 and row["forward_ms"] > 0 and row["train_ms"] > 0 and row["gflops"] >= 0
        assert row["width"] == 16 and row["extent"] == 8 and row["batch"] == 2
    assert rows[0]["gflops"] > 0  # the projections and attention are counted


def test_bench_csv_and_table(capsys, tmp_path):
    target = tmp_path / "out.csv"
    assert (
        main(
            [
                "bench",
                "se",
                "--batch",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--csv",
                "-o",
                str(target),
                "--quiet",
            ]
        )
        == 0
    )
    assert target.read_text().splitlines()[0].startswith("name,batch,width")
    assert main(["bench", "cbam*", "--batch", "1", "--repeats", "1", "--warmup", "0"]) == 0
    captured = capsys.readouterr()
    assert "| cbam_channel" in captured.out and "fwd+bwd ms" in captured.out
    assert "3/3" not in captured.err and "2/3 cbam_spatial" in captured.err  # progress lines


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "mhaa"], "did you mean 'mha'"),
        (["info", "nope"], "unknown attention module 'nope'"),
        (["bench", "mha", "--width", "30", "--quiet"], "num_heads: expected a divisor of embed_dim=30"),
        (["bench", "zz*"], "no registered module matches 'zz*'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_bad_size_is_rejected_by_the_parser():
    result = subprocess.run(
        [sys.executable, "-m", "attnzoo", "bench", "--batch", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "expected a positive integer, got 0" in result.stderr
    assert "Traceback" not in result.stderr
