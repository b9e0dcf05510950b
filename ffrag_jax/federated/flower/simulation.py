"""``fl.engine="flower"`` from the launcher: the federated job through Flower's simulation
runtime (one ServerApp, ``fl.num_clients`` virtual SuperNodes running the ClientApp on
Ray workers), in this process's workdir."""

from __future__ import annotations

import logging as py_logging
from pathlib import Path

from ffrag_jax.errors import UserError


def run(config, workdir: Path, mesh, job_run=None) -> dict:
    """Runs the job with its server in a ServerApp and its clients as Flower nodes; returns
    the summary (the same as ``fl.engine="local"`` for the same config). ``job_run(config,
    workdir, mesh, grid=...)``: the job (default: the federated LoRA job)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from ffrag_jax.federated.flower import client
    if job_run is None:
        from ffrag_jax.jobs.federated import run as job_run

    outcome: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        try:
            outcome["summary"] = job_run(config, workdir, mesh, grid=grid)
        except BaseException as e:  # re-raised below: the simulation only logs it
            outcome["error"] = e

    f = config.fl.flower
    backend = {"client_resources": {"num_cpus": f.client_cpus, "num_gpus": f.client_gpus},
               "init_args": {"log_to_driver": True, "include_dashboard": False}}
    py_logging.getLogger("flwr").setLevel(py_logging.WARNING)
    run_simulation(server_app=server_app, client_app=client.app,
                   num_supernodes=config.fl.num_clients, backend_config=backend)
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise UserError("the Flower simulation ended without finishing the job; its log "
                        "above says why")
    return outcome["summary"]
