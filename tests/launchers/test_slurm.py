"""The project's own sbatch scripts on a real Slurm (Debian's 22.05, a one-host cluster).

The module installs Slurm where it is missing (skipping, with the reason, only where it cannot be
installed), starts a private slurmctld + slurmd + munged (``slurm_cluster.py``) and submits the
scripts in ``examples/slurm/`` unchanged, from the checkout, with the tiny CPU config:

* ``preprocess_pile.sbatch`` as a two-task array over two JSON-lines shards, whose first task
  submits the merge, which runs after both;
* ``train_1node.sbatch``: trains, evaluates, tests and saves;
* ``train_multinode.sbatch`` with a 2-minute limit and its warning 50 s before it: Slurm's warning
  makes the trainers save, the job requeues itself and the next start resumes from that checkpoint;
  that start is warned in turn, saves again and stops at MAX_RESTARTS=1.
"""

import json
import re
import sys
import time
from pathlib import Path

import pytest

from megatron_lpa.data.indexed_reader import IndexedDatasetReader
from tests.launchers.slurm_cluster import SlurmCluster, install_slurm

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "examples" / "slurm"
TINY = "examples/configs/tiny_cpu.yaml"
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
ITERATION = re.compile(r"^iteration\s+(\d+)/", re.M)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install_slurm()
    if reason:
        pytest.skip(f"Slurm cannot be installed here: {reason}")
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def submit(cluster: SlurmCluster, script: str, *sbatch_options: str, **settings: str) -> int:
    """sbatch ``examples/slurm/<script>`` as a user would: from the checkout (which the scripts
    take as MEGATRON_LPA), settings in the environment."""
    env = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **settings}
    return cluster.sbatch(SLURM / script, *sbatch_options, env=env, cwd=REPO)


def training_settings(runs: Path, run_name: str, **more: str) -> dict:
    return {"CONFIG": TINY, "DATA_ARGS": "", "RUNS_DIR": str(runs), "RUN_NAME": run_name, **more}


def wait_until_final(cluster: SlurmCluster, job: int, timeout: float, out: Path) -> dict:
    cluster.wait_for(
        lambda: cluster.job(job).get("JobState") in FINAL_STATES,
        timeout,
        what=f"job {job} to end",
        details=lambda: _tail(out),
    )
    return cluster.job(job)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return f"--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def test_preprocess_array_then_merge(cluster, tmp_path):
    shards = tmp_path / "pile"
    shards.mkdir()
    documents = []
    for shard in range(2):
        docs = [
            {"text": " ".join(str((7 * shard + i * d) % 50) for i in range(10 + d))}
            for d in range(1, 6)
        ]
        documents += docs
        (shards / f"{shard:02d}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    logs.mkdir()
    job = submit(
        cluster,
        "preprocess_pile.sbatch",
        "--array=0-1",
        "--cpus-per-task=1",
        "--mem=1000M",
        f"--output={logs}/slurm-%x-%A_%a.out",
        PILE_DIR=str(shards),
        SHARD_NAME="%02d.jsonl",
        OUTPUT_DIR=str(out),
        TOKENIZER_ARGS="--tokenizer-type NullTokenizer --vocab-size 64",
        WORKERS="1",
    )
    # The merge job logs next to the array's tasks (slurm-<name>-merge-<id>.out).
    cluster.wait_for(
        lambda: any("Done: train with" in p.read_text() for p in logs.glob("slurm-*-merge-*.out")),
        timeout=120,
        what=f"array job {job} and its merge job",
        details=lambda: "\n".join(_tail(p) for p in sorted(logs.glob("*.out"))),
    )
    reader = IndexedDatasetReader(str(out / "pile_text_document"))
    assert reader.num_documents == len(documents)
    # Shard 00's documents first, then shard 01's, each ending with <eod> (--append-eod).
    for index, doc in enumerate(documents):
        tokens = [int(t) for t in doc["text"].split()] + [64]
        assert reader.document(index).tolist() == tokens


def test_train_evaluate_save(cluster, tmp_path):
    out = tmp_path / "slurm.out"
    job = submit(
        cluster,
        "train_1node.sbatch",
        "--gpus-per-node=2",
        "--time=10",
        f"--output={out}",
        **training_settings(tmp_path, "full"),
    )
    state = wait_until_final(cluster, job, timeout=240, out=out)
    log = tmp_path / "full" / "logs" / f"job-{job}-start-0.log"
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), _tail(out) + _tail(log)
    text = log.read_text()
    assert ITERATION.findall(text) == [str(i) for i in range(1, 31)]
    for evaluation in (
        "validation at iteration 10:",
        "validation at iteration 30:",
        "test at iteration 30:",
    ):
        assert evaluation in text
    checkpoints = tmp_path / "full" / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert (checkpoints / "iter_0000030" / "metadata.json").is_file()
    assert "Training finished; latest checkpoint: iteration 30." in out.read_text()
    assert list((tmp_path / "full" / "tensorboard").iterdir())


def test_time_limit_saves_requeues_and_resumes(cluster, tmp_path):
    out = tmp_path / "slurm.out"
    # Never finishes on its own and saves only when told: every checkpoint comes from a warning.
    settings = training_settings(
        tmp_path,
        "requeue",
        MAX_RESTARTS="1",
        EXTRA_ARGS="--train-iters 1000000 --eval-interval 1000000",
    )
    # Slurm sends the warning at its first check (every 30 s) within 30 s of the time asked for:
    # 40 to 70 s after the start, once the trainers are training (~25 s to start here).
    job = submit(
        cluster,
        "train_multinode.sbatch",
        "--nodes=1",
        "--gpus-per-node=2",
        "--time=2",
        "--signal=B:USR1@50",
        f"--output={out}",
        **settings,
    )
    cluster.wait_for(
        lambda: int(cluster.job(job).get("Restarts", 0)) >= 1,
        timeout=150,
        what=f"job {job} to requeue itself",
        details=lambda: _tail(out),
    )
    first = (tmp_path / "requeue" / "logs" / f"job-{job}-start-0.log").read_text()
    checkpoints = tmp_path / "requeue" / "checkpoints"
    pointer = checkpoints / "latest_checkpointed_iteration.txt"
    saved = int(re.search(r"Exiting at iteration (\d+) \(signal", first).group(1))
    assert int(pointer.read_text()) == saved
    assert [p.name for p in checkpoints.glob("iter_*")] == [f"iter_{saved:07d}"]
    assert int(ITERATION.findall(first)[-1]) == saved

    # A requeued job waits ~2 minutes before Slurm starts it again; start it sooner. Not at once:
    # slurmd refuses ("credential revoked") a job whose new credential dates from the second its
    # previous one was revoked in, failing the job.
    cluster.wait_for(
        lambda: cluster.node_state().startswith("IDLE"),
        timeout=60,
        what="the node to be idle after the requeue",
    )
    time.sleep(3)
    cluster.scontrol("update", f"JobId={job}", "StartTime=now")
    state = wait_until_final(cluster, job, timeout=180, out=out)
    second = (tmp_path / "requeue" / "logs" / f"job-{job}-start-1.log").read_text()
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), _tail(out)
    assert f"Resumed from {checkpoints} at iteration {saved} " in second
    resumed = [int(i) for i in ITERATION.findall(second)]
    assert resumed[0] == saved + 1, "the second start did not continue from the checkpoint"
    saved_again = int(re.search(r"Exiting at iteration (\d+) \(signal", second).group(1))
    assert saved_again == resumed[-1] > saved
    assert int(pointer.read_text()) == saved_again
    log = out.read_text()
    assert f"start 1: resuming from iteration {saved} of {checkpoints}." in log
    assert "Requeueing job" in log and "Not requeueing" in log
