"""The one training loop of every job: resume, checkpoints, metrics, progress, hooks.

A job composes a :class:`Trainer` with a step function and hooks (as Levanter's
``Trainer.add_hook``); it owns no resume, checkpoint or progress code of its own. A "step" is
whatever the job advances by: an optimizer step (pretraining, LoRA, the RAG and retriever
jobs) or a federated round (the federated jobs, where the step function runs a round and
reports its clients through :meth:`Progress.within`).

    trainer = Trainer("lora", ckpt_dir=..., metrics=metrics, total=300, checkpoint_every=100)
    trainer.add_hook(log_loss, every=25)
    start, state = trainer.initial_state(state)       # the latest checkpoint, or step 0
    state = trainer.run(state, step_fn, start)         # step_fn(state, step) -> (state, out)

Everything a step needs is a pure function of its index (data order, random keys), so a
resumed run is the same computation as an uninterrupted one; the metrics log is cut back to
the checkpoint it resumes from (:mod:`ffrag_jax.training.workdir`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from absl import logging

from ffrag_jax.errors import UserError
from ffrag_jax.training import checkpoint, interrupts
from ffrag_jax.training.metrics import MetricsLog
from ffrag_jax.training.progress import Progress


@dataclasses.dataclass
class StepInfo:
    """What a hook sees: ``step`` steps are done (of ``total``), the state after them, and
    what the last step returned."""

    step: int
    total: int
    state: Any
    out: dict

    @property
    def last(self) -> bool:
        return self.step == self.total


@dataclasses.dataclass
class _Hook:
    fn: Callable[[StepInfo], None]
    every: int
    at_end: bool


def profile_range(value) -> tuple[int, int] | None:
    """``config.profile_steps`` as ``(first, last)`` (1-based, inclusive): None, an int, or
    a pair; a UserError otherwise."""
    if value in (None, "", "None"):
        return None
    steps = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise UserError(f"profile_steps={value!r}: give a step or (first, last), 1 <= first "
                        "<= last")
    return steps


def profiling(config, workdir: Path) -> dict:
    """The :class:`Trainer` arguments of ``config.profile_steps``: a jax.profiler trace of
    those steps (or rounds) of the job's main loop, written to ``workdir/profile``."""
    return {"profile_steps": config.get("profile_steps"), "profile_dir": Path(workdir) / "profile"}


class Trainer:
    """Runs ``step_fn`` from a restored step to ``total``, checkpointing every
    ``checkpoint_every`` steps and at the end, calling hooks, and showing progress.

    ``checkpointed``: the part of the state that a checkpoint holds (default: all of it);
    ``restore_into(state, saved)`` puts it back. ``wait_each_save``: finish every checkpoint
    before the next step (a round is minutes of work; a step is milliseconds)."""

    def __init__(self, name: str, *, ckpt_dir: Path, metrics: MetricsLog, total: int,
                 checkpoint_every: int = 1, max_to_keep: int = 2,
                 unit: str = "step", wait_each_save: bool = False,
                 checkpointed: Callable[[Any], Any] | None = None,
                 restore_into: Callable[[Any, Any], Any] | None = None,
                 profile_steps: Sequence[int] | None = None, profile_dir: Path | None = None):
        if total < 0:
            raise UserError(f"{name}: the number of {unit}s must be >= 0, got {total}")
        self.name, self.total, self.unit = name, int(total), unit
        self.metrics, self.checkpoint_every = metrics, max(int(checkpoint_every), 1)
        self.wait_each_save = wait_each_save
        self.checkpointed = checkpointed or (lambda state: state)
        self.restore_into = restore_into or (lambda state, saved: saved)
        self.profile = profile_range(profile_steps)
        self.profile_dir = profile_dir
        self._tracing = False
        self._hooks: list[_Hook] = []
        self._mngr = checkpoint.manager(Path(ckpt_dir) / name, max_to_keep=max_to_keep)
        self.progress: Progress | None = None

    def add_hook(self, fn: Callable[[StepInfo], None], *, every: int = 1,
                 at_end: bool = True) -> None:
        """Calls ``fn(info)`` after every ``every``-th step (and after the last, unless
        ``at_end=False``), in the order hooks were added, before the step's checkpoint."""
        self._hooks.append(_Hook(fn, max(int(every), 1), at_end))

    def initial_state(self, state):
        """``(start, state)``: the latest checkpoint's step and state, or ``(0, state)``."""
        start, saved = checkpoint.restore_latest(self._mngr, self.checkpointed(state))
        if start:
            logging.info("%s: resuming after %s %d", self.name, self.unit, start)
            state = self.restore_into(state, saved)
        return start, state

    def run(self, state, step_fn: Callable[[Any, int], tuple[Any, dict]], start: int = 0):
        """Steps ``start`` .. ``total - 1``: ``state, out = step_fn(state, step)`` (``step``
        0-based; ``out`` a dict of host values, or empty); returns the final state."""
        if start >= self.total:
            self._mngr.close()
            return state
        with Progress(self.name, total=self.total, initial=start,
                      unit=self.unit) as self.progress:
            for step in range(start, self.total):
                self._maybe_profile(step + 1, starting=True)
                state, out = step_fn(state, step)
                done = step + 1
                self._maybe_profile(done, starting=False)
                info = StepInfo(done, self.total, state, out or {})
                for hook in self._hooks:
                    if done % hook.every == 0 or (hook.at_end and info.last):
                        hook.fn(info)
                self.progress.update(done)  # no host sync here: hooks show values (show())
                if done % self.checkpoint_every == 0 or info.last:
                    checkpoint.save(self._mngr, done, self.checkpointed(state), self.metrics)
                    if self.wait_each_save:
                        self._mngr.wait_until_finished()
                interrupts.check()  # a stop whose KeyboardInterrupt a library swallowed
        self.progress = None
        # An interrupted run leaves its manager open: the launcher finishes the save in
        # flight (checkpoint.wait_for_pending_saves) before it exits.
        self._mngr.wait_until_finished()
        self._mngr.close()
        return state

    def show(self, **values) -> None:
        """Values (host floats) to show beside the progress: ``show(loss=0.41)``."""
        if self.progress is not None:
            self.progress.show(**values)

    def within(self, what: str, done: int, total: int) -> None:
        """Progress inside the running step (see :meth:`Progress.within`)."""
        if self.progress is not None:
            self.progress.within(what, done, total)

    def _maybe_profile(self, step: int, *, starting: bool) -> None:
        if self.profile is None or self.profile_dir is None:
            return
        first, last = self.profile
        # A run resumed inside the range traces the rest of it; stop only what was started.
        if starting and not self._tracing and first <= step <= last:
            logging.info("%s: tracing %ss %d-%d to %s (jax.profiler; open it in TensorBoard "
                         "or Perfetto)", self.name, self.unit, step, last, self.profile_dir)
            jax.profiler.start_trace(str(self.profile_dir))
            self._tracing = True
        elif not starting and self._tracing and (step >= last or step == self.total):
            jax.effects_barrier()
            jax.profiler.stop_trace()
            self._tracing = False
