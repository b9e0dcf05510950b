"""Multi-process runs (TPU pod slices, GPU clusters, several CPU processes): start-up and the
one rule of who writes.

Every process runs the same program on the same config (SPMD): the same mesh over all
processes' devices, the same host-side data pipeline (deterministic in seed, round and client),
the same jitted steps. ``jax.device_put`` of a host array onto a mesh sharding transfers only
the shards that live on this process's devices, so each process feeds only its share of a
global batch. Collectives (gathers for an export, orbax's barriers) are therefore reached by
every process in the same order, which is what keeps a multi-process program from hanging.

Writes: process 0 owns ``--workdir`` (the lock, metrics, plots, exports, summary). Checkpoints
are orbax multi-process checkpoints under ``WORKDIR/checkpoints``, written by all processes
together (each its own shards; process 0 the metadata), so that folder must be on storage all
hosts see. Every other process writes its (identical) copies of the host-side outputs to a
private scratch folder whose ``checkpoints`` is a link to the shared one, deleted at exit: no
job needs an ``if process_index() == 0`` of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np
from absl import logging

from ffrag_jax.errors import UserError


def env_int(name: str) -> int | None:
    """The integer in environment variable ``name`` (negative ones too, so that a bad value
    reaches the range check and its message), or None."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else None


def cluster_detected() -> str | None:
    """The multi-process launcher this process runs under (which JAX can initialise from
    without arguments), or None for a single process."""
    if (env_int("SLURM_STEP_NUM_TASKS") or 1) > 1:  # inside an srun of several tasks
        return "SLURM"
    if (env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "Open MPI"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU pod"
    return None


def _reachable(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _parse_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--coordinator_address={address!r} is not HOST:PORT")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
    """Starts ``jax.distributed`` when asked (``coordinator_address``) or when a cluster is
    detected (:func:`cluster_detected`); a single process otherwise. Must run before JAX
    touches a device.

    JAX aborts the whole process (a C++ check failure, pages of stack) when the coordinator
    cannot be reached or not every process joins in time; a watchdog turns that into one line
    a little before JAX's own deadline, and exits with status 2 (nothing was written yet).
    """
    explicit = coordinator_address is not None
    if not explicit and (num_processes is not None or process_id is not None):
        raise UserError("--num_processes and --process_id need --coordinator_address "
                        "(HOST:PORT of process 0)")
    if explicit:
        _parse_address(coordinator_address)
        if num_processes is None or process_id is None:
            raise UserError("--coordinator_address needs --num_processes and --process_id")
        if num_processes < 1:
            raise UserError(f"--num_processes must be at least 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id} is not in [0, {num_processes}) "
                            f"(--num_processes={num_processes})")
        if num_processes == 1:
            return
        where = f"process {process_id} of {num_processes}, coordinator {coordinator_address}"
    else:
        cluster = cluster_detected()
        if cluster is None:
            return
        where = f"{cluster} detected"
    if "cpu" in (jax.config.jax_platforms or "cpu"):
        # CPU devices of different processes talk through gloo (the default has none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def give_up() -> None:
        reason = ("the coordinator was not reachable" if explicit and process_id and
                  not _reachable(coordinator_address) else
                  "not every process joined (a process count that does not match the "
                  "processes started?)")
        print(f"error: jax.distributed did not start within {timeout_s} s ({where}): "
              f"{reason}", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        if explicit:
            jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                       initialization_timeout=timeout_s + 60)
        else:
            jax.distributed.initialize(initialization_timeout=timeout_s + 60)
    finally:
        watchdog.cancel()
    check_devices()
    logging.info("jax.distributed: process %d of %d, %d local of %d devices (%s)",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), where)


def check_devices() -> None:
    """Every process must bring the same number of devices (the mesh is one global array of
    them); a UserError naming the counts otherwise."""
    counts = {d.process_index: 0 for d in jax.devices()}
    for d in jax.devices():
        counts[d.process_index] += 1
    if len(set(counts.values())) > 1:
        raise UserError(f"the processes have different numbers of devices {counts}; give "
                        "each the same (e.g. one process per GPU, or per node)")


def is_writer() -> bool:
    """Whether this process writes the workdir's host-side outputs (process 0)."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def agree(ok: bool) -> bool:
    """Process 0's ``ok`` on every process (a collective: all must call it)."""
    if not multi_process():
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


SCRATCH_MARKER = ".ffrag_jax_scratch"


@contextlib.contextmanager
def scratch_workdir(shared: Path):
    """A private folder standing in for ``shared`` on a process other than 0: its
    ``checkpoints`` is a link to the shared checkpoints (which process 0 made); the rest is
    deleted at exit. A folder of that name is only deleted when its marker says ffrag_jax
    made it (rmtree unlinks the link; the shared checkpoints are never followed)."""
    folder = scratch_folder(shared)
    if folder.exists():  # left by a killed run of the same workdir
        if not (folder / SCRATCH_MARKER).exists():
            raise UserError(f"{folder} exists and was not made by ffrag_jax; move it away")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / SCRATCH_MARKER).touch()
    try:
        (folder / "checkpoints").symlink_to((shared / "checkpoints").absolute(),
                                            target_is_directory=True)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def scratch_folder(shared: Path, process: int | None = None) -> Path:
    """Where process ``process`` (default: this one) of a run in ``shared`` keeps its
    scratch copy: one name per workdir and process, so a killed run's is found again."""
    key = hashlib.sha1(str(shared.absolute()).encode()).hexdigest()[:12]
    index = jax.process_index() if process is None else process
    return Path(tempfile.gettempdir()) / f"ffrag-jax-{key}-process{index}"
