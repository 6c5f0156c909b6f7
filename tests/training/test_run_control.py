"""pretrain_gpt.py run control end to end: a run killed with SIGKILL resumes to bit-identical
losses; SIGTERM (Slurm's pre-emption warning) with --exit-signal-handler saves and exits cleanly;
non-finite steps are skipped with a warning and the run stops after N in a row."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --swiglu "
    "--normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
    "--lpa-attn-rank 16 --mock-data --vocab-size 128 --micro-batch-size 4 --global-batch-size 8 "
    "--lr 1e-3 --lr-warmup-iters 2 --hidden-dropout 0.1 --attention-dropout 0.1 --log-interval 1 "
    "--eval-iters 0 --num-workers 0 --seed 5"
).split()


def start(tmp: Path, name: str, *flags: str) -> tuple:
    log = tmp / f"{name}.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pretrain_gpt.py"), *TINY, *flags, "--log-jsonl", str(log)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, log


def losses(log: Path) -> dict:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return {r["iteration"]: r["lm loss"] for r in records if r["split"] == "train"}


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_then_resume_gives_identical_losses(tmp_path):
    reference, ref_log = start(tmp_path, "reference", "--train-iters", "8")
    assert reference.wait(timeout=180) == 0, reference.stdout.read()
    expected = losses(ref_log)
    assert sorted(expected) == list(range(1, 9))

    save = tmp_path / "ckpt"
    pointer = save / "latest_checkpointed_iteration.txt"
    flags = ["--train-iters", "8", "--save", str(save), "--load", str(save), "--save-interval", "2"]
    killed, _ = start(tmp_path, "killed", *flags)
    wait_for(lambda: pointer.is_file() and int(pointer.read_text()) >= 4, killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed_from = int(pointer.read_text())

    resumed, resumed_log = start(tmp_path, "resumed", *flags)
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output
    assert f"Resumed from {save} at iteration {resumed_from}" in output
    got = losses(resumed_log)
    assert sorted(got) == list(range(resumed_from + 1, 9))
    assert got == {it: expected[it] for it in got}  # bit-identical


def test_log_lines_average_every_step_once(tmp_path):
    """Between log lines the host reads each step's numbers a step late; none is lost or doubled."""
    every, every_log = start(tmp_path, "every", "--train-iters", "7")
    assert every.wait(timeout=180) == 0, every.stdout.read()
    sparse, sparse_log = start(tmp_path, "sparse", "--train-iters", "7", "--log-interval", "3")
    assert sparse.wait(timeout=180) == 0, sparse.stdout.read()
    each, logged = losses(every_log), losses(sparse_log)
    assert sorted(logged) == [3, 6, 7]
    for last, steps in ((3, (1, 2, 3)), (6, (4, 5, 6)), (7, (7,))):
        assert logged[last] == pytest.approx(sum(each[it] for it in steps) / len(steps), rel=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    save = tmp_path / "ckpt"
    run, log = start(
        tmp_path,
        "run",
        "--train-iters",
        "100000",
        "--save",
        str(save),
        "--save-interval",
        "2",
        "--exit-signal-handler",
    )
    wait_for(lambda: log.is_file() and len(losses(log)) >= 3, run)
    # To the whole process group, as torchrun and Slurm deliver it: the checkpoint writer's helper
    # process, started by the save at iteration 2, gets it too and must survive it.
    os.killpg(run.pid, signal.SIGTERM)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 0, output
    stopped_at = max(losses(log))
    assert f"Exiting at iteration {stopped_at}" in output
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == stopped_at
    assert (save / f"iter_{stopped_at:07d}").is_dir()


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    # An absurd learning rate: the first update makes the weights overflow.
    run, log = start(
        tmp_path,
        "diverging",
        "--train-iters",
        "50",
        "--lr",
        "1e30",
        "--clip-grad",
        "0",
        "--max-nonfinite-steps",
        "3",
    )
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0
    assert output.count("non-finite loss or gradient, step skipped") == 3
    assert "Stopping: 3 steps in a row had a non-finite loss or gradient. Lower --lr" in output
    logged = losses(log)
    # The third skipped step in a row stops the run before its own log line.
    assert sum(math.isnan(loss) for loss in logged.values()) == 2
    assert all(math.isfinite(logged[it]) for it in range(1, min(logged) + 1))
