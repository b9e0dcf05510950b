"""Flower's deployment runtime on this machine: a SuperLink and N SuperNodes as real
processes on 127.0.0.1, the federated job submitted with ``flwr run``, everything stopped by
PID at the end (or when anything fails or the time runs out).

    python -m ffrag_jax.federated.flower.deployment WORKDIR N [launcher flags...]

(``launch/flower_local.sh`` is this command.) SuperNode ``k`` gets ``--node-config
"partition-id=k num-partitions=N"``: it is client ``k`` and loads only its own data. Logs go to
``WORKDIR.flower-logs/``. :class:`LocalFederation` is the same for tests: kill a SuperNode
mid-run, kill the server and submit the run again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ffrag_jax.cli.local_cluster import free_port
from ffrag_jax.errors import UserError

APP_DIR = Path(__file__).resolve().parent / "app"  # pyproject.toml naming the two apps


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (free ports), with a private
    ``FLWR_HOME`` whose only connection is this SuperLink."""

    def __init__(self, num_nodes: int, logs: str | Path, app_dir: Path = APP_DIR):
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.app_dir = app_dir
        self.home = Path(tempfile.mkdtemp(prefix="ffrag-flwr-"))
        self.port = free_port()
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(self.home)}
        self.superlink = self._start("superlink", [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.home / "state.db")])
        self.nodes = [self.start_node(k, num_nodes) for k in range(num_nodes)]

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("a")
        # Own process group: stopping it reaches what it started (ServerApp, ClientApps).
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)

    def start_node(self, k: int, num_nodes: int) -> subprocess.Popen:
        """SuperNode ``k`` (client ``k``)."""
        return self._start(f"supernode_{k}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(free_port()),
            "--node-config", f"partition-id={k} num-partitions={num_nodes}"])

    def _flwr(self, *args: str) -> dict:
        out = subprocess.run(["flwr", *args, "--format", "json"], env=self.env,
                             capture_output=True, text=True, timeout=120)
        text = out.stdout.strip() or out.stderr.strip()
        try:
            return json.loads(text[text.index("{"):])
        except ValueError:
            return {"success": False, "error-message": text}

    def submit(self, config_file: str | Path, workdir: str | Path, wait_s: float = 60) -> str:
        """``flwr run`` of the job; its run id. Retried while the SuperLink is starting."""
        deadline = time.monotonic() + wait_s
        while True:
            out = self._flwr("run", str(self.app_dir), "local", "--run-config",
                             f"config-file='{Path(config_file).resolve()}' "
                             f"workdir='{Path(workdir).resolve()}'")
            if out.get("run-id"):
                return str(out["run-id"])
            message = str(out.get("error-message", out))
            if "unavailable" not in message or time.monotonic() > deadline:
                raise UserError(f"flwr run failed: {message.splitlines()[-1]}")
            time.sleep(1)

    def status(self, run_id: str) -> str:
        """The run's status as ``flwr ls`` reports it (``finished:completed``, ...)."""
        out = self._flwr("ls", "local", "--run-id", run_id)
        runs = out.get("runs") or []
        return str(runs[0].get("status", "")) if runs else ""

    def wait(self, run_id: str, workdir: str | Path, timeout_s: float, poll=None) -> None:
        """Until the run's ``summary.json`` is written; a UserError if the run fails first or
        ``timeout_s`` passes. ``poll()`` is called every second (a test's fault injection)."""
        summary = Path(workdir) / "summary.json"
        deadline = time.monotonic() + timeout_s
        checked = 0.0
        while not summary.exists():
            if poll is not None:
                poll()
            if time.monotonic() - checked > 5:
                checked = time.monotonic()
                status = self.status(run_id)
                if status.startswith("finished") and not summary.exists():
                    time.sleep(2)  # the summary may land just after the status
                    if not summary.exists():
                        raise UserError(f"the Flower run {run_id} ended ({status}) without "
                                        f"a summary; logs in {self.logs}")
            if time.monotonic() > deadline:
                raise UserError(f"the Flower run {run_id} wrote no summary in {timeout_s:.0f} "
                                f"s; logs in {self.logs}")
            time.sleep(1)

    def kill_node(self, k: int) -> None:
        """SIGKILL SuperNode ``k`` and what it started (a client machine dies)."""
        os.killpg(self.nodes[k].pid, signal.SIGKILL)
        self.nodes[k].wait()

    def kill_server(self) -> bool:
        """SIGKILL the ServerApp process (the SuperLink lives on); whether one was found."""
        found = [p for p in _descendants(self.superlink.pid)
                 if "flwr-serverapp" in _cmdline(p)]
        for p in found:
            os.kill(p, signal.SIGKILL)
        return bool(found)

    def stop(self) -> None:
        procs = [self.superlink, *self.nodes]
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + 5
        while time.monotonic() < end and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        shutil.rmtree(self.home, ignore_errors=True)  # our own mkdtemp

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def write_config(workdir: str | Path, flags: list[str]) -> Path:
    """The run's JSON config from launcher flags (``configure``, in a child process: absl
    flags are global)."""
    out = subprocess.run([sys.executable, "-m", "ffrag_jax.federated.flower.configure",
                          f"--workdir={workdir}", *flags], capture_output=True, text=True)
    if out.returncode:
        lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        raise UserError((lines or [out.stderr.strip().splitlines()[-1]])[-1]
                        .removeprefix("error: "))
    return Path(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    workdir, n, flags = argv[0], int(argv[1]), argv[2:]
    timeout = float(os.environ.get("FLOWER_TIMEOUT", 3600))
    try:
        config = write_config(workdir, flags)
        with LocalFederation(n, f"{workdir.rstrip('/')}.flower-logs") as fed:
            print(f"SuperLink 127.0.0.1:{fed.port} (pid {fed.superlink.pid}), SuperNodes "
                  f"{[p.pid for p in fed.nodes]}; logs in {fed.logs}", file=sys.stderr)
            run_id = fed.submit(config, workdir)
            print(f"run {run_id} submitted", file=sys.stderr)
            fed.wait(run_id, workdir, timeout)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
