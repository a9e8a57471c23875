"""`attnzoo compare --task sequence`: the slope fit, the data-file reader, the training of a
known-good model, data-parallel training, and a tiny run from the command line to the report."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnzoo.cli import main
from attnzoo.demos.distributed import DistInfo
from attnzoo.demos.parallel import ProgressSink
from attnzoo.demos.sequence_compare import SequenceConfig, _train, check_config, loglog_slope
from attnzoo.demos.sequence_tasks import listops, read_sequences

SCRIPT = Path(__file__).with_name("ddp_sequence_script.py")


class _Silent(ProgressSink):
    def update(self, label: str, *, advance: bool = True) -> None:
        pass


@pytest.mark.parametrize("power", [1.0, 2.0, 1.5])
def test_slope_recovers_an_analytic_power_law(power: float) -> None:
    lengths = [256, 512, 1024, 2048, 4096]
    assert loglog_slope(lengths, [3.7 * n**power for n in lengths]) == pytest.approx(power, abs=1e-12)
    # a fixed cost on top bends the curve below its exponent at short lengths
    assert loglog_slope(lengths, [1e6 + n**power for n in lengths]) < power


def test_slope_needs_two_positive_points() -> None:
    with pytest.raises(ValueError, match="two distinct lengths"):
        loglog_slope([256], [1.0])
    with pytest.raises(ValueError, match="positive"):
        loglog_slope([256, 512], [0.0, 1.0])


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_data_file_is_read_into_a_task(tmp_path: Path) -> None:
    lines = ["# a comment", "pos\ta b c", "", "neg\tb", "pos\tc c a b", "neg\ta"] + [
        f"neg\tx{i}" for i in range(6)
    ]
    task = read_sequences(_write(tmp_path / "mine.tsv", "\n".join(lines) + "\n"))
    assert task.classes == ("neg", "pos") and task.num_classes == 2
    assert task.length == 5  # <cls> and the longest sequence's four tokens
    assert len(task.train_labels) + len(task.test_labels) == 10 and len(task.test_labels) == 2
    tokens = torch.cat([task.train_tokens, task.test_tokens])
    labels = torch.cat([task.train_labels, task.test_labels])
    assert (tokens[:, 0] == 1).all()  # <cls> first
    # "c c a b" is the only sequence of four tokens: its row reads back, unpadded, with label pos
    row = next(r for r in tokens if (r != 0).sum() == 5)
    assert [task.vocab[int(t)] for t in row] == ["<cls>", "c", "c", "a", "b"]
    assert labels[(tokens == row).all(1)].item() == task.classes.index("pos")
    # "b" is padded at the end
    short = next(r for r in tokens if [task.vocab[int(t)] for t in r[:2]] == ["<cls>", "b"])
    assert short[2:].eq(0).all()


@pytest.mark.parametrize(
    "text, message",
    [
        ("pos\ta b\nneg a b\n", "line 2: expected LABEL<TAB>TOKENS, found no tab"),
        ("pos\ta b\n\tb\n", "line 2: empty label"),
        ("pos\ta b\nneg\t  \n", "line 2: no tokens after the label 'neg'"),
        ("pos\ta\npos\tb\npos\tc\n", "one class only ('pos')"),
        ("pos\ta\n", "expected at least two examples, found 1"),
    ],
)
def test_bad_data_files_name_the_line_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_sequences(_write(tmp_path / "bad.tsv", text))


def test_missing_and_binary_data_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no file at"):
        read_sequences(tmp_path / "absent.tsv")
    (tmp_path / "binary.tsv").write_bytes(b"pos\t\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_sequences(tmp_path / "binary.tsv")


def test_bad_data_file_is_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _write(tmp_path / "bad.tsv", "pos\ta b\nneg a b\n")
    assert main(["compare", "--task", "sequence", "--data", str(bad), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 2" in err
    assert not (tmp_path / "r").exists()  # nothing was written


def test_options_the_encoder_sets_are_refused() -> None:
    config = SequenceConfig(mechanisms=["linformer"], attention_kwargs={"linformer": {"max_seq_len": 9}})
    with pytest.raises(ValueError, match="set by the encoder"):
        check_config(config)
    # the graph layer's own option (the partition arity) is accepted
    check_config(
        SequenceConfig(mechanisms=["graph_self_attention"], lengths=[16], cost_lengths=[16],
                       attention_kwargs={"graph_self_attention": {"k": 2}})
    )  # fmt: skip


@pytest.mark.slow
def test_known_good_model_learns_listops_at_a_short_length() -> None:
    """mha trained by the compare's own loop rises far above the majority class on ListOps at
    length 16 (the task is solvable; retrieval: tests/models/test_encoder.py)."""
    config = SequenceConfig(mechanisms=["mha"], epochs=8, batch_size=32, lr=3e-3, embed_dim=32, num_heads=2)
    task = listops(16, 1000, 300, seed=0, depth=1)
    majority = torch.bincount(task.test_labels).max().item() / len(task.test_labels)
    accuracy = _train("mha", task, 0, config, DistInfo(), _Silent()).accuracy
    assert accuracy > majority + 0.15, (accuracy, majority)


def test_tiny_run_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    argv = ["compare", "--task", "sequence", "--mechanisms", "mha,gated_mha", "--tasks", "listops",
            "--lengths", "16", "--cost-lengths", "16,32", "--epochs", "1", "--seeds", "0", "--limit", "32",
            "--workers", "2", "--set", "gated_mha.noise=sample", "-o", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "listops @ 16" in printed and "time slope" in printed
    report = (out / "report.md").read_text()
    assert "heads kept by prune()" in report and "gated_mha(noise='sample')" in report
    for picture in ("accuracy_vs_length.png", "cost_vs_length.png", "attention_maps.png"):
        assert (out / picture).stat().st_size > 10_000, picture
    results = json.loads((out / "results.json").read_text())
    assert {o["mechanism"] for o in results["outcomes"]} == {"mha", "gated_mha"}
    assert [p["length"] for p in results["costs"]["mha"]] == [16, 32]
    assert all(p["step_ms"] and p["train_mflops"] > p["mflops"] > 0 for p in results["costs"]["mha"])
    gated = next(o for o in results["outcomes"] if o["mechanism"] == "gated_mha")
    assert len(gated["heads_kept"]) == 2 and 0 <= gated["pruned_accuracy"] <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path: Path) -> None:
    """Under torchrun the training is data-parallel with the single-process result (the encoder
    has no BatchNorm: equal up to reduction order)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_sequence_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.set_num_threads(1)
    single = script.train()
    out = tmp_path / "ddp.json"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(SCRIPT), str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = json.loads(out.read_text())
    assert len(parallel["losses"]) == len(single["losses"]) == 2
    for a, b in zip(parallel["losses"], single["losses"]):
        assert math.isclose(a, b, rel_tol=1e-4), (parallel, single)
    assert parallel["curve"] == pytest.approx(single["curve"], abs=1 / 40)
