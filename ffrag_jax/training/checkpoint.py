"""Orbax checkpoints of train states: save every N steps, resume from the latest.

Each phase of a job has its own manager under ``workdir/checkpoints/<phase>``. A checkpoint
records, in orbax's step metadata, the length of ``metrics.jsonl`` when it was saved, so that
a resumed run can cut the log back to exactly that point (:func:`metrics_offsets`).
"""

from __future__ import annotations

import errno
import json
import shutil
import weakref
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ffrag_jax.training import interrupts, sharding

# Managers still open: on an interrupt, their in-flight asynchronous saves are finished before
# the process exits (wait_for_pending_saves), so a Ctrl-C never costs a checkpoint.
_OPEN: weakref.WeakSet = weakref.WeakSet()


def manager(directory: str | Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a save cut short by a kill leaves orbax's temporary folder;
    # it is never read back, and is removed the next time the phase opens its manager.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True)
    mngr = ocp.CheckpointManager(Path(directory).absolute(), options=options)
    _OPEN.add(mngr)
    return mngr


def check_room(directory: Path, state) -> None:
    """An ``OSError(ENOSPC)`` before a save that cannot fit: a save that runs out of room
    fails in orbax's background threads, which print dozens of tracebacks before the error
    reaches the run, and leaves a partial folder behind."""
    need = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
    free = shutil.disk_usage(directory).free
    if free < 1.1 * need + (1 << 20):
        raise OSError(errno.ENOSPC, f"No space left on device: a {need / 1e6:.1f} MB "
                      f"checkpoint does not fit in the {free / 1e6:.1f} MB free",
                      str(directory))


def save(mngr: ocp.CheckpointManager, step: int, state, metrics) -> None:
    """Saves asynchronously, with the current length of ``metrics`` (a
    :class:`~ffrag_jax.training.metrics.MetricsLog`); call ``mngr.wait_until_finished()``
    before reading it back. A Ctrl-C during the hand-over to orbax waits for its end
    (:func:`~ffrag_jax.training.interrupts.deferred`)."""
    with interrupts.deferred():
        mngr.wait_until_finished()  # the previous save's room is taken before this one's check
        check_room(Path(mngr.directory), state)
        state = sharding.process_local_to_global(state)
        mngr.save(step, args=ocp.args.StandardSave(state),
                  custom_metadata={"metrics_offset": metrics.offset()})


def restore_latest(mngr: ocp.CheckpointManager, like):
    """``(step, state)`` of the latest checkpoint restored with ``like``'s structure and
    shardings, or ``(0, like)`` when there is none."""
    step = mngr.latest_step()
    if step is None:
        return 0, like
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            sharding.process_local_to_global(like))
    state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    return step, sharding.global_to_process_local(state, like)


def wait_for_pending_saves(timeout_s: float | None = None) -> bool:
    """Finishes every asynchronous save still in flight (called on an interrupt); False when
    they are not done after ``timeout_s`` (the exit must not hang on a broken save: the
    checkpoint before it is still there, and orbax never reads a partial one)."""
    import threading

    done = threading.Event()

    def finish():
        for mngr in list(_OPEN):
            mngr.wait_until_finished()
        done.set()

    threading.Thread(target=finish, daemon=True).start()
    return done.wait(timeout_s)


def _phases(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _latest(folder: Path) -> int | None:
    """The latest finalized step in a phase's folder, or None. Read from the folder without a
    CheckpointManager: in a multi-process run a manager is a collective (its constructor
    synchronises the processes), and the workdir is inspected by process 0 alone."""
    steps = ocp.step.checkpoint_steps(folder)
    return max(steps) if steps else None


def latest_steps(root: str | Path) -> dict[str, int]:
    """``{phase: latest step}`` of the phases under ``root`` that have a checkpoint."""
    out = {}
    for folder in _phases(Path(root)):
        step = _latest(folder)
        if step is not None:
            out[folder.name] = step
    return out


def has_any(root: str | Path) -> bool:
    return bool(latest_steps(root))


def metrics_offsets(root: str | Path) -> dict[str, int | None]:
    """``{phase: metrics.jsonl length}`` at each phase's latest checkpoint (``None`` for a
    checkpoint written without one). The custom metadata is read from the step's orbax
    metadata file (``_CHECKPOINT_METADATA``, JSON), for the reason given in :func:`_latest`."""
    out = {}
    for folder in _phases(Path(root)):
        step = _latest(folder)
        if step is not None:
            path = Path(ocp.step.find_step_path(folder, ocp.step.standard_name_format(),
                                                step=step)) / "_CHECKPOINT_METADATA"
            try:
                meta = json.loads(path.read_text()).get("custom_metadata") or {}
            except (OSError, ValueError):
                meta = {}
            out[folder.name] = meta.get("metrics_offset")
    return out
