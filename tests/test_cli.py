"""The `attnzoo` command."""

from __future__ import annotations

import json
import subprocess
import sys
import time

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
        assert row["forward_q1_ms"] <= row["forward_ms"] <= row["forward_q3_ms"]  # the spread
        assert row["train_gflops"] > row["gflops"]  # the backward is counted too
    # the projections (4 x 2 B N E^2) and the fused attention core (4 B N^2 E) are counted
    assert rows[0]["gflops"] * 1e9 == 4 * 2 * 2 * 8 * 16 * 16 + 4 * 2 * 8 * 8 * 16


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
    assert main(["bench", "cbam*", "--batch", "2", "--repeats", "1", "--warmup", "0", "--extent", "8"]) == 0
    captured = capsys.readouterr()
    assert "| cbam_channel" in captured.out and "fwd+bwd ms [IQR]" in captured.out
    assert "peak MiB: memory the forward pass adds over the idle process" in captured.out


def test_bench_batch_of_one_measures_what_it_can(capsys):
    # BAM's BatchNorm cannot train on one image: its forward is measured, the rest of the run goes on
    argv = [
        "bench",
        "bam",
        "se",
        "--batch",
        "1",
        "--extent",
        "8",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
        "-q",
    ]
    assert main(argv) == 0
    bam, se = json.loads(capsys.readouterr().out)
    assert bam["forward_ms"] > 0 and bam["train_ms"] is None and "batch of more than 1" in bam["notes"][0]
    assert se["train_ms"] > 0 and not se["notes"]


def test_bench_bfloat16_is_timed_against_float32(capsys):
    argv = ["bench", "mha", "--dtype", "bfloat16", "--batch", "2", "--width", "16", "--extent", "8",
            "--repeats", "3", "--warmup", "0", "--json", "-q"]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["dtype"] == "bfloat16" and row["float32_forward_ms"] > 0
    speedup = row["speedup_vs_float32_forward"]
    assert speedup["low"] <= speedup["median"] <= speedup["high"]


@pytest.mark.slow
def test_bench_compile_reports_compiled_figures(capsys):
    argv = ["bench", "se", "--compile", "--batch", "2", "--width", "16", "--extent", "8", "--repeats", "3",
            "--warmup", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "compiled fwd ms" in out and "compile s" in out and "gain" in out


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


def attnzoo(*argv: str, env: dict | None = None, cwd=None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "attnzoo", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )
    return result, time.perf_counter() - start


# Every mistake a new user makes: one line, exit 2, no traceback, and before any work (a start-up
# of a few seconds, where training would take minutes).
MISTAKES = [
    (["bench", "--batch", "0"], "expected a positive integer, got 0"),
    (["bench", "se", "--warmup", "-1"], "expected a count >= 0, got -1"),
    (["bench", "se", "--device", "bogus"], "expected a device such as cpu, cuda or cuda:0"),
    (["compare", "--device", "bogus"], "expected a device such as cpu, cuda or cuda:0"),
    (["list", "zz*"], "no registered module matches 'zz*'"),
    (["show", "cbam", "--query", "-1,-1"], "expected a cell Y,X with Y, X >= 0"),
    (["show", "cbam", "--query", "1"], "expected Y,X"),
    (["compare", "--mechanisms", "mha"], "'mha' is not a block for a CNN"),
    (["compare", "--mechanisms", ","], "expected comma-separated names"),
    (["compare", "--mechanisms", "none,cbamm"], "did you mean 'cbam'"),
    (["compare", "--mechanisms", "se,se"], "se listed more than once"),
    (["compare", "--set", "nonlocal.sub_sample=False"], "did you mean 'non_local'"),
    (["compare", "--set", "non_local.sub_sampl=False"], "options: "),
    (["compare", "--set", "non_local.sub_sample=maybe"], "expected bool, got str"),
    (["compare", "--set", "eca.kernel_size=3.5"], "expected int"),
    (["compare", "--mechanisms", "none,se", "--set", "cbam.rd_ratio=0.5"], "not among the compared"),
    (["compare", "--set", "se.rd_ratio=3"], "cannot be built into ResNet-8"),
    (["compare", "--depth", "9"], "depth: expected one of"),
    (["compare", "--task", "segmentation", "--mechanisms", "mha"], "not a module for a segmentation network"),
    (["compare", "--task", "segmentation", "--mechanisms", "carafe"], "is an upsampler"),
    (["compare", "--task", "segmentation", "--mechanisms", "dnl,dnl"], "dnl listed more than once"),
    (["compare", "--task", "segmentation", "--depth", "20"], "(a dilated ImageNet ResNet), got 20"),
    (["compare", "--task", "segmentation", "--image-size", "50"], "multiple of the output stride 8"),
    (["compare", "--task", "segmentation", "--mechanisms", "all", "--set", "dgmn.groups=.5"], "expected int"),
    (["compare", "--task", "segmentation", "--set", "cgnl.groups=5"], "cannot be built into the"),
    (["compare", "--task", "segmentation", "--data", "/nonexistent-folder"], "is not a directory"),
    (["compare", "--task", "segmentation", "--upsample", "nearest"], "invalid choice: 'nearest'"),
    (["compare", "--upsample", "carafe"], "--upsample applies to --task segmentation"),
    (["compare", "-o", "/proc/attnzoo-report"], "cannot write the report to '/proc/attnzoo-report'"),
    (["translate", "-o", "/proc/attnzoo-report"], "cannot write the report to '/proc/attnzoo-report'"),
    (["bench", "se", "-o", "/nonexistent-folder/x.csv"], "the folder '/nonexistent-folder' does not exist"),
    (["show", "se", "--from", "/nonexistent-report"], "no report folder at /nonexistent-report"),
    (["show", "cbam", "--image", "/nonexistent.png"], "image: no file at /nonexistent.png"),
    (["show", "graph_self_attention"], "per-edge weights of a graph"),
    (["compare", "--lengths", "64"], "--lengths applies to --task sequence"),
    (["compare", "--task", "sequence", "--mechanisms", "cbam"], "not a sequence self-attention layer"),
    (["compare", "--task", "sequence", "--mechanisms", "mha,linformr"], "did you mean 'linformer'"),
    (["compare", "--task", "sequence", "--tasks", "sorting"], "tasks: expected names among listops"),
    (["compare", "--task", "sequence", "--lengths", "4"], "lengths: expected integers >= 8, got 4"),
    (["compare", "--task", "sequence", "--cost-lengths", "256,256"], "256 listed twice"),
    (["compare", "--task", "sequence", "--set", "linformer.max_seq_len=9"], "set by the encoder"),
    (["compare", "--task", "sequence", "--set", "sha.variantt=1"], "options: "),
    (["compare", "--task", "sequence", "--set", "synthesizer.synthesizer=x"], "cannot be built into the"),
    (["compare", "--task", "sequence", "--mechanisms", "mha", "--set", "sha.eps=0.1"], "not among the"),
    (["compare", "--task", "sequence", "--data", "/nonexistent.tsv"], "data: no file at /nonexistent.tsv"),
    (["compare", "--task", "sequence", "--data", "x.tsv", "--lengths", "64"], "drop them with --data"),
]


# One interpreter runs them all (a start-up each would cost minutes of the suite): each call's
# stderr, exit status and time are recorded by the child and checked here.
_RUN_MISTAKES = """
import contextlib, io, json, sys, time, traceback
from attnzoo.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        except BaseException:
            traceback.print_exc()
            code = None
    out.append({"code": code, "err": err.getvalue(), "seconds": time.perf_counter() - start})
print(json.dumps(out))
"""


def test_mistakes_end_in_one_line_before_any_work(tmp_path):
    argvs = [argv for argv, _ in MISTAKES]
    result = subprocess.run(
        [sys.executable, "-c", _RUN_MISTAKES, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # a default report folder lands there
    )
    assert result.returncode == 0, result.stderr
    for (argv, message), outcome in zip(MISTAKES, json.loads(result.stdout), strict=True):
        lines = outcome["err"].strip().splitlines()
        assert outcome["code"] == 2, (argv, outcome)
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in outcome["err"], (argv, outcome)
        # before any work: parsing, names, loading the data and a trial build of the networks (a
        # few seconds on a quiet machine), where training the default comparison takes minutes
        assert outcome["seconds"] < 60, (argv, outcome)  # generous: the test machine is shared


def test_cuda_without_cuda_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for command in ("bench", "compare"):
        result, _ = attnzoo(command, "--device", "cuda")
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert "CUDA is not available on this machine" in result.stderr


def test_not_an_image_is_one_line(tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("not a picture")
    result, _ = attnzoo("show", "cbam", "--image", str(fake), "-o", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is not an image" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["compare"], ["show", "cbam"], ["translate"]])
def test_a_missing_demo_extra_is_named(command):
    # matplotlib made unimportable: what a machine without `attnzoo[demo]` sees
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        f"from attnzoo.cli import main; sys.exit(main({command!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "needs the demo extra (missing: matplotlib): pip install 'attnzoo[demo]'" in result.stderr
    assert f"attnzoo {command[0]} needs" in result.stderr


def test_info_shows_every_match(capsys):
    assert main(["info", "cbam*"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: " in out for name in ("cbam", "cbam_channel", "cbam_spatial"))


def test_a_closed_pipe_ends_quietly():
    # `attnzoo list | head -1`: the reader goes away. It is closed before the command writes
    # anything (the import alone takes seconds): reading a line first raced with a listing small
    # enough to fit the pipe's buffer, which then ended normally
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnzoo", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert err == b"" and proc.returncode == 141


def test_help_does_not_import_the_demos():
    code = (
        "import sys\nfrom attnzoo.cli import build_parser\nbuild_parser()\n"
        "heavy = [m for m in sys.modules if m.startswith(('attnzoo.demos.', 'matplotlib', 'sklearn'))]\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_show_writes_the_file_it_is_given(tmp_path):
    result, _ = attnzoo("show", "cbam", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.png").is_file() and not (tmp_path / "x.png" / "cbam.png").exists()
