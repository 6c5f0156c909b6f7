"""No process of a run outlives it, and a SIGTERM at any moment of a torchrun run ends in a save
and exit status 0: SIGKILL of torchrun's process group (its ranks run in sessions of their own),
SIGKILL of a trainer (its checkpoint writer's queue manager ignores SIGTERM; its writer workers
wait on queues it was to feed), SIGTERM to the ranks while they still import torch.

The SIGKILL tests make this process a child subreaper, so that whatever a killed run leaves
behind is reparented here rather than to init and is seen, down to a writer worker forked by a
save that began after the last look at the run's processes."""

import contextlib
import ctypes
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
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            PRETRAIN,
            *TINY,
            *flags,
        ],
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_until(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def pointer(save: Path) -> int:
    path = save / "latest_checkpointed_iteration.txt"
    return int(path.read_text()) if path.is_file() else 0


PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper():
    """This process adopts its orphaned descendants for the test (Linux 3.4 and later)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("needs Linux's PR_SET_CHILD_SUBREAPER")
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        _descendants()  # reaps the adopted ones that have ended


def assert_all_gone(processes: list, within: float) -> None:
    """Every process of ``processes``, and every descendant of this one (with ``subreaper``, all
    that a killed run started), ends within ``within`` seconds (then they are killed)."""
    names = {}
    deadline = time.monotonic() + within
    while True:
        alive = {p.pid: p for p in processes if _running(p)}
        alive.update((p.pid, p) for p in _descendants())
        for pid, process in alive.items():
            if pid not in names:
                names[pid] = _cmdline(process)
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for process in alive.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    _descendants()
    assert not alive, "outlived the run: " + "; ".join(names[pid] for pid in alive)


def _descendants() -> list:
    """This process's running descendants; reaps those of its children that have ended."""
    running = []
    for process in psutil.Process().children(recursive=True):
        if _running(process):
            running.append(process)
        else:
            with contextlib.suppress(ChildProcessError, psutil.Error):
                if process.ppid() == os.getpid():
                    os.waitpid(process.pid, os.WNOHANG)
    return running


def _cmdline(process: psutil.Process) -> str:
    try:
        return f"{process.pid} " + " ".join(process.cmdline())[:150]
    except psutil.Error:
        return str(process.pid)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_of_torchruns_process_group_ends_every_rank(tmp_path, subreaper):
    save = tmp_path / "ckpt"
    run = torchrun(
        tmp_path, 2, "--train-iters", "100000", "--save", str(save), "--save-interval", "2"
    )
    try:
        wait_until(lambda: pointer(save) >= 2 or run.poll() is not None, "the first checkpoint")
        assert run.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        # The ranks, and the checkpoint writers' queue managers the first save started; and,
        # adopted by the subreaper, what they leave: a save may be under way (--save-interval 2).
        descendants = psutil.Process(run.pid).children(recursive=True)
        assert len(descendants) >= 4
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        assert_all_gone(descendants, within=15)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


def test_sigkill_of_a_trainer_ends_its_checkpoint_writer_manager(tmp_path, subreaper):
    save = tmp_path / "ckpt"
    run, _ = start(
        tmp_path, "killed", "--train-iters", "100000", "--save", str(save), "--save-interval", "2"
    )
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


# A rank's save as megatron-core runs it (``execute_sync``): one bucket, written by a forked
# worker into a FIFO, which holds the worker until the test opens it.
_SAVING_RANK = """
import multiprocessing, sys
from megatron_lpa.platform import megatron_patches
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
megatron_patches.writer_workers_exit_with_parent()
FileSystemWriterAsync.write_preloaded_data_multiproc(
    [], False, 0, [(sys.argv[1], "key", ([], []))], multiprocessing.get_context("fork").Queue())
"""


def test_a_checkpoint_writer_worker_ends_with_its_killed_trainer(tmp_path, subreaper):
    """Without ``writer_workers_exit_with_parent``, the worker, its write done, would wait forever
    in ``count_queue.task_done()`` for the dead trainer to wake from ``count_queue.join()``."""
    fifo = tmp_path / "__0_0.distcp"
    os.mkfifo(fifo)
    rank = subprocess.Popen([sys.executable, "-c", _SAVING_RANK, str(fifo)], env=ENV)
    try:
        wait_until(
            lambda: psutil.Process(rank.pid).children() or rank.poll() is not None,
            "the writer worker",
        )
        assert rank.poll() is None
        (worker,) = psutil.Process(rank.pid).children()
        time.sleep(0.5)  # the rank waits in count_queue.join(), the worker to open the FIFO
        rank.kill()
        rank.wait(timeout=30)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the worker's write goes on, and ends
        try:
            assert_all_gone([worker], within=10)
        finally:
            os.close(reader)
    finally:
        if rank.poll() is None:
            rank.kill()


def _importing_torch(pid: int) -> bool:
    """Whether rank ``pid`` runs pretrain_gpt.py and has begun loading torch. Between fork and
    exec a new rank is still an image of torchrun, libtorch mapped and torchrun's command line:
    a SIGTERM then would end it before pretrain_gpt.py's first line (seen in 4 of 10 starts)."""
    try:
        proc = Path(f"/proc/{pid}")
        return b"torch.distributed.run" not in (proc / "cmdline").read_bytes() and (
            "libtorch" in (proc / "maps").read_text()
        )
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_sigterm_to_the_ranks_during_startup_saves_and_torchrun_exits_0(tmp_path):
    save = tmp_path / "ckpt"
    run = torchrun(
        tmp_path, 1, "--train-iters", "100000", "--save", str(save), "--exit-signal-handler"
    )
    try:
        wait_until(
            lambda: (
                (ranks := psutil.Process(run.pid).children()) and _importing_torch(ranks[0].pid)
            ),
            "the rank to start importing torch",
        )
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
