"""Checkpoints resume training exactly, survive SIGKILL during and after a save, reshard to another
TP layout, give every parameter its own Adam step after loading, and fail with messages that name
the path and the fix.

"Exactly" means bit-identical per-iteration losses against one uninterrupted run, with dropout on,
Adam, warmup + cosine LR and gradient clipping (see ``checkpoint_worker.py``).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_lpa.checkpointing.checkpoint import load_checkpoint
from megatron_lpa.checkpointing.files import TRACKER_FILENAME, CheckpointError, latest_iteration
from tests.launch import TESTS, torchrun

WORKER = "training/checkpoint_worker.py"

# name: (processes, worker flags). Exact resume runs at tp1_local and dp2_distributed; tp2_local
# only saves, for the resharding test (its exact resume passes too, but costs ~25 s more).
LAYOUTS = {
    "tp1_local": (1, []),
    "dp2_distributed": (2, ["--dist-opt"]),
    "tp2_local": (2, ["--tp", "2"]),
}
RESUMED_LAYOUTS = ("tp1_local", "dp2_distributed")


def opts(**options) -> list:
    """Worker flags from keywords: ``opts(save_interval=2)`` is ``["--save-interval", "2"]``."""
    return [
        arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", str(value))
    ]


def train(report: Path, nproc: int, *flags) -> dict:
    torchrun(WORKER, nproc, *flags, *opts(report=report))
    return json.loads(report.read_text())


def losses(report: dict) -> dict:
    return {int(iteration): loss for iteration, loss in report["losses"].items()}


def pointer(save_dir: Path) -> str:
    return (save_dir / TRACKER_FILENAME).read_text().strip()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per layout, run on first use: an uninterrupted 6-iteration run (``reference``), a run that
    trains 3 iterations and saves into ``save_dir`` (``saved``), and, for ``RESUMED_LAYOUTS``, a
    new run that loads it and trains to 6 (``resumed``)."""
    cache = {}

    def get(layout: str) -> SimpleNamespace:
        if layout not in cache:
            root = tmp_path_factory.mktemp(layout)
            nproc, flags = LAYOUTS[layout]
            run = SimpleNamespace(save_dir=root / "checkpoints")
            save = opts(iters=3, save=run.save_dir, save_interval=3)
            run.saved = train(root / "saved.json", nproc, *flags, *save)
            if layout in RESUMED_LAYOUTS:
                run.reference = train(root / "reference.json", nproc, *flags, *opts(iters=6))
                resume = opts(iters=6, load=run.save_dir)
                run.resumed = train(root / "resumed.json", nproc, *flags, *resume)
            cache[layout] = run
        return cache[layout]

    return get


@pytest.mark.parametrize("layout", RESUMED_LAYOUTS)
def test_resumed_run_matches_uninterrupted_run(runs, layout):
    run = runs(layout)
    reference = losses(run.reference)
    assert losses(run.saved) == {i: reference[i] for i in (1, 2, 3)}
    assert run.resumed["train_state"] == {"iteration": 3, "consumed_train_samples": 6}
    assert losses(run.resumed) == {i: reference[i] for i in (4, 5, 6)}
    # The weights are loaded exactly, not only close enough to train on.
    assert run.resumed["eval_loss_after_load"] == run.saved["eval_loss_at_end"]
    assert pointer(run.save_dir) == "3"


@pytest.mark.parametrize("layout", RESUMED_LAYOUTS)
def test_every_param_has_its_own_adam_step_after_load(runs, layout):
    """megatron-core loads one shared step tensor for all parameters of the distributed optimizer;
    torch's Adam would then add one per parameter per iteration (bias correction goes wrong)."""
    run = runs(layout)
    after_load = run.resumed["adam_steps_after_load"]
    after_step = run.resumed["adam_steps_after_first_step"]
    assert after_load["distinct"] and after_step["distinct"]
    assert set(after_load["values"]) == {3.0}
    assert set(after_step["values"]) == {4.0}


def test_tp2_checkpoint_loads_at_tp1_without_optimizer(runs, tmp_path):
    tp2, report = runs("tp2_local"), tmp_path / "tp1.json"
    load = opts(iters=3, load=tp2.save_dir, report=report)
    output = torchrun(WORKER, 1, *load, "--no-load-optim")
    assert "saved at layout" in output and "RNG states not restored" in output
    loaded = json.loads(report.read_text())
    assert loaded["train_state"]["iteration"] == 3
    assert loaded["eval_loss_after_load"] == pytest.approx(tp2.saved["eval_loss_at_end"], rel=1e-6)


def start_worker(log: Path, *args) -> subprocess.Popen:
    """The worker as one process outside torchrun, in its own process group, so a test can kill
    it and everything it started; its output goes to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(TESTS / WORKER), *map(str, args)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILLs the worker's process group: the worker and any helper process it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_sigkill_after_a_save_resumes_exactly(runs, tmp_path):
    save_dir, log = tmp_path / "checkpoints", tmp_path / "killed.log"
    pause = opts(pause_after=4, report=tmp_path / "killed.json")
    proc = start_worker(log, *opts(iters=6, save=save_dir, save_interval=2), *pause)
    deadline = time.monotonic() + 120
    try:
        while not (save_dir / TRACKER_FILENAME).exists() or pointer(save_dir) != "4":
            assert proc.poll() is None, f"worker exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "iteration 4 was never checkpointed"
            time.sleep(0.05)
    finally:
        kill_group(proc)
    resumed = train(tmp_path / "resumed.json", 1, *opts(iters=6, load=save_dir))
    reference = losses(runs("tp1_local").reference)
    assert losses(resumed) == {i: reference[i] for i in (5, 6)}


def crash_during_save(tmp_path: Path, save_dir: Path, kind: str, *load) -> None:
    """Trains to iteration 4, saving every 2, and dies (SIGKILL) inside the save of iteration 4."""
    log = tmp_path / f"{kind}.log"
    crash = opts(crash=kind, crash_at=4, report=tmp_path / f"{kind}.json")
    proc = start_worker(log, *opts(iters=4, save=save_dir, save_interval=2), *load, *crash)
    try:
        returncode = proc.wait(timeout=120)
    finally:
        kill_group(proc)
    output = log.read_text()
    assert returncode == -signal.SIGKILL, output[-3000:]
    assert f"CRASH POINT {kind} reached" in output


def test_sigkill_during_save_keeps_previous_checkpoint(runs, tmp_path):
    save_dir = tmp_path / "checkpoints"
    # Killed while writing the files of iteration 4: only a temp directory holds them.
    crash_during_save(tmp_path, save_dir, "mid_write")
    assert pointer(save_dir) == "2"
    assert latest_iteration(save_dir) == 2
    (partial,) = save_dir.glob("iter_0000004.tmp-*")
    assert not (save_dir / "iter_0000004").exists()

    # Resumes from 2, then is killed after publishing iteration 4 but before moving the pointer;
    # that save first removed the stale temp directory.
    crash_during_save(tmp_path, save_dir, "before_pointer", *opts(load=save_dir))
    assert pointer(save_dir) == "2"
    assert not partial.exists()
    assert (save_dir / "iter_0000004").is_dir()

    # Still resumes exactly from 2; its save of 4 replaces the unpublished one and cleans up.
    resume = opts(iters=6, load=save_dir, save=save_dir, save_interval=2)
    resumed = train(tmp_path / "resumed.json", 1, *resume)
    reference = losses(runs("tp1_local").reference)
    assert losses(resumed) == {i: reference[i] for i in (3, 4, 5, 6)}
    assert pointer(save_dir) == "6"
    assert not list(save_dir.glob("*.tmp*"))


def test_errors_name_the_path_and_the_fix(runs, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(
        CheckpointError, match=f"{re.escape(str(missing))} does not exist.*leave --load out"
    ):
        load_checkpoint(str(missing), [], None, None)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_checkpoint(str(empty), [], None, None) is None

    saved = tmp_path / "checkpoints"
    shutil.copytree(runs("dp2_distributed").save_dir, saved)
    (saved / "iter_0000009").mkdir()  # e.g. a checkpoint whose files were lost
    (saved / TRACKER_FILENAME).write_text("7\n")
    with pytest.raises(CheckpointError, match=r"names iteration 7.*iter_0000007.*\[3, 9\]"):
        latest_iteration(saved)
    (saved / TRACKER_FILENAME).write_text("latest\n")
    with pytest.raises(CheckpointError, match="'latest', not an iteration number"):
        latest_iteration(saved)
    (saved / TRACKER_FILENAME).write_text("9\n")
    with pytest.raises(
        CheckpointError,
        match=r"iter_0000009 is not a readable checkpoint.*other saved iterations \[3\]",
    ):
        load_checkpoint(str(saved), [], None, None)

    # Damaged tensor files are found by their checksums, before anything is loaded.
    damaged = tmp_path / "damaged"
    shutil.copytree(runs("tp1_local").save_dir, damaged)
    for shard in (damaged / "iter_0000003").glob("*.distcp"):
        os.truncate(shard, 100)
    with pytest.raises(
        CheckpointError,
        match=r"iter_0000003 is damaged: \S*__0_0\.distcp has 100 bytes, \d+ when saved.*"
        r"no other checkpoint.*start over",
    ):
        load_checkpoint(str(damaged), [], None, None)

    # A distributed-optimizer checkpoint into a non-distributed optimizer (any object that is not
    # a DistributedOptimizer; the check comes before anything is loaded).
    (saved / TRACKER_FILENAME).write_text("3\n")
    with pytest.raises(CheckpointError, match="'distributed:fully_reshardable'.*--no-load-optim"):
        load_checkpoint(str(saved), [], SimpleNamespace(), None)
