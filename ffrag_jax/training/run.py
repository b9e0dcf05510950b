"""``run(config, workdir)``: the library entry point behind the launcher.

Order of work, so that a bad input never costs a user anything already written:

1. the config is validated whole (:func:`validate`: the task's own checks, the mesh), before
   the workdir is touched;
2. the workdir is locked and prepared (:mod:`ffrag_jax.training.workdir`: a new run, a resume
   from the
   last checkpoint, or, with ``overwrite``, the previous run's own outputs deleted);
3. the task runs; it writes its summary last, so ``summary.json`` marks a finished run.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import jax
from absl import logging
from ml_collections import ConfigDict

from ffrag_jax.errors import UserError
from ffrag_jax.training import checkpoint, distributed, interrupts, sharding
from ffrag_jax.training import workdir as workdir_lib

# config.task is the name of its module in ffrag_jax/jobs/ (``validate(config, mesh)`` and
# ``run(config, workdir, mesh)``).
TASKS = ("lora", "federated", "retriever", "rag", "ffrag")
JOBS = {task: f"ffrag_jax.jobs.{task}" for task in TASKS}


def job_module(task: str):
    if task not in JOBS:
        raise UserError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return importlib.import_module(JOBS[task])


def validate(config: ConfigDict) -> jax.sharding.Mesh:
    """Every check that needs only the config and the input files' existence; returns the
    mesh. Nothing is written."""
    job = job_module(config.task)
    mesh = sharding.make_mesh(dict(config.mesh))
    job.validate(config, mesh)
    return mesh


def prepare_workdir(config: ConfigDict, workdir: str | Path, overwrite: bool) -> Path:
    """Locks ``workdir`` only while it is prepared (:func:`workdir_lib.prepare`); for tests
    and tools that set a folder up without running the task."""
    with workdir_lib.open_run(config, workdir, overwrite) as (path, _):
        return path


@contextlib.contextmanager
def open_workdir(config: ConfigDict, workdir: str | Path, overwrite: bool):
    """The folder this process runs in: ``workdir``, locked and prepared, on process 0 (the
    only one in a single-process run); on the others, once process 0 has prepared it, a
    scratch folder sharing its checkpoints (:mod:`ffrag_jax.training.distributed`)."""
    if not distributed.multi_process():
        with workdir_lib.open_run(config, workdir, overwrite) as (path, _):
            yield path
        return
    with contextlib.ExitStack() as stack:
        if distributed.is_writer():
            try:
                path, _ = stack.enter_context(workdir_lib.open_run(config, workdir, overwrite))
                (path / "checkpoints").mkdir(exist_ok=True)  # the others link to it
            except BaseException:
                distributed.agree(False)  # the others stop too, instead of waiting forever
                raise
            distributed.agree(True)
        else:
            if not distributed.agree(False):
                raise UserError("process 0 did not start the run (its error says why)")
            path = stack.enter_context(distributed.scratch_workdir(Path(workdir).expanduser()))
        yield path


def default_cache_dir() -> str:
    """``$FFRAG_COMPILATION_CACHE``, else ``~/.cache/ffrag_jax/xla``."""
    import os

    return os.environ.get("FFRAG_COMPILATION_CACHE",
                          str(Path.home() / ".cache" / "ffrag_jax" / "xla"))


def compilation_cache(setting: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache per the config's ``compilation_cache``
    (``"auto"``: on GPU and TPU, where a 7B step takes minutes to compile, in
    ``$FFRAG_COMPILATION_CACHE`` or ``~/.cache/ffrag_jax/xla``; ``"off"``; or a folder);
    returns the folder in use. A cache already set (``JAX_COMPILATION_CACHE_DIR``) is kept.
    The cache changes no result: the same program gives the same executable."""
    current = jax.config.jax_compilation_cache_dir
    if current or setting in (None, "off"):
        return current
    if setting == "auto":
        if jax.default_backend() == "cpu":
            return None
        setting = default_cache_dir()
    folder = Path(setting).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"compilation_cache={setting}: cannot create it ({e.strerror})") from None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    logging.info("persistent compilation cache: %s", folder)
    return str(folder)


def run(config: ConfigDict, workdir: str | Path, *, overwrite: bool = False) -> dict:
    """Runs ``config.task`` in ``workdir``; returns its summary dict. In a multi-process run
    every process calls this with the same arguments."""
    mesh = validate(config)
    compilation_cache(config.get("compilation_cache", "auto"))
    interrupts.reset()  # a stop asked of an earlier run in this process is not this one's
    with open_workdir(config, workdir, overwrite) as path:
        logging.info("devices: %s; mesh: %s", jax.devices(), dict(mesh.shape))
        try:
            return job_module(config.task).run(config, path, mesh)
        except UserError as e:
            workdir_lib.mark_failed_start(path, str(e))
            raise
        finally:  # a run stopped by an error or an interrupt still keeps its last save
            checkpoint.wait_for_pending_saves()
