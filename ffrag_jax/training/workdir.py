"""The run folder (``--workdir``): who owns it, who may write to it, and where a run resumes.

The contract, for every job:

* **Ownership.** A folder made by ffrag_jax carries the marker file ``.ffrag_jax_run``. Only
  such a folder is ever deleted from, and only the outputs ffrag_jax writes there
  (:data:`OUTPUTS`); a user's own files beside them are left alone. A non-empty folder that is
  not a run is refused, with or without ``--overwrite``.
* **One writer.** A run holds an OS lock (``fcntl.flock``) on ``.ffrag_jax.lock`` for its
  whole life; a second run on the same folder is refused with the PID that holds it. The OS
  releases the lock when its process dies, however it dies, so a killed run never leaves a
  stale lock behind.
* **Resume to the last checkpoint, exactly.** Every checkpoint records how many bytes of
  ``metrics.jsonl`` were written when it was saved. A resumed run first cuts the log back to
  the latest checkpoint's length: the records of the work it is about to redo (and a line torn
  by a kill) are dropped, none are written twice.
* **A start that failed on bad input does not hold the folder.** A run that stopped on a
  :class:`UserError` before its first checkpoint says so in its marker; the corrected command
  (a different config) starts the folder afresh. Any other unfinished run with a different
  config is refused unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from absl import logging
from ml_collections import ConfigDict

from ffrag_jax import files
from ffrag_jax.errors import UserError
from ffrag_jax.training import checkpoint

MARKER = ".ffrag_jax_run"
LOCK = ".ffrag_jax.lock"
# Everything a job writes at the top of its workdir (besides the lock file, which stays). Only
# these are deleted by --overwrite; tests check that a run writes nothing else.
OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "loss.png", "rounds.png",
           "predictions.jsonl", "tensorboard", "profile",
           "checkpoints", "export", "tokenizer", "data",
           "flower",  # the Flower server's published base model (fl.engine=flower)
           MARKER)


def first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    """``"key.sub: old -> new"`` of the first (sorted) setting that differs; None if none."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diff = first_difference(a, b, f"{prefix}{key}.")
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{key}: {a!r} -> {b!r}"
    return None


# Settings a finished run can be continued with, when raised: every federated round starts its
# clients' optimizers afresh, so 3 rounds continued to 5 are exactly a 5-round run. (More
# steps of a step-based phase would change its learning-rate schedule: that is a new run.)
CONTINUABLE = (("fl", "rounds"),)


def continuation(old: dict, new: dict) -> str | None:
    """``"fl.rounds 3 -> 5"`` when ``new`` differs from a finished run's ``old`` config only by
    raising continuable settings; None otherwise (a UserError when something else differs)."""
    changed = []
    for section, key in CONTINUABLE:
        a, b = old.get(section, {}).get(key), new.get(section, {}).get(key)
        if a is None or a == b:
            continue
        if not (isinstance(a, int) and isinstance(b, int) and b > a):
            raise UserError(f"a finished run continues only with more {section}.{key} "
                            f"(it ran {a}, asked {b}); pass --overwrite to replace it")
        changed.append(f"{section}.{key} {a} -> {b}")
        old = {**old, section: {**old[section], key: b}}
    if not changed:
        return None
    diff = first_difference(old, new)
    if diff:
        raise UserError(f"a finished run continues with more fl.rounds and nothing else "
                        f"changed ({diff}); pass --overwrite or choose another --workdir")
    return ", ".join(changed)


def resolved_config(config: ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _ours_in_flight(name: str) -> bool:
    """A temporary file of ffrag_jax's own atomic write of the marker or the config
    (``.<name>.<random>.tmp``): a run being created right now, by the lock's holder."""
    return name.endswith(".tmp") and any(name.startswith(f".{ours}.")
                                         for ours in (MARKER, "config.json"))


def _entries(workdir: Path) -> list[str]:
    return sorted(p.name for p in workdir.iterdir()
                  if p.name != LOCK and not _ours_in_flight(p.name))


def _check_is_folder(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a folder; choose a folder")


def check_not_foreign(workdir: Path) -> None:
    """Refuses (before anything is written) a non-empty folder that is not an ffrag_jax run."""
    _check_is_folder(workdir)
    if not workdir.exists():
        return
    names = _entries(workdir)
    if names and MARKER not in names and not _is_older_run(workdir):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(f"--workdir {workdir} holds no ffrag_jax run (it holds {shown}); "
                        "choose an empty or new folder (--overwrite only ever replaces "
                        "ffrag_jax runs)")


def _is_older_run(workdir: Path) -> bool:
    """A run folder of a version before the marker: its config.json beside run outputs (a
    model folder's config.json alone does not count)."""
    return (workdir / "config.json").is_file() and (
        (workdir / "metrics.jsonl").exists() or (workdir / "checkpoints").is_dir())


class Lock:
    """An exclusive ``flock`` on ``workdir/.ffrag_jax.lock``, holding the owner's PID."""

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self.path.read_text().strip() or "unknown"
            raise UserError(f"--workdir {self.path.parent} is in use by another run "
                            f"({holder}); wait for it to end or choose another --workdir"
                            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def delete_outputs(workdir: Path) -> list[str]:
    """Deletes what ffrag_jax wrote in ``workdir`` (:data:`OUTPUTS`, the marker last, so that
    an interrupted delete still leaves a folder marked as ours); returns the names deleted."""
    gone = []
    for name in (*[n for n in OUTPUTS if n != MARKER], MARKER):
        path = workdir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        gone.append(name)
    return gone


def _marker(workdir: Path) -> dict:
    try:
        return json.loads((workdir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def mark_failed_start(workdir: Path, reason: str) -> None:
    """Records in the marker that the run stopped on bad input before its first checkpoint:
    the corrected command (a different config) may then start the folder afresh."""
    if not checkpoint.has_any(workdir / "checkpoints"):
        files.atomic_write_json(workdir / MARKER, {**_marker(workdir), "failed_start": reason})


def _process_count() -> int:
    import jax

    return jax.process_count()


def _check_process_count(workdir: Path) -> None:
    """A run resumes on the process count that wrote its checkpoints (each process restores
    its own shards of them)."""
    wrote = _marker(workdir).get("processes", 1)
    if wrote != _process_count() and checkpoint.has_any(workdir / "checkpoints"):
        raise UserError(f"the checkpoints in {workdir} were written by {wrote} process(es) and "
                        f"this run has {_process_count()}: resume it with {wrote}, or pass "
                        "--overwrite to start again")


def _read_config(workdir: Path) -> dict:
    path = workdir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); pass --overwrite to "
                        "replace this run, or choose another --workdir") from None


def prepare(config: ConfigDict, workdir: Path, overwrite: bool) -> str:
    """Readies a locked ``workdir`` for ``config``; returns ``"new"`` or ``"resume"``.

    The config must already be validated: this is where an old run may be deleted.
    """
    resolved = resolved_config(config)
    names = _entries(workdir)
    if names:
        owned = MARKER in names
        if overwrite:
            if not owned:
                raise UserError(
                    f"--overwrite replaces only runs made by ffrag_jax, and {workdir} has no "
                    f"{MARKER} marker (a run of an older version, or not a run): move it away "
                    "or choose another --workdir")
            logging.warning("--overwrite: deleting the previous run's outputs in %s: %s",
                            workdir, ", ".join(delete_outputs(workdir)))
        elif "config.json" not in names:
            raise UserError(f"--workdir {workdir} holds an incomplete ffrag_jax run with no "
                            "config.json; pass --overwrite to replace it")
        elif (workdir / "summary.json").exists():
            old = _read_config(workdir)
            more = continuation(old, resolved)
            if more is None:
                hint = (f" or raise fl.rounds (now {old['fl']['rounds']}) to continue it"
                        if "rounds" in old.get("fl", {}) else "")
                raise UserError(f"workdir {workdir} already holds a finished run; pass "
                                f"--overwrite to replace it{hint}, or choose another --workdir")
            _check_process_count(workdir)
            logging.info("continuing the finished run in %s: %s", workdir, more)
            (workdir / "summary.json").unlink()  # unfinished again until the new last round
            files.atomic_write_json(workdir / "config.json", resolved)
            return "resume"
        else:
            diff = first_difference(_read_config(workdir), resolved)
            if not diff:
                _check_process_count(workdir)
                logging.info("resuming the unfinished run in %s", workdir)
                return "resume"
            failed = _marker(workdir).get("failed_start") if owned else None
            if not failed or checkpoint.has_any(workdir / "checkpoints"):
                raise UserError(f"workdir {workdir} holds an unfinished run with a different "
                                f"config ({diff}); pass --overwrite or choose another --workdir")
            logging.info("the earlier run in %s stopped on bad input before its first "
                         "checkpoint (%s); starting again with the new config (%s)", workdir,
                         failed, diff)
            delete_outputs(workdir)
    files.atomic_write_json(workdir / MARKER, {
        "ffrag_jax_run": 1, "task": config.task, "processes": _process_count(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    files.atomic_write_json(workdir / "config.json", resolved)
    return "new"


@contextlib.contextmanager
def open_run(config: ConfigDict, workdir: str | Path, overwrite: bool):
    """Locks and prepares ``workdir`` for the life of the ``with`` block; yields
    ``(path, "new" | "resume")``. A resumed run's metrics are rewound to its last checkpoint."""
    workdir = Path(workdir).expanduser()
    check_not_foreign(workdir)  # before the lock file (or anything) is written there
    workdir.mkdir(parents=True, exist_ok=True)
    with Lock(workdir):
        how = prepare(config, workdir, overwrite)
        if how == "resume":
            rewind_metrics(workdir)
        yield workdir, how


def rewind_metrics(workdir: Path) -> None:
    """Cuts ``metrics.jsonl`` back to what it held when the latest checkpoint was saved."""
    from ffrag_jax.training.metrics import MetricsLog

    offsets = checkpoint.metrics_offsets(workdir / "checkpoints")
    if None in offsets.values():
        logging.warning("a checkpoint in %s has no metrics position (an older version wrote "
                        "it); metrics.jsonl is kept as it is", workdir)
        return
    MetricsLog(workdir / "metrics.jsonl", repair=False).truncate(
        max(offsets.values(), default=0))


def write_summary(workdir: Path, summary: dict) -> dict:
    """``summary.json``, strict JSON, written atomically and last: it marks a finished run."""
    files.atomic_write_json(workdir / "summary.json", summary)
    return summary


def describe_progress(workdir: Path) -> str:
    """Where a run stands, for the interrupt message: the last metrics record and the latest
    checkpoint of each phase."""
    from ffrag_jax.training.metrics import read_jsonl

    try:
        records = read_jsonl(workdir / "metrics.jsonl")
    except (OSError, ValueError):
        records = []
    last = next((r for r in reversed(records) if "step" in r or "round" in r), None)
    where = ", ".join(f"{k} {last[k]}" for k in ("phase", "round", "client", "step")
                      if last and k in last) or "the start"
    steps = checkpoint.latest_steps(workdir / "checkpoints")
    saved = ", ".join(f"{name} {step}" for name, step in steps.items()) or "none yet"
    return f"interrupted after {where} (checkpoints: {saved})"
