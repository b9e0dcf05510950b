"""Run one launch as N processes on this machine: a multi-process run without a cluster.

  python -m ffrag_jax.cli.local_cluster --processes 2 --cpu_devices 4 -- \\
      --config heter --workdir runs/heter-2proc

starts ``python -m ffrag_jax.launch ARGS --coordinator_address 127.0.0.1:PORT
--num_processes N --process_id i`` for every i, on a free port. On CPU, ``--cpu_devices``
fakes that many devices per process (2 processes x 4 devices run the mesh of one 8-device
host). What it shows a user is what a pod or cluster does: the same program on every process,
process 0 writing the workdir. It ends when all processes end, or stops them all when one fails
or ``--timeout`` passes, so a broken run never hangs. Its exit status is the first non-zero
one of the processes (process 0's error line is printed last).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(cpu_devices: int | None) -> dict:
    env = dict(os.environ)
    if cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags,
                                     f"--xla_force_host_platform_device_count={cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"  # fake devices are CPU devices, whatever the parent uses
    return env


def run(args: list[str], processes: int, cpu_devices: int | list[int] | None = None,
        timeout_s: float = 600, logs: Path | None = None,
        kill_when=None) -> list[subprocess.CompletedProcess]:
    """Runs the launcher with ``args`` as ``processes`` processes on 127.0.0.1; returns each
    one's ``CompletedProcess`` (stderr read from its log file under ``logs``).
    ``cpu_devices``: fake CPU devices per process (one count for all, or one per process).

    ``kill_when()`` (optional) is polled; when it returns True every process is killed with
    SIGKILL (a test's "the machine died mid-run"). A process that fails, or the timeout,
    stops the others too."""
    logs = Path(logs or tempfile.mkdtemp(prefix="ffrag-jax-cluster-"))
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    counts = cpu_devices if isinstance(cpu_devices, list) else [cpu_devices] * processes
    procs, files = [], []
    for i in range(processes):
        env = child_env(counts[i])
        err = (logs / f"process{i}.log").open("w")
        files.append(err)
        cmd = [sys.executable, "-m", "ffrag_jax.launch", *args,
               f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
               f"--process_id={i}", f"--distributed_timeout={min(int(timeout_s), 120)}"]
        # Own process group: the stop below reaches anything a process started.
        procs.append(subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline or (kill_when and kill_when()):
                # A failed process leaves the others blocked in a collective: stop them.
                grace = 10 if failed else 0
                end = time.monotonic() + grace
                while time.monotonic() < end and any(p.poll() is None for p in procs):
                    time.sleep(0.1)
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        for p in procs:
            p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in files:
            f.close()
    return [subprocess.CompletedProcess(p.args, p.returncode, "",
                                        (logs / f"process{i}.log").read_text(errors="replace"))
            for i, p in enumerate(procs)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Everything after -- goes to python -m ffrag_jax.launch.")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cpu_devices", type=int, default=None,
                        help="fake this many CPU devices per process (CPU runs)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds before every process is stopped")
    parser.add_argument("--logs", default=None, help="folder for process<i>.log")
    parser.add_argument("launch_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    launch_args = [a for a in args.launch_args if a != "--"]
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    results = run(launch_args, args.processes, args.cpu_devices, args.timeout, args.logs)
    for i, r in reversed(list(enumerate(results))):
        print(f"== process {i}: exit status {r.returncode}", file=sys.stderr)
        print(r.stderr[-4000:] if r.returncode else r.stderr[-600:], file=sys.stderr)
    return next((r.returncode for r in results if r.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
