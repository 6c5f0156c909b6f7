"""A multi-node rehearsal on one machine: two torchrun "nodes" (separate launchers, ``--nnodes 2``,
c10d rendezvous on 127.0.0.1, as the sbatch scripts start them) train the tiny config on CPUs and
end with exactly the losses of one torchrun node running the same world size.

Exactly: every logged training loss, every evaluation, and the TensorBoard scalars (full float
precision) agree; the world is DP=2 either way, so only the launch differs.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.launchers.slurm_cluster import free_port

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
TIMEOUT = 300
# "iteration 7/30 | loss 4.8517" (the rest of the line is timing), and the evaluation lines whole.
LOSS_LINE = re.compile(
    r"^(?:iteration\s+\d+/\s*\d+ \| loss [\d.]+|(?:validation|test) at iteration .*)", re.M
)


def _launch(out_dir: Path, name: str, torchrun_flags: list) -> tuple:
    """Starts one torchrun (a "node") training the tiny config; output to ``out_dir/name.log``."""
    log = out_dir / f"{name}.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_flags,
        str(REPO / "pretrain_gpt.py"),
        "--config",
        str(CONFIG),
        "--tensorboard-dir",
        str(out_dir / f"tb-{name}"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    return proc, log


def _finish(procs: list) -> None:
    try:
        for proc, log in procs:
            if proc.wait(timeout=TIMEOUT) != 0:
                raise AssertionError(
                    f"{log.name} failed (exit {proc.returncode}):\n" + log.read_text()[-4000:]
                )
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _losses(logs: list) -> list:
    """The training and evaluation lines (only the last rank logs: one of the nodes)."""
    return [line for log in logs for line in LOSS_LINE.findall(log.read_text())]


def _scalars(out_dir: Path, names: list) -> dict:
    values = {}
    for name in names:
        if not (out_dir / f"tb-{name}").is_dir():
            continue  # only the node holding the last rank writes events
        events = EventAccumulator(str(out_dir / f"tb-{name}"))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.endswith(("lm loss", "grad-norm", "learning-rate")):
                values[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    return values


def test_two_nodes_match_one_node(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    # The reference and the two "nodes" run at the same time: the machine has spare waiting time.
    procs = [_launch(tmp_path, "one_node", ["--standalone", "--nproc-per-node", "2"])]
    for rank in (0, 1):
        procs.append(
            _launch(
                tmp_path,
                f"node{rank}",
                [
                    "--nnodes",
                    "2",
                    "--node-rank",
                    str(rank),
                    "--nproc-per-node",
                    "1",
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    endpoint,
                    "--rdzv-id",
                    "rehearsal",
                ],
            )
        )
    _finish(procs)

    one_node = _losses([tmp_path / "one_node.log"])
    two_nodes = _losses([tmp_path / "node0.log", tmp_path / "node1.log"])
    assert len([line for line in one_node if line.startswith("iteration")]) == 30
    assert any(line.startswith("test at iteration 30") for line in one_node)
    assert two_nodes == one_node

    reference = _scalars(tmp_path, ["one_node"])
    assert len(reference["train/lm loss"]) == 30
    assert _scalars(tmp_path, ["node0", "node1"]) == reference
