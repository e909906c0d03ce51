"""A real Slurm on this machine for tests: munged, slurmctld and two slurmd daemons as nodes n1 and n2.

Every daemon runs in the foreground under this process, with its config, state and logs in a temporary
directory and its sockets (munge's, slurmd's spool) in a short one of its own under /tmp (a Unix socket path
holds at most 108 bytes, and pytest's temporary paths grow with test and worker names), and is stopped by its
PID. n1 and n2 listen on the
loopback addresses 127.0.0.2 and 127.0.0.3 (the whole of 127/8 is loopback), which a Ray
cluster inside a job then uses as its node IPs (Ray replaces 127.0.0.1 by the machine's address).
``SlurmCluster(root, WORKSTATION)`` is the one-node install of a workstation instead: n1 at 127.0.0.1.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NODES = {"n1": "127.0.0.2", "n2": "127.0.0.3"}
WORKSTATION = {"n1": "127.0.0.1"}
CRED_EXPIRE = 10
"""Seconds a job credential lives (slurm.conf ``AuthInfo=cred_expire``): a requeued job may start again only once
its revoked credential has expired."""
CPUS_PER_NODE = 2
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`env` is what client commands need."""

    def __init__(self, root: Path, nodes: dict[str, str] = NODES):
        self.root, self.nodes = root, dict(nodes)
        self.processes: dict[str, subprocess.Popen] = {}
        self.conf = root / "slurm.conf"
        self.sockets = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.munge_socket = self.sockets / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        root = self.root
        for sub in ("state", "munge", "logs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.sockets / f"spool-{node}").mkdir(exist_ok=True)
        lines = [
            "ClusterName=unireplknet-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it starts again (120 s by default); a job
            # started earlier is refused by its nodes ("Job credential revoked") and fails
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={self.sockets}/spool-%n",
            f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={root}/logs/slurmctld.log", f"SlurmdLogFile={root}/logs/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SwitchType=switch/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "ReturnToService=2", "JobRequeue=1", "SchedulerType=sched/builtin",
            "SlurmdTimeout=60", "MinJobAge=600", "KillWait=30",
        ]
        for name, address in self.nodes.items():
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr={address} Port={_free_port()} "
                         f"CPUs={CPUS_PER_NODE} RealMemory=8000 State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.out", "w")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        key = Path("/etc/munge/munge.key")
        self._start("munged", [_binary("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root}/munge/munged.pid",
                               f"--log-file={self.root}/logs/munged.log", f"--seed-file={self.root}/munge/seed"])
        deadline = time.time() + timeout
        while not self.munge_socket.exists():
            self._check_alive()
            assert time.time() < deadline, "munged did not create its socket"
            time.sleep(0.1)
        self._start("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for name in self.nodes:
            self._start(f"slurmd-{name}", [_binary("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
        while True:
            self._check_alive()
            states = self.node_states()
            if states and all(s.startswith("idle") for s in states.values()):
                return self
            assert time.time() < deadline, f"nodes not idle after {timeout} s: {states}\n{self.logs()}"
            time.sleep(0.5)

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{self.logs()}")

    def run(self, *command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}")
        return result

    def node_states(self) -> dict[str, str]:
        result = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)

    def job_state(self, job_id: str) -> dict[str, str]:
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted((self.root / "logs").iterdir()))

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        shutil.rmtree(self.sockets, ignore_errors=True)
