"""Runs a test worker under torchrun (gloo on CPU) and fails the test with the worker's output."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def torchrun(script: str, nproc: int, *args: str, timeout: float = 300) -> str:
    """Runs ``tests/<script>`` on ``nproc`` local processes; returns stdout+stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--standalone", str(TESTS / script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        errors = [line for line in output.splitlines() if "Error" in line or "error" in line]
        raise AssertionError(f"{' '.join(cmd[3:])} failed (exit {proc.returncode}):\n"
                             + "\n".join(errors[-20:]) + "\n--- output tail ---\n" + output[-4000:])
    return output
