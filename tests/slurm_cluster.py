"""Start and stop a real single-node Slurm (Debian `slurm-wlm` + `munge`) for the launcher tests.

Everything lives in a temp dir (config, state, logs, pid files); clients find it via `SLURM_CONF`.
Ports are picked free so a second test session on the same host does not collide. Needs root
(slurmd runs jobs as the submitting user). Install: `apt-get install -y slurm-wlm munge`.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def missing_reason() -> str | None:
    """Why a Slurm cluster cannot be started here, or None if it can."""
    for binary in ("slurmctld", "slurmd", "munged", "sbatch", "squeue"):
        if shutil.which(binary) is None:
            return f"Slurm not installed ({binary} not on PATH): apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """`NodeName=... CPUs=... RealMemory=...` as `slurmd -C` reports this machine."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    fields = dict(f.split("=", 1) for f in line.split())
    fields["RealMemory"] = str(min(int(fields["RealMemory"]), 20000))
    return " ".join(f"{k}={v}" for k, v in fields.items()) + " State=UNKNOWN"


class SlurmCluster:
    """A slurmctld + slurmd (and munged if none runs) under `workdir`; `env` points clients at it."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.conf = self.workdir / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self._started_munge = False

    def _write_conf(self) -> None:
        d = self.workdir
        for sub in ("state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=sparsescale-test",
                    f"SlurmctldHost={host}",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    # a requeued job may start again once its old credential expires (120 s)
                    "AuthInfo=cred_expire=20",
                    "CredType=cred/munge",
                    "MpiDefault=none",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "ReturnToService=2",
                    "SlurmdTimeout=30",
                    "InactiveLimit=0",
                    "KillWait=5",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={d / 'spool'}",
                    f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                    f"SlurmdPidFile={d / 'slurmd.pid'}",
                    f"SlurmctldLogFile={d / 'slurmctld.log'}",
                    f"SlurmdLogFile={d / 'slurmd.log'}",
                    _node_line(),
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                ]
            )  # fmt: skip
            + "\n"
        )

    def _munge_ok(self) -> bool:
        if not MUNGE_SOCKET.exists():
            return False
        cred = subprocess.run(["munge", "-n"], capture_output=True)
        return cred.returncode == 0 and (
            subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0
        )

    def start(self, timeout_s: float = 60.0) -> dict[str, str]:
        self._write_conf()
        if not self._munge_ok():
            MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
            self._started_munge = True
        env = os.environ | self.env
        subprocess.run(["slurmctld"], env=env, check=True)
        subprocess.run(["slurmd"], env=env, check=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
            ).stdout.split()
            if out and all(s.rstrip("*") in ("idle", "mixed", "allocated") for s in out):
                return self.env
            time.sleep(0.5)
        log = (self.workdir / "slurmctld.log").read_text()[-2000:]
        self.stop()
        raise RuntimeError(f"Slurm node not idle after {timeout_s}s; slurmctld.log tail:\n{log}")

    def stop(self) -> None:
        """Cancel leftover jobs (so no slurmstepd outlives the cluster), then stop the daemons."""
        env = os.environ | self.env
        subprocess.run(["scancel", "--full", "-u", getpass.getuser()], env=env, capture_output=True)
        for _ in range(100):
            queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(0.1)
        pid_files = [self.workdir / "slurmd.pid", self.workdir / "slurmctld.pid"]
        if self._started_munge:
            pid_files.append(Path("/run/munge/munged.pid"))
        for pid_file in pid_files:
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):  # wait up to 10 s for it to exit
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
