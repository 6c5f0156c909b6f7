"""No process of a run outlives it, and a SIGTERM at any moment of a torchrun run ends in a save
and exit status 0: SIGKILL of torchrun's process group (its ranks run in sessions of their own),
SIGKILL of a trainer (its checkpoint writer's queue manager ignores SIGTERM), SIGTERM to the ranks
while they still import torch."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.training.test_run_control import REPO, TINY, start, wait_for

pytestmark = pytest.mark.fault

PRETRAIN = str(REPO / "pretrain_gpt.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def torchrun(tmp: Path, nproc: int, *flags: str) -> subprocess.Popen:
    """pretrain_gpt.py under torchrun, in a process group of its own; output in tmp/torchrun.log."""
    log = open(tmp / "torchrun.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(nproc), PRETRAIN, *TINY, *flags], env=ENV, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)


def wait_until(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def pointer(save: Path) -> int:
    path = save / "latest_checkpointed_iteration.txt"
    return int(path.read_text()) if path.is_file() else 0


def assert_all_gone(processes: list, within: float) -> None:
    """Every process of ``processes`` ends within ``within`` seconds (then they are killed)."""
    names = {p.pid: " ".join(p.cmdline())[:150] for p in processes}
    deadline = time.monotonic() + within
    alive = processes
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    for process in alive:
        process.kill()
    assert not alive, "outlived the run: " + "; ".join(names[p.pid] for p in alive)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_of_torchruns_process_group_ends_every_rank(tmp_path):
    save = tmp_path / "ckpt"
    run = torchrun(tmp_path, 2, "--train-iters", "100000", "--save", str(save),
                   "--save-interval", "2")
    try:
        wait_until(lambda: pointer(save) >= 2 or run.poll() is not None, "the first checkpoint")
        assert run.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        # The ranks, and the checkpoint writers' queue managers the first save started.
        descendants = psutil.Process(run.pid).children(recursive=True)
        assert len(descendants) >= 4
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        assert_all_gone(descendants, within=15)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


def test_sigkill_of_a_trainer_ends_its_checkpoint_writer_manager(tmp_path):
    save = tmp_path / "ckpt"
    run, _ = start(tmp_path, "killed", "--train-iters", "100000", "--save", str(save),
                   "--save-interval", "2")
    try:
        wait_for(lambda: pointer(save) >= 2, run)
        helpers = psutil.Process(run.pid).children(recursive=True)
        assert helpers, "the first save starts the writer queue's manager process"
        os.kill(run.pid, signal.SIGKILL)  # the trainer alone, as the OOM killer would
        run.wait(timeout=30)
        assert_all_gone(helpers, within=15)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


def _importing_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_sigterm_to_the_ranks_during_startup_saves_and_torchrun_exits_0(tmp_path):
    save = tmp_path / "ckpt"
    run = torchrun(tmp_path, 1, "--train-iters", "100000", "--save", str(save),
                   "--exit-signal-handler")
    try:
        ranks = []
        wait_until(lambda: (ranks := psutil.Process(run.pid).children()) and
                   _importing_torch(ranks[0].pid), "the rank to start importing torch")
        # As Slurm's pre-emption warning is delivered by examples/slurm (to the ranks, not to
        # torchrun, which exits 1 whenever it is signalled itself).
        for rank in psutil.Process(run.pid).children():
            rank.send_signal(signal.SIGTERM)
        assert run.wait(timeout=180) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert "Exiting at iteration 1" in (tmp_path / "torchrun.log").read_text()
    assert pointer(save) == 1
