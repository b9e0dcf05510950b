"""``run(config, workdir)``: the library entry point behind the launcher.

It owns the workdir contract:

* a new workdir gets ``config.json`` (the resolved config) and the task's outputs;
* a workdir holding an unfinished run with the same config resumes it from its checkpoints;
* a finished run, or one with a different config, is never overwritten unless
  ``overwrite=True`` (``--overwrite``), which first deletes the old outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
from absl import logging
from ml_collections import ConfigDict

from ffrag_jax import sharding
from ffrag_jax.errors import UserError

TASKS = ("lora", "federated", "retriever", "rag", "ffrag")


def _first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diff = _first_difference(a, b, f"{prefix}{key}.")
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{key}: {a!r} -> {b!r}"
    return None


def prepare_workdir(config: ConfigDict, workdir: str | Path, overwrite: bool) -> Path:
    """Creates or validates ``workdir`` (see the module docstring)."""
    workdir = Path(workdir).expanduser()
    config_path = workdir / "config.json"
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    if workdir.exists() and any(workdir.iterdir()):
        if overwrite:
            logging.warning("--overwrite: deleting the previous run in %s", workdir)
            shutil.rmtree(workdir)
        elif (workdir / "summary.json").exists():
            raise UserError(
                f"workdir {workdir} already holds a finished run; pass --overwrite to replace it "
                "or choose another --workdir"
            )
        elif not config_path.exists():
            raise UserError(
                f"workdir {workdir} is not empty and holds no ffrag_jax run; choose another "
                "--workdir or pass --overwrite"
            )
        else:
            diff = _first_difference(json.loads(config_path.read_text()), resolved)
            if diff:
                raise UserError(
                    f"workdir {workdir} holds an unfinished run with a different config "
                    f"({diff}); pass --overwrite or choose another --workdir"
                )
            logging.info("resuming the unfinished run in %s", workdir)
            return workdir
    workdir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(resolved, indent=2))
    return workdir


def run(config: ConfigDict, workdir: str | Path, *, overwrite: bool = False) -> dict:
    """Runs ``config.task`` in ``workdir``; returns its summary dict."""
    if config.task not in TASKS:
        raise UserError(f"unknown task {config.task!r}; tasks: {', '.join(TASKS)}")
    workdir = prepare_workdir(config, workdir, overwrite)
    mesh = sharding.make_mesh(dict(config.mesh))
    logging.info("devices: %s; mesh: %s", jax.devices(), dict(mesh.shape))
    if config.task == "lora":
        from ffrag_jax import lora_job

        return lora_job.run(config, workdir, mesh)
    if config.task == "federated":
        from ffrag_jax import fl

        return fl.run(config, workdir, mesh)
    if config.task == "retriever":
        from ffrag_jax.retrieval import job

        return job.run(config, workdir, mesh)
    if config.task == "rag":
        from ffrag_jax import rag_job

        return rag_job.run(config, workdir, mesh)
    if config.task == "ffrag":
        from ffrag_jax import ffrag_job

        return ffrag_job.run(config, workdir, mesh)
    raise AssertionError(config.task)
