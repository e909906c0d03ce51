"""The Ray cluster launcher for real on this machine, with ``cluster/cluster.local.yaml``: an sshd of the test's
own on a free loopback port, then ``ray up``, ``ray exec``, ``ray submit cluster/pretrain_xl`` and
``cluster/finetune_ade20k``, ``ray down``, and no Ray process of that cluster left; and ``ray job submit`` of a
stage command to a head started by hand (``ray start --head --block``), the way KubeRay submits a RayJob.

Facts the test relies on (Ray 2.60):
- The cluster YAML has no SSH port: ``auth.ssh_proxy_command`` becomes ``-o ProxyCommand=...`` for every
  ssh and rsync call, so a relay to the sshd's port stands in for port 22 (users: a ``Host``/``Port`` entry
  in ~/.ssh/config, or ``nc %h PORT``).
- ``ray down`` runs ``ray stop`` on the head, which would end every Ray instance of the user on this machine:
  the sshd's sessions get a HOME of the test's own (sshd ``SetEnv HOME=``), whose ~/.bashrc (sourced by
  every launcher command) replaces ``ray stop`` by stopping exactly the processes of this cluster's
  temp dir. Nothing here runs the real ``ray stop``.
- ``ray up``/``ray submit`` copy files with rsync; the local provider keeps its state under
  ``$TMPDIR/ray``, the config cache in ``$TMPDIR``: both point into the test's temp dir.

Needs /usr/sbin/sshd, ssh, ssh-keygen and rsync (Debian: openssh-server, openssh-client, rsync); skipped,
saying which is missing, unless UNIREPLKNET_REQUIRE_SLURM=1 (CI), where it fails. ``ray job submit`` needs the Ray
dashboard (``ray[default]``): that test skips, saying so, without it.

Run as a script it is also the two helpers the test puts on the ssh path:
``python tests/test_ray_launcher.py relay HOST PORT`` (the ProxyCommand) and
``python tests/test_ray_launcher.py stop-ray TEMP_DIR`` (what ``ray stop`` does in the sshd's sessions)."""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
TOOLS = {"sshd": "/usr/sbin/sshd", "ssh": "ssh", "ssh-keygen": "ssh-keygen", "rsync": "rsync"}


# ------------------------------------------------------------------------- process helpers (also the script)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def processes_using(path: str, exclude: set[int] = frozenset()) -> dict[int, str]:
    """{pid: command line} of the processes whose command line names ``path`` or that hold a file under it
    open. Every Ray process of a node does one or the other with its temp dir (gcs_server, raylet, the
    agents, workers: their logs are there), including those that rename themselves (``ray::...``)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude or int(entry) == os.getpid():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            hit = path in command
            if not hit:
                for fd in os.listdir(f"/proc/{entry}/fd"):
                    try:
                        if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(path):
                            hit = True
                            break
                    except OSError:
                        continue
        except OSError:  # gone, or not ours to read
            continue
        if hit:
            found[int(entry)] = command.strip()[:200]
    return found


def stop_processes(pids, grace: float = 20.0) -> None:
    """SIGTERM each pid, SIGKILL what is left after ``grace`` seconds."""
    pids = set(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while pids and time.time() < deadline:
        pids = {pid for pid in pids if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)}
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def stop_ray_of(temp_dir: str) -> int:
    """``ray stop`` for one Ray instance only: the processes of ``temp_dir``, never this one's ancestors."""
    ancestors, pid = set(), os.getpid()
    while pid > 1:
        ancestors.add(pid)
        pid = _parent(pid)
    pids = processes_using(temp_dir, exclude=ancestors)
    print(f"stopping the {len(pids)} Ray processes of {temp_dir}", flush=True)
    stop_ray_processes(pids)
    return 0


def stop_ray_processes(pids: dict[int, str]) -> None:
    """In ``ray stop``'s order: the raylet first (its agents fate-share with it), then the other processes,
    the GCS last; SIGTERM to all at once leaves them waiting on each other."""
    raylet = [pid for pid, command in pids.items() if "/raylet/raylet " in command]
    gcs = [pid for pid, command in pids.items() if "/gcs/gcs_server " in command]
    stop_processes(raylet, grace=10)
    stop_processes(set(pids) - set(raylet) - set(gcs), grace=10)
    stop_processes(gcs, grace=10)


def relay(host: str, port: int) -> int:
    """stdin/stdout <-> TCP ``host:port``: ssh's ProxyCommand for an sshd on another port than 22."""
    import threading

    connection = socket.create_connection((host, port))

    def upstream():
        while data := os.read(0, 65536):
            connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    while data := connection.recv(65536):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["relay"]:
        sys.exit(relay(sys.argv[2], int(sys.argv[3])))
    if sys.argv[1:2] == ["stop-ray"]:
        sys.exit(stop_ray_of(sys.argv[2]))
    sys.exit(f"usage: {sys.argv[0]} relay HOST PORT | stop-ray TEMP_DIR")


# ----------------------------------------------------------------------------------------------- the tests

import pytest  # noqa: E402  (the helpers above run without pytest)
import torch  # noqa: E402
import yaml  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tools() -> None:
    missing = [name for name, path in TOOLS.items() if shutil.which(path) is None]
    if missing:
        message = (f"not installed: {', '.join(missing)} (Debian: openssh-server, openssh-client, rsync; "
                   "`make system-deps`)")
        if os.environ.get("UNIREPLKNET_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


class SSHServer:
    """sshd in the foreground on 127.0.0.1:``port``: its own host key, one authorized client key, sessions
    with HOME = ``root/home``; stopped by its PID."""

    def __init__(self, root: Path):
        self.root, self.home, self.port = root, root / "home", free_port()
        self.key = root / "client_key"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "SSHServer":
        self.home.mkdir(parents=True)
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / key)], check=True)
        shutil.copy(self.root / "client_key.pub", self.root / "authorized_keys")
        config = self.root / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}", f"HostKey {self.root / 'host_key'}",
            f"PidFile {self.root / 'sshd.pid'}", f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PrintMotd no",
            f"SetEnv HOME={self.home}", "LogLevel INFO", ""]))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        self.log = open(self.root / "sshd.log", "w")
        self.process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while True:
            assert self.process.poll() is None, f"sshd exited: {(self.root / 'sshd.log').read_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert time.time() < deadline, "sshd does not accept connections"
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def short_root():
    """A short directory under /tmp (Ray's socket paths must stay under 107 characters), removed after."""
    root = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sshd(short_root):
    """The sshd; afterwards nothing of it may be left: no session (they hold its log open), no relay."""
    require_tools()
    server = SSHServer(short_root / "ssh").start()
    try:
        yield server
    finally:
        server.stop()
        relays = f"test_ray_launcher.py relay 127.0.0.1 {server.port}"
        deadline = time.time() + 15
        while (left := {**processes_using(str(server.root)), **processes_using(relays)}) and time.time() < deadline:
            time.sleep(0.5)
        stop_processes(left)
    assert not left, f"sshd sessions or ssh relays survived the test: {left}"


def ray_ports() -> dict[str, int]:
    """A free port for every fixed port of a Ray head, so it cannot collide with other Ray instances here."""
    names = ["port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "metrics-export-port", "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
             "runtime-env-agent-port"]
    return {name: free_port() for name in names}


def render_local_config(sshd: SSHServer, root: Path, ray_temp: Path) -> tuple[Path, dict, dict[str, int]]:
    """cluster/cluster.local.yaml with this test's user, key, sshd (through the relay), ports and temp dir:
    (its path, the config, the head's ports)."""
    config = yaml.safe_load((REPO / "cluster" / "cluster.local.yaml").read_text())
    config["cluster_name"] = f"unireplknet-test-{os.getpid()}-{root.name}"
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(sshd.key),
                      "ssh_proxy_command": f"{sys.executable} -I {Path(__file__).resolve()} relay %h {sshd.port}"}
    ports = ray_ports()
    (command,) = config["head_start_ray_commands"]
    command = re.sub(r"--temp-dir=\S+", f"--temp-dir={ray_temp}", command)
    for name, port in ports.items():
        command, found = re.subn(rf"--{name}=\d+", f"--{name}={port}", command)
        if not found:
            command += f" --{name}={port}"
    config["head_start_ray_commands"] = [command + " --num-cpus=1"]
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config, ports


def write_head_bashrc(sshd: SSHServer, root: Path, ray_temp: Path, ray_address: str = "") -> None:
    """What every launcher command on the "head" sources: this venv first on PATH, the test's temp and run
    directories, and ``ray stop`` limited to this cluster's processes."""
    (root / "head-tmp").mkdir()
    helper = f"{sys.executable} {Path(__file__).resolve()}"
    (sshd.home / ".bashrc").write_text("\n".join([
        f"export PATH={VENV_BIN}:$PATH",
        "export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1",
        f"export TMPDIR={root / 'head-tmp'} UNIREPLKNET_RUN_ROOT={root / 'runs'}",
        *([f"export RAY_ADDRESS={ray_address}"] if ray_address else []),
        f'ray() {{ if [ "$1" = stop ]; then {helper} stop-ray {ray_temp}; else command ray "$@"; fi; }}', ""]))


def ssh_masters(cluster_name: str) -> tuple[dict[int, str], str]:
    """The ssh ControlMaster processes Ray's launcher leaves for ``ControlPersist`` (10 s) after a command."""
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    control = f"/tmp/ray_ssh_{user}/{hashlib.sha256(cluster_name.encode()).hexdigest()[:10]}"
    return processes_using(control), control


def run_ray(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run([RAY, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    result.output = result.stdout + result.stderr
    return result


def test_ray_up_submit_down_on_a_local_cluster(sshd, short_root):
    root, ray_temp = short_root, short_root / "ray"
    config_path, config, ports = render_local_config(sshd, root, ray_temp)
    write_head_bashrc(sshd, root, ray_temp, f"127.0.0.1:{ports['port']}")
    (root / "client-tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(root / "client-tmp"), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    yaml_file = str(config_path)
    try:
        up = run_ray("up", "-y", "--no-config-cache", yaml_file, env=env, timeout=300)
        assert up.returncode == 0, up.output[-4000:]
        assert any("gcs_server" in c for c in processes_using(str(ray_temp)).values()), up.output[-3000:]

        gcs = f"127.0.0.1:{ports['port']}"
        status = run_ray("exec", yaml_file, f"ray status --address={gcs}", env=env, timeout=120)
        assert status.returncode == 0 and "Autoscaler status" in status.output, status.output[-3000:]

        submitted = run_ray("submit", yaml_file, str(REPO / "cluster" / "pretrain_xl"), "--", "--dry-run",
                            "--set", "train.max_steps=7", env=env, timeout=180)
        assert submitted.returncode == 0, submitted.output[-4000:]
        assert f'"run_dir": "{root / "runs" / "pretrain_xl"}"' in submitted.output  # the head's environment
        assert '"max_steps": 7' in submitted.output and (sshd.home / "pretrain_xl").is_file()

        # the user's command for real: the demo fine-tune on generated data, a backbone file, CPU workers
        from finetune.ade20k.demo_data import write_demo
        import unireplknet

        write_demo(root / "ade20k", train_images=16, val_images=4, seed=0)
        backbone = unireplknet.UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                                           kernel_sizes=((3,), (13,), (13, 3), (13,)), num_classes=10)
        torch.save(unireplknet.export_official(backbone), root / "backbone.pth")
        finetune = run_ray("submit", yaml_file, str(REPO / "cluster" / "finetune_ade20k"), "--", "--config",
                           "ade20k_demo", "--data", str(root / "ade20k"), "--init", str(root / "backbone.pth"),
                           "--set", "launch.device=cpu", "launch.num_workers=1", "train.max_steps=3",
                           "ade20k.crop_size=64", "loader.num_workers=0", "train.micro_batch_size=4",
                           "train.global_batch_size=4", env=env, timeout=400)
        assert finetune.returncode == 0, finetune.output[-4000:]
        assert (sshd.home / "finetune_ade20k").is_file()
        run_dir = root / "runs" / "finetune_ade20k"
        assert json.loads((run_dir / "metrics.json").read_text())["step"] == 3
        assert json.loads((run_dir / "COMPLETE").read_text())["stage"] == "finetune_ade20k"

        down = run_ray("down", "-y", yaml_file, env=env, timeout=180)
        assert down.returncode == 0, down.output[-4000:]
        assert "stopping the" in down.output and str(ray_temp) in down.output  # our `ray stop`, not Ray's
        deadline = time.time() + 30
        while processes_using(str(ray_temp)) and time.time() < deadline:
            time.sleep(0.5)
        assert not processes_using(str(ray_temp)), processes_using(str(ray_temp))
    finally:
        left = processes_using(str(ray_temp))
        stop_ray_processes(left)
        masters, control = ssh_masters(config["cluster_name"])
        stop_processes(masters)
        shutil.rmtree(control, ignore_errors=True)
    assert not left, f"Ray processes of the launcher's cluster survived `ray down`: {left}"


def dashboard_missing() -> str | None:
    from ray._private.utils import get_dashboard_dependency_error

    error = get_dashboard_dependency_error()
    if error:
        return (f"ray job submit needs the Ray dashboard, which needs ray[default] ({error}); the project installs "
                "ray[train] only")
    return None


def test_ray_job_submit_runs_a_stage_command_on_a_head_started_by_hand(short_root):
    """What KubeRay's K8sJobMode submitter does: ``ray job submit`` to the head's dashboard, the entrypoint a
    stage command, the environment given with the job."""
    reason = dashboard_missing()
    if reason:
        pytest.skip(reason)
    ray_temp, ports = short_root / "ray", ray_ports()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head_log = open(short_root / "head.log", "w")
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--temp-dir={ray_temp}", "--num-cpus=1",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
                             *(f"--{name}={port}" for name, port in ports.items())],
                            stdout=head_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, (short_root / "head.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline, "the dashboard did not come up"
                time.sleep(0.5)
        job_env = json.dumps({"env_vars": {"UNIREPLKNET_RUN_ROOT": str(short_root / "runs"),
                                           "UNIREPLKNET_NUM_WORKERS": "8", "RAY_AUTH_MODE": "disabled"}})
        ok = run_ray("job", "submit", "--address", dashboard, "--runtime-env-json", job_env, "--",
                     "python", "-m", "cluster.stage", "pretrain_xl", "--dry-run", env=env, timeout=180)
        assert ok.returncode == 0, ok.output[-4000:]
        assert f'"run_dir": "{short_root / "runs" / "pretrain_xl"}"' in ok.output and "succeeded" in ok.output
        failed = run_ray("job", "submit", "--address", dashboard, "--runtime-env-json", job_env, "--",
                         "python", "-m", "cluster.stage", "export", "--dry-run", env=env, timeout=180)
        assert failed.returncode != 0 and "has no checkpoint yet (run pretrain_xl first)" in failed.output, \
            failed.output[-3000:]
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        head_log.close()
        deadline = time.time() + 30
        while processes_using(str(ray_temp)) and time.time() < deadline:
            time.sleep(0.5)
        left = processes_using(str(ray_temp))
        stop_ray_processes(left)
    assert not left, f"Ray processes survived the head's SIGTERM: {left}"
