"""Data: clients' records and splits (:mod:`.records`, whose names are re-exported here),
the synthetic domains (:mod:`.synthetic`), tokenizers and fixed-shape batches (:mod:`.text`)."""

from ffrag_jax.data.records import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    client_round_batches,
    holdout,
    load_client_files,
    local_steps,
    read_records,
    render,
    split_by_field,
    split_dirichlet,
    split_iid,
)

__all__ = [
    "ALPACA_NO_INPUT", "ALPACA_WITH_INPUT", "client_round_batches", "holdout",
    "load_client_files", "local_steps", "read_records", "render", "split_by_field",
    "split_dirichlet", "split_iid",
]
