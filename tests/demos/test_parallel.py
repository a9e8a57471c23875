"""Training runs in parallel worker processes give the results of the same runs in this process."""

from __future__ import annotations

import pytest
import torch

from attnzoo.cli import _setting, main
from attnzoo.demos.compare import (
    CompareConfig,
    Dataset,
    _train_run,
    build_model,
    load_dataset,
    map_row,
    run_compare,
)
from attnzoo.demos.distributed import DistInfo
from attnzoo.demos.parallel import plan_workers, run_jobs


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # run_compare sets the count it was given


def test_plan_workers_splits_threads_between_jobs():
    assert plan_workers(jobs=16, threads=2, workers=None) == (2, 1)  # one worker per thread
    assert plan_workers(jobs=1, threads=2, workers=None) == (1, 2)  # a single run keeps both
    assert plan_workers(jobs=3, threads=8, workers=None) == (3, 2)
    assert plan_workers(jobs=16, threads=8, workers=2) == (2, 4)
    assert plan_workers(jobs=16, threads=1, workers=4) == (4, 1)  # never fewer than one thread
    with pytest.raises(ValueError, match="workers: expected a positive count, got 0"):
        plan_workers(jobs=4, threads=2, workers=0)


def test_workers_give_the_in_process_result(tmp_path, restore_threads):
    config = dict(
        mechanisms=["none", "cbam_spatial"], epochs=1, seeds=[0, 1], depth=8, width=4, limit=64,
        output=str(tmp_path), progress=False, sample_images=2,
    )  # fmt: skip
    # two workers of one thread each against one process of one thread: the same runs, bit for bit
    parallel, _, parallel_maps = run_compare(CompareConfig(**config, threads=2, workers=2))
    serial, _, serial_maps = run_compare(CompareConfig(**config, threads=1, workers=1))
    for ours, theirs in zip(parallel, serial, strict=True):
        assert ours.name == theirs.name
        assert ours.curves == theirs.curves and ours.losses == theirs.losses
        assert ours.params == theirs.params and ours.mflops == theirs.mflops
    torch.testing.assert_close(
        parallel_maps["cbam_spatial"].values, serial_maps["cbam_spatial"].values, rtol=0, atol=0
    )


def test_a_failing_worker_run_raises_here(restore_threads):
    config = CompareConfig(
        mechanisms=["none"], epochs=1, seeds=[0], depth=8, width=4, limit=8, progress=False
    )
    data = Dataset(torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), torch.zeros(2, 1, 8, 8),
                   torch.zeros(2, dtype=torch.long), ["a", "b"], "blank")  # fmt: skip

    class Sink:
        def update(self, label, *, advance=True):
            pass

    with pytest.raises(KeyError, match="no_such_mechanism"):
        run_jobs(_train_run, [("none", 0), ("no_such_mechanism", 0)], shared=(config, data, DistInfo()),
                 workers=2, threads=1, progress=Sink())  # fmt: skip


def test_mechanism_options_reach_the_modules():
    config = CompareConfig(mechanisms=["non_local"], limit=8)
    data = load_dataset(config)
    model = build_model("non_local", config, data)
    blocks = [m for m in model.modules() if type(m).__name__ == "NonLocalBlock"]
    assert blocks and all(b.sub_sample for b in blocks)  # the paper's sub-sampling, on by default
    assert map_row(model, data.test_x[:2]).values.shape == (2, 32, 32)  # maps over pooled keys
    config.attention_kwargs["non_local"] = {"sub_sample": False}
    model = build_model("non_local", config, load_dataset(config))
    assert not any(m.sub_sample for m in model.modules() if type(m).__name__ == "NonLocalBlock")


def test_set_option_parsing(capsys):
    assert _setting("non_local.sub_sample=False") == ("non_local", {"sub_sample": False})
    assert _setting("eca.kernel_size=5") == ("eca", {"kernel_size": 5})
    assert _setting("gc.pooling=avg") == ("gc", {"pooling": "avg"})
    with pytest.raises(SystemExit):
        main(["compare", "--set", "sub_sample=False"])
    assert "expected NAME.KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_at_once(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "attnzoo", "compare", "--epochs", "3", "--workers", "2",
               "--threads", "2", "--limit", "600", "-o", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job ignores it
    )  # fmt: skip
    wait_for(proc, "epoch 1/3")  # the workers are training
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the CLI and its workers together
    start = time.perf_counter()
    _, err = proc.communicate(timeout=60)
    # an executor would first finish the runs already queued to the workers (tens of seconds)
    assert time.perf_counter() - start < 10
    assert proc.returncode == 130 and "attnzoo: interrupted" in err.decode()
    assert "Traceback" not in err.decode()  # the workers ignore Ctrl-C: the parent stops them


def wait_for(proc, text: str, timeout: float = 300) -> None:
    """Read the process's stderr until ``text`` appears (the progress bar redraws with \\r, not
    lines)."""
    import os
    import time

    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen:
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk and time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
        seen += chunk


def _children(pid: int) -> list[int]:
    import os

    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:  # field 4 of stat: the parent's pid
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "attnzoo", "compare", "--epochs", "5", "--workers", "2",
               "--threads", "2", "--limit", "600", "-o", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(proc, "epoch 1/5")  # the workers are training
    workers = [pid for pid in _children(proc.pid) if _alive(pid)]
    assert len(workers) >= 2
    proc.send_signal(signal.SIGKILL)  # no cleanup at all: what the out-of-memory killer does
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)
