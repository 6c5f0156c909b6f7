"""Runs a test worker under torchrun (gloo on CPU) and fails the test with the worker's output."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PRETRAIN = TESTS.parent / "pretrain_gpt.py"


def torchrun(script: str, nproc: int, *args: str, timeout: float = 300) -> str:
    """Runs ``tests/<script>`` on ``nproc`` local processes; returns stdout+stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--standalone",
        str(TESTS / script),
        *map(str, args),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        errors = [line for line in output.splitlines() if "Error" in line or "error" in line]
        raise AssertionError(
            f"{' '.join(cmd[3:])} failed (exit {proc.returncode}):\n"
            + "\n".join(errors[-20:])
            + "\n--- output tail ---\n"
            + output[-4000:]
        )
    return output


def pretrain_records(nproc: int, *args: str, timeout: float = 300) -> list:
    """Runs ``pretrain_gpt.py`` with ``args`` on ``nproc`` processes (one: without torchrun, whose
    start alone costs seconds) and returns the records it wrote with ``--log-jsonl``."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.jsonl"
        arguments = [*map(str, args), "--log-jsonl", str(log)]
        if nproc == 1:
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
            for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(name, None)
            cmd = [sys.executable, str(PRETRAIN), *arguments]
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp
            )
            if proc.returncode != 0:
                raise AssertionError(
                    f"{' '.join(cmd[1:])} failed (exit {proc.returncode}):\n"
                    + (proc.stdout + proc.stderr)[-4000:]
                )
        else:
            torchrun(str(PRETRAIN), nproc, *arguments, timeout=timeout)
        return [json.loads(line) for line in log.read_text().splitlines()]
