"""The ServerApp for Flower's deployment runtime (``flwr run`` against a SuperLink, the
clients on SuperNodes): ``ffrag_jax.federated.flower.apps:server_app``, with the ClientApp
``ffrag_jax.federated.flower.client:app`` (the Flower app folder, ``app/``, names them).

Its run config (``flwr run --run-config``) names the job: ``config-file``, a JSON config
written by ``python -m ffrag_jax.federated.flower.configure`` (the launcher's flags), and
``workdir``, the server's run folder (checkpoints, metrics, summary). The server resumes from
the workdir's last round checkpoint: a killed and restarted server gives the same result.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from flwr.serverapp import ServerApp

from ffrag_jax.errors import UserError

server_app = ServerApp()
_SERVING = threading.local()


def current_grid():
    """The Flower grid this thread serves (inside a ServerApp), or None."""
    return getattr(_SERVING, "grid", None)


@contextlib.contextmanager
def serving(grid):
    _SERVING.grid = grid
    try:
        yield
    finally:
        _SERVING.grid = None


@server_app.main()
def main(grid, context) -> None:
    from absl import logging

    from ffrag_jax.federated.flower import records
    from ffrag_jax.training.run import run

    run_config = context.run_config
    path = Path(str(run_config.get("config-file", ""))).expanduser()
    if not path.is_file():
        raise UserError(f"run config config-file={path}: no such file; write it with python "
                        "-m ffrag_jax.federated.flower.configure")
    workdir = str(run_config.get("workdir", "")) or str(path).removesuffix(".flower.json")
    config = records.config_from_json(path.read_text(encoding="utf-8"))
    config.fl.engine = "flower"
    with serving(grid):
        try:
            summary = run(config, workdir, overwrite=False)
        except UserError as e:
            logging.error("error: %s", e)  # the one line the operator needs
            raise
    logging.info("done: %s %s", workdir, summary)
