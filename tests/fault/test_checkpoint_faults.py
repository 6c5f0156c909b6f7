"""Checkpoints under faults: a shard damaged in place (same size) is refused before anything is
loaded, or skipped for the previous checkpoint with --fallback-to-previous-checkpoint; a full disk
gives an error naming the path and the bytes needed and keeps the previous checkpoint; a run
going non-finite publishes no checkpoint of its broken weights."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_lpa.checkpointing.checksums import find_damage
from tests.training.test_run_control import REPO, TINY, losses, start

pytestmark = pytest.mark.fault

POINTER = "latest_checkpointed_iteration.txt"


def finish(tmp: Path, name: str, *flags: str) -> SimpleNamespace:
    """Runs pretrain_gpt.py (TINY) to its end: exit status, output, logged losses."""
    proc, log = start(tmp, name, *flags)
    output, _ = proc.communicate(timeout=300)
    return SimpleNamespace(
        returncode=proc.returncode, output=output, losses=losses(log) if log.exists() else {}
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> SimpleNamespace:
    """Checkpoints of iterations 2 and 4, and the losses of the run that saved them."""
    root = tmp_path_factory.mktemp("saved")
    run = finish(
        root, "saving", "--train-iters", "4", "--save", str(root / "ckpt"), "--save-interval", "2"
    )
    assert run.returncode == 0, run.output
    return SimpleNamespace(save=root / "ckpt", losses=run.losses)


def damaged_copy(saved, tmp: Path) -> tuple:
    """A copy of the checkpoints with bytes flipped in the middle of iteration 4's largest
    shard, its size unchanged; returns (directory, damaged file)."""
    copy = tmp / "ckpt"
    shutil.copytree(saved.save, copy)
    shard = max((copy / "iter_0000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        data = f.read(16)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0x5A for b in data))
    return copy, shard


def test_a_shard_damaged_in_place_is_refused_naming_the_file(saved, tmp_path):
    copy, shard = damaged_copy(saved, tmp_path)
    run = finish(tmp_path, "resumed", "--train-iters", "6", "--load", str(copy))
    assert run.returncode != 0
    assert f"{shard}: its sha256 differs from the one recorded when saved" in run.output
    assert "Nothing was loaded. Pass --fallback-to-previous-checkpoint" in run.output
    assert "Resumed from" not in run.output and not run.losses


def test_fallback_loads_the_previous_checkpoint_and_resumes_exactly(saved, tmp_path):
    copy, shard = damaged_copy(saved, tmp_path)
    run = finish(
        tmp_path,
        "resumed",
        "--train-iters",
        "6",
        "--load",
        str(copy),
        "--save",
        str(copy),
        "--save-interval",
        "2",
        "--fallback-to-previous-checkpoint",
    )
    assert run.returncode == 0, run.output
    assert (
        f"{shard}: its sha256 differs" in run.output and "Falling back to iteration 2" in run.output
    )
    assert f"Resumed from {copy} at iteration 2" in run.output
    assert {i: run.losses[i] for i in (3, 4)} == {i: saved.losses[i] for i in (3, 4)}
    # The save of iteration 4 replaced the damaged one.
    assert (copy / POINTER).read_text().strip() == "6"
    assert find_damage(copy / "iter_0000004") == []


def _private_mounts_work() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(
    not _private_mounts_work(),
    reason="needs `unshare -rm` (a private mount namespace) for a small tmpfs",
)
def test_full_disk_names_the_path_and_bytes_and_keeps_the_previous_checkpoint(saved, tmp_path):
    # A tmpfs that holds one checkpoint and a half, mounted in a private namespace; its content
    # is copied out before the namespace goes.
    size = int(1.5 * sum(p.stat().st_size for p in (saved.save / "iter_0000002").iterdir()))
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    train = [
        sys.executable,
        str(REPO / "pretrain_gpt.py"),
        *TINY,
        "--train-iters",
        "4",
        "--save",
        str(disk / "ckpt"),
        "--save-interval",
        "2",
    ]
    script = (
        f'mount -t tmpfs -o size={size} tmpfs "{disk}" && "$@"; status=$?; '
        f'cp -a "{disk}/." "{out}/"; exit $status'
    )
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *train],
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    message = (
        f"no space left on the device (ENOSPC) saving iteration 4 to "
        f"{disk / 'ckpt'}/iter_0000004.tmp-"
    )
    assert message in run.stderr, run.stderr[-3000:]
    assert "the checkpoint needs about " in run.stderr
    assert "the latest checkpoint is still iteration 2" in run.stderr
    checkpoints = out / "ckpt"
    assert (checkpoints / POINTER).read_text().strip() == "2"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000002", POINTER]
    assert find_damage(checkpoints / "iter_0000002") == []


def test_no_checkpoint_of_a_run_going_nonfinite_is_published(saved, tmp_path):
    # From the good checkpoint of iteration 2, a fresh optimizer with an absurd learning rate:
    # step 3 has a finite loss but leaves huge weights, step 4's loss is not finite.
    copy = tmp_path / "ckpt"
    shutil.copytree(saved.save, copy)
    (copy / "iter_0000004").rename(tmp_path / "iter_0000004")
    (copy / POINTER).write_text("2\n")
    run = finish(
        tmp_path,
        "diverging",
        "--train-iters",
        "10",
        "--load",
        str(copy),
        "--no-load-optim",
        "--save",
        str(copy),
        "--save-interval",
        "1",
        "--lr",
        "1e30",
        "--lr-warmup-iters",
        "0",
        "--clip-grad",
        "0",
        "--max-nonfinite-steps",
        "3",
    )
    assert "Stopping: 3 steps in a row had a non-finite loss" in run.output
    assert (
        "dropped the checkpoint of iteration 3: the step after it had a non-finite loss or "
        "gradient norm; the latest checkpoint in"
    ) in run.output
    assert (copy / POINTER).read_text().strip() == "2"
    assert sorted(p.name for p in copy.glob("iter_*")) == ["iter_0000002"]
