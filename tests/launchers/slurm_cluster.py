"""A one-host Slurm cluster for tests: Debian's packages, private config, state and ports.

``install_slurm()`` installs slurmctld, slurmd and munge with apt where they are missing and says
why when it cannot. ``SlurmCluster(root).start()`` runs its own munged (own key and socket) and a
slurmctld and slurmd whose configuration, state, spool, logs and ports are all under ``root``, with
one node, localhost (this host), holding two placeholder GPUs (GRES backed by /dev/null and
/dev/zero), so the project's sbatch scripts run unchanged with ``--gpus-per-node``. Nothing outside
``root`` is changed and ``stop()`` ends only the daemons it started.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
FAKE_GPUS = ("/dev/null", "/dev/zero")


# The daemons live in /usr/sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _missing() -> list:
    return [name for name in DAEMONS if not shutil.which(name, path=SEARCH_PATH)]


def install_slurm() -> Optional[str]:
    """Installs Slurm with apt where missing; returns why it cannot, or None once it is there."""
    if not _missing():
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root (apt-get)"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it with"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd, timeout in (
        (["apt-get", "update"], 300),
        (["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], 600),
    ):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` did not finish in {timeout} s"
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()[-500:]}"
    missing = _missing()
    return f"installed {', '.join(PACKAGES)} but found no {missing}" if missing else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """slurmctld + slurmd + munged on this host, everything under ``root``."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 4000):
        self.root, self.cpus, self.memory_mb = Path(root), cpus, memory_mb
        # The node is named localhost (what jobs see, e.g. as the rendezvous host: it resolves
        # everywhere); slurmd finds itself by this machine's short host name.
        self.node, self.hostname = "localhost", socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._pid_files = {name: self.root / f"{name}.pid" for name in ("slurmd", "slurmctld")}
        self._pid_files["munged"] = self.root / "munge" / "munged.pid"

    @property
    def env(self) -> dict:
        """The environment for Slurm's commands (and, exported, the jobs') to reach this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=SEARCH_PATH)

    # ----- start and stop ------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket in a directory that others cannot reach.
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._run(
            [
                "munged",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self._pid_files['munged']}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
            ]
        )
        self._write_config()
        self._run(["slurmctld", "-f", str(self.conf)])
        self._run(["slurmd", "-f", str(self.conf)])
        self.wait_for(
            lambda: self.node_state().startswith("IDLE"),
            timeout,
            what=f"node {self.node} to become idle",
        )

    def stop(self) -> None:
        """Cancels every job, then ends slurmd, slurmctld and munged (by their pid files)."""
        subprocess.run(
            ["scancel", "--full", "--user", str(os.geteuid())],
            env=self.env,
            capture_output=True,
            timeout=30,
        )
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 20
            while time.time() < deadline and self._alive(pid):
                time.sleep(0.2)
            if self._alive(pid):
                os.kill(pid, signal.SIGKILL)

    def _write_config(self) -> None:
        root, ctld_port, slurmd_port = self.root, free_port(), free_port()
        gpus = len(FAKE_GPUS)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=lpatest",
                    "SlurmctldHost=localhost",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool'}",
                    f"SlurmctldPidFile={self._pid_files['slurmctld']}",
                    f"SlurmdPidFile={self._pid_files['slurmd']}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    # No cgroups in containers: track processes by parentage, bind nothing.
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/backfill",
                    "JobRequeue=1",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    # Finished jobs stay visible to `scontrol show job` for the test's checks.
                    "MinJobAge=600",
                    "KillWait=30",
                    "GresTypes=gpu",
                    f"NodeName={self.node} NodeHostname={self.hostname} NodeAddr=127.0.0.1 "
                    f"CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{gpus} State=UNKNOWN",
                    f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        (root / "gres.conf").write_text(
            "".join(f"NodeName={self.node} Name=gpu File={device}\n" for device in FAKE_GPUS)
        )

    # ----- jobs ----------------------------------------------------------------------------------
    def sbatch(
        self, script: Path, *options: str, env: Optional[dict] = None, cwd: Optional[Path] = None
    ) -> int:
        """Submits ``script`` (sbatch ``options``, extra environment, from ``cwd``); the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *options, str(script)],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise AssertionError(f"sbatch failed: {proc.stderr}\n{self.logs()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        proc = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", str(job_id)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        fields = {}
        for item in proc.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def scontrol(self, *args: str) -> None:
        proc = subprocess.run(
            ["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30
        )
        if proc.returncode != 0:
            raise AssertionError(f"scontrol {' '.join(args)} failed: {proc.stderr}")

    def scancel(self, *args: str) -> None:
        subprocess.run(
            ["scancel", *args], env=self.env, capture_output=True, timeout=30, check=True
        )

    def node_state(self) -> str:
        proc = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--format=%T", "--nodes", self.node],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return proc.stdout.strip().upper()

    def wait_for(
        self,
        condition: Callable[[], bool],
        timeout: float,
        what: str,
        details: Callable[[], str] = lambda: "",
    ) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            time.sleep(1)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what}\n{details()}\n{self.logs()}"
        )

    def logs(self, lines: int = 25) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts)

    # ----- helpers -------------------------------------------------------------------------------
    def _run(self, cmd: list) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(
                f"`{' '.join(cmd)}` failed ({proc.returncode}): "
                f"{proc.stderr or proc.stdout}\n{self.logs()}"
            )

    def _pid(self, name: str) -> Optional[int]:
        try:
            return int(self._pid_files[name].read_text().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
