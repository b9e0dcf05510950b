"""Orbax checkpoints of train states: save every N steps, resume from the latest."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


def manager(directory: str | Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Saves asynchronously; call ``mngr.wait_until_finished()`` before reading it back."""
    mngr.save(step, args=ocp.args.StandardSave(state))


def restore_latest(mngr: ocp.CheckpointManager, like):
    """``(step, state)`` of the latest checkpoint restored with ``like``'s structure and
    shardings, or ``(0, like)`` when there is none."""
    step = mngr.latest_step()
    if step is None:
        return 0, like
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract))
