"""A one-node Ray cluster on this machine for one run, outside the caller's process group.

``ray.init()`` without an address starts gcs_server, the raylet and the dashboard inside the caller's
process group, so the signal a scheduler sends to that group (Slurm's ``--signal``, ``scancel``, a
Kubernetes pod stop, Ctrl-C) kills the cluster before any Ray Train worker can checkpoint.
:class:`LocalRayCluster` runs ``ray start --head --block`` as a child in a session of its own (every
Ray process of the node, workers included, stays in that session) and drivers connect to its address;
:meth:`LocalRayCluster.stop` ends exactly the processes of that session (never ``ray stop``, which
ends every Ray instance of the user on the machine). The pipeline and the Ray launcher both use it.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["LocalRayCluster", "session_processes"]

_logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(session: int) -> dict[int, str]:
    """{pid: command line} of the live (not zombie) processes whose session id is ``session``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != session or fields[0] == "Z":
                continue
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        found[int(entry)] = command.strip()[:200]
    return found


def _ray_command() -> list[str]:
    """The ``ray`` CLI run by this interpreter: the node's workers then run this ``sys.executable`` too (the
    ``ray`` script's own interpreter line may name another path to it, e.g. through a symlinked venv, and
    compiled extensions cached per interpreter path would then be rebuilt)."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _ensure_auth_token(env: dict[str, str]) -> None:
    """Token auth needs a token (what ``ray.init()`` generates for a new local cluster): create it once."""
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").exists():
        return
    subprocess.run([*_ray_command(), "get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=120)


class LocalRayCluster:
    """``ray start --head --block`` in its own session, with a temp dir and ports of its own.

    ``num_cpus`` / ``num_gpus``: the node's logical resources (Ray's detection when None). The head's output
    goes to ``log_path`` (default: a file in its temp dir). Token auth is on unless ``RAY_AUTH_MODE`` says
    otherwise (as for ``ray.init()``); :attr:`environment` is what a driver needs to connect. The head is
    given SIGTERM if this process dies (parent-death signal, where ``setpriv`` exists), so a SIGKILLed
    caller does not leave it behind either.
    """

    def __init__(self, num_cpus: int | None = None, num_gpus: int | None = None, log_path: str | None = None):
        self.num_cpus, self.num_gpus, self.log_path = num_cpus, num_gpus, log_path
        self.temp_dir: str | None = None
        self.address: str | None = None
        self.environment: dict[str, str] = {}
        self._head: subprocess.Popen | None = None

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> "LocalRayCluster":
        """Start the head and wait for its address (RuntimeError with the head's output if it does not come up)."""
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are limited
        log_path = self.log_path or os.path.join(self.temp_dir, "head.log")
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # on SIGTERM `ray start --block` first drains its node (for Ray Serve) for up to 30 s, even when, as at
        # our stop, no driver is left to drain for
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        env["RAY_AUTH_MODE"] = env.get("RAY_AUTH_MODE") or "token"
        if env["RAY_AUTH_MODE"] == "token":
            _ensure_auth_token(env)
        command = [*_ray_command(), "start", "--head", "--block", "--port=0", f"--temp-dir={self.temp_dir}",
                   "--dashboard-port=0", f"--ray-client-server-port={_free_port()}",
                   f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
        command += [f"--num-cpus={self.num_cpus}"] if self.num_cpus is not None else []
        command += [f"--num-gpus={self.num_gpus}"] if self.num_gpus is not None else []
        if shutil.which("setpriv"):
            command = ["setpriv", "--pdeathsig", "TERM", "--", *command]
        with open(log_path, "ab") as log:
            self._head = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)
        address_file = os.path.join(self.temp_dir, "ray_current_cluster")
        deadline = time.monotonic() + timeout
        while not (os.path.exists(address_file) and Path(address_file).read_text().strip()):
            if self._head.poll() is not None or time.monotonic() > deadline:
                status = self._head.poll()
                output = Path(log_path).read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"the local Ray cluster did not start within {timeout:.0f} s (ray start: "
                                   f"{'running' if status is None else f'exit {status}'}; log {log_path}):\n{output}")
            time.sleep(0.2)
        self.address = Path(address_file).read_text().strip()
        self.environment = {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": env["RAY_AUTH_MODE"]}
        _logger.info("started a local Ray cluster at %s (session %d, temp dir %s)", self.address, self._head.pid,
                     self.temp_dir)
        return self

    def connect(self) -> None:
        """``ray.init`` this process to the cluster with the cluster's auth mode, as ``ray.init()`` does for a
        cluster it starts (Ray reads ``RAY_AUTH_MODE`` once: setting the variable after importing ray is not
        enough)."""
        import ray

        if self.environment["RAY_AUTH_MODE"] == "token":
            from ray._private.authentication.authentication_token_setup import enable_token_auth_by_default

            enable_token_auth_by_default()
        ray.init(address=self.address)

    @property
    def session(self) -> int | None:
        """The session (and process group) id of every process of this cluster."""
        return self._head.pid if self._head is not None else None

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM to the head (it drains its node and stops its processes), then SIGKILL to whatever of its
        session is left after ``grace`` seconds; the temp dir is removed."""
        head, self._head = self._head, None
        if head is None:
            return
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (head.poll() is None or session_processes(head.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = session_processes(head.pid)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if head.poll() is None:
            head.kill()
        head.wait()
        deadline = time.monotonic() + 10
        while left and session_processes(head.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            _logger.warning("the local Ray cluster's processes %s did not stop within %.0f s: killed", sorted(left),
                            grace)
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        _logger.info("stopped the local Ray cluster at %s", self.address)
