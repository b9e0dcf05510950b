"""Launch an ffrag_jax experiment.

  python -m ffrag_jax.launch --config demo [--workdir DIR] [--config.fl.rounds=5 ...]

--config NAME loads ffrag_jax/configs/NAME.py (or a path to any config .py file) and calls its
get_config(): demo (federated FF-RAG), ffrag, rag_e2e, fflora, heter, homo, lora, retriever.
Any config value can be overridden with a dotted flag, for example --config.fl.rounds=5 or
--config.model.path=/models/llama-3.2-1b. A trained RAG run answers questions with
python -m ffrag_jax.ask --workdir DIR "question". Outputs (metrics.jsonl,
loss.png, checkpoints/, export/, summary.json) go to --workdir, runs/<config>-<time> by
default. Running again in the workdir of an unfinished run resumes it; a finished run is only
replaced with --overwrite. One run at a time holds a workdir (an OS lock). Ctrl-C or SIGTERM
ends after the checkpoint in flight (exit status 130); kill -USR1 prints every thread's
stack (a run that seems stuck); bad input is one line on stderr (exit
status 2).

Multi-process runs (TPU pod slices, GPU clusters): the same command on every host; JAX finds
the processes itself on TPU pods, under SLURM and Open MPI, or give --coordinator_address,
--num_processes and --process_id (launch/ has scripts). Process 0 writes the workdir; the
checkpoints must be on storage every host sees.
"""

from __future__ import annotations

import os

# No hub downloads at run time, ever: models and tokenizers are local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import errno  # noqa: E402
import faulthandler  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import ffrag_jax.configs  # noqa: E402
from ffrag_jax.errors import UserError  # noqa: E402
from ffrag_jax.training.distributed import env_int  # noqa: E402

CONFIG_DIR = Path(ffrag_jax.configs.__file__).parent


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: a name from ffrag_jax/configs/ (e.g. demo) or a path "
    "to a .py file with get_config(). Override values with --config.KEY=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder. Default: runs/<config>-<YYYYmmdd-HHMMSS>.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("FFRAG_COORDINATOR_ADDRESS"),
    "Multi-process runs: HOST:PORT of process 0, which every process reaches (env "
    "FFRAG_COORDINATOR_ADDRESS). Not needed on TPU pods, under SLURM (srun) or Open MPI "
    "(mpirun): there JAX finds the processes itself.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", env_int("FFRAG_NUM_PROCESSES"),
    "Multi-process runs: how many processes (env FFRAG_NUM_PROCESSES); with "
    "--coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", env_int("FFRAG_PROCESS_ID"),
    "Multi-process runs: this process's index, 0 to --num_processes - 1 (env "
    "FFRAG_PROCESS_ID); process 0 writes the workdir.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds for every process to join before the run gives up.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a finished (or different) ffrag_jax run in --workdir, after "
    "the new config passed its checks: only the files ffrag_jax wrote there are deleted; a "
    "folder that is not an ffrag_jax run is never touched.")


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_path(name: str) -> Path:
    """``ffrag_jax/configs/NAME.py``, or ``name`` itself when it is an existing ``.py`` file."""
    if name.endswith(".py") and Path(name).exists():
        return Path(name)
    path = CONFIG_DIR / f"{name}.py"
    if not path.exists():
        raise UserError(f"unknown config {name!r}; configs: {', '.join(config_names())}")
    return path


def resolve_config_name(argv: list[str]) -> tuple[list[str], str, str]:
    """argv with ``--config NAME`` turned into the config file's path; the name; the path."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            index, value = i + 1, argv[i + 1]
        elif arg.startswith("--config="):
            index, value = i, arg.split("=", 1)[1]
        else:
            continue
        name = value.split(":", 1)[0]
        path = config_path(name)
        if name.endswith(".py"):
            return argv, path.stem, value
        resolved = str(path) + value[len(name):]
        argv[index] = resolved if index == i + 1 else f"--config={resolved}"
        return argv, name, resolved
    raise UserError(f"--config is required; configs: {', '.join(config_names())}")


def _load_config_file(path: str):
    """Calls get_config() of the config file at ``path`` (``file.py[:arg]``)."""
    import importlib.util

    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_ffrag_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def load_config(name: str, overrides: dict | None = None):
    """The named config (``ffrag_jax/configs/NAME.py``, or a path to a config file) with dotted
    ``overrides`` applied, e.g. ``load_config("heter", {"fl.rounds": 5})``: the launcher's
    config for research code and tests."""
    config = _load_config_file(str(config_path(name)))
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise UserError(f"unknown config key {key!r}")
        node[leaf] = value
    return config


def check_override_keys(config, argv: list[str]) -> None:
    """A UserError naming the first ``--config.KEY=...`` whose KEY the config lacks."""
    from ml_collections import ConfigDict

    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in key.split("."):
            if not isinstance(node, ConfigDict) or part not in node:
                where = ".".join(walked) or "the top level"
                valid = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else "-"
                raise UserError(f"unknown config key {key!r}; keys at {where}: {valid}")
            node, walked = node[part], walked + [part]


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors instead of usage dumps and tracebacks."""
    if any(a in ("--help", "-h", "--helpfull", "--helpshort") for a in argv[1:]):
        try:
            return flags.FLAGS(argv)
        except SystemExit as e:  # absl ends a help request with status 1; asked-for help is 0
            sys.exit(0 if e.code == 1 else e.code)
    try:
        argv, name, path = resolve_config_name(argv)
        check_override_keys(_load_config_file(path), argv)
        rest = flags.FLAGS(argv)
    except UserError as e:
        _fail(str(e))
    except flags.Error as e:
        _fail(" ".join(str(e).split()))
    flags.FLAGS.set_default("workdir", f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return rest


def _quiet_libraries() -> None:
    """Keep third-party noise out of the run log: orbax's per-save INFO chatter (its warnings
    still show), JAX's TPU probe, bm25s' and matplotlib's debug lines, and the tracebacks
    orbax's background threads log: a failed save is re-raised in the main thread, where it
    becomes one line (a full disk) or the one traceback. (A save that cannot fit is refused
    before it starts: checkpoint.check_room.)"""
    import logging as py_logging

    def orbax_filter(record) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return record.levelno >= py_logging.WARNING

    logging.get_absl_handler().addFilter(orbax_filter)
    # JAX probing for a TPU on every machine, and chatty loggers of bm25s and matplotlib.
    logging.get_absl_handler().addFilter(
        lambda r: not str(r.msg).startswith("Unable to initialize backend"))
    for name in ("bm25s", "matplotlib", "PIL"):
        py_logging.getLogger(name).setLevel(py_logging.WARNING)


def storage_error(error: BaseException) -> str | None:
    """One line for a failed write (full disk, read-only or forbidden folder), found anywhere
    in ``error``'s chain (orbax and tensorstore wrap the OSError), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        for code, name in ((errno.ENOSPC, "No space left on device"),
                           (errno.EDQUOT, "Disk quota exceeded"),
                           (errno.EROFS, "Read-only file system"),
                           (errno.EACCES, "Permission denied")):
            if (isinstance(error, OSError) and error.errno == code) or name in text:
                where = getattr(error, "filename", None)
                where = f" writing {where}" if where else ""
                return (f"{name.lower()}{where}; nothing finished is lost: make room (or fix "
                        "the folder) and rerun the same command to resume")
        error = error.__cause__ or error.__context__
    return None


def _interrupt(signum, frame) -> None:
    from ffrag_jax.training import interrupts

    interrupts.request(signal.Signals(signum).name)  # checked again at every step boundary
    if not interrupts.deferring():  # inside a checkpoint hand-over: raised when it ends
        raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    _quiet_libraries()
    import jax

    from ffrag_jax.training import checkpoint, distributed
    from ffrag_jax.training.run import run
    from ffrag_jax.training.workdir import describe_progress

    try:  # before anything touches a device
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               _DISTRIBUTED_TIMEOUT.value)
    except UserError as e:
        _fail(str(e))
    logging.info("JAX %s on %s", jax.__version__, jax.default_backend())
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop ends like a Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)
    # kill -USR1 PID prints every thread's stack to stderr (a run that seems stuck).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        summary = run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
    except UserError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the last save finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not checkpoint.wait_for_pending_saves(timeout_s=300):
            logging.warning("a checkpoint save did not finish in 300 s; it is left out")
        print(f"error: {describe_progress(Path(_WORKDIR.value))}; rerun the same command to "
              "resume", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        line = storage_error(e)
        if line is None:
            raise
        _fail(line)
    if not distributed.is_writer():
        return
    print(f"done: {_WORKDIR.value}")
    for key, value in summary.items():
        print(f"  {key}: {value}")


def cli() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
