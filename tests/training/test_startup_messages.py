"""What a start prints: no megatron-core warnings (one line of ours instead), a configuration
error once with exit status 2 from two ranks, each default in --help once."""

import os
import re
import subprocess
import sys

from tests.data.conftest import REPO

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 8 --lr 1e-3 "
    "--mock-data --vocab-size 16 --eval-iters 0"
).split()


def run(*args, nproc: int = 0) -> subprocess.CompletedProcess:
    """``pretrain_gpt.py`` with warnings shown (unlike tests/launch.py), under torchrun if
    ``nproc``."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        if nproc
        else []
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(
        [sys.executable, *launcher, str(REPO / "pretrain_gpt.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(env, OMP_NUM_THREADS="1"),
    )


def test_help_has_no_warnings_and_each_default_once():
    done = run("--help")
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr
    entries = re.split(r"\n  (?=-)", done.stdout)
    twice = [e.split()[0] for e in entries if len(re.findall("default", e, re.IGNORECASE)) > 1]
    assert twice == []
    seed = next(e for e in entries if e.startswith("--seed"))
    assert "(default: 1234)" in " ".join(seed.split())  # argparse may wrap inside it


def test_training_says_once_what_runs_instead_of_the_missing_kernels():
    done = run(*TINY, "--train-iters", "1", nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Warning" not in done.stderr, done.stderr
    assert done.stdout.count("Without Transformer Engine and Apex:") == 1


def test_configuration_error_is_printed_once_and_exits_2():
    done = run(*TINY, "--train-iters", "1", "--hidden-size", "30", nproc=2)
    message = "Configuration error: --hidden-size 30 is not divisible by --num-attention-heads 4"
    assert done.returncode != 0
    # Once from the ranks, and once more in torchrun's root-cause report, from the error file.
    lines = (done.stdout + done.stderr).splitlines()
    assert sum(line.startswith(message) for line in lines) == 1
    assert any(
        line.strip() == f"traceback : {message}; change one of them or set --kv-channels."
        for line in lines
    )
    assert "exitcode  : 2" in done.stderr
    assert 'pretrain_gpt.py", line' not in done.stderr  # no rank's own traceback
