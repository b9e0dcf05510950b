"""Federated instruction data: per-client files, splits, held-out sets, fixed-shape batches.

Records are dicts. Alpaca records (``instruction``, ``input``, ``output``) are rendered with
the Alpaca template that the FLoRA / FF-RAG reference code uses; any other record needs a
``prompt_field`` and a ``response_field``.

Sources (all local, nothing is downloaded):

* the reference layout ``data_path/<N>/local_training_<k>.json`` (one file per client,
  :func:`load_client_files`);
* one ``.json`` (a list of records) or ``.jsonl`` file split across clients by
  :func:`split_iid`, :func:`split_dirichlet` (non-IID by a category field) or
  :func:`split_by_field`;
* a folder written by ``datasets.Dataset.save_to_disk``, or ``.csv`` / ``.parquet``, read with
  the ``datasets`` library.

JSON is parsed here, line by line, rather than by ``datasets``' JSON builder, so that a
malformed line is reported with its file and line number before any training starts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ffrag_jax import files
from ffrag_jax.data import text
from ffrag_jax.errors import UserError

# The Alpaca template of the reference code (templates/alpaca.json in FLoRA / FF_RAG).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def read_records(path: str | Path) -> list[dict]:
    """Records of one local file or ``datasets`` folder (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    if path.is_dir():
        datasets = _datasets(path)
        try:
            records = list(datasets.load_from_disk(str(path)))
        except FileNotFoundError as e:
            raise UserError(f"{path} is not a folder written by datasets' save_to_disk") from e
        return _check_records(path, records)
    if path.suffix in (".csv", ".parquet"):
        files.read_text(path, "data file") if path.suffix == ".csv" else None  # UTF-8, text
        try:
            records = list(_datasets(path).load_dataset(path.suffix[1:], data_files=str(path),
                                                        split="train"))
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: unreadable {path.suffix[1:]} ({str(e)[:160]})") from None
        return _check_records(path, records)
    raw = files.read_text(path, "data file")
    if path.suffix == ".json" and raw.lstrip().startswith("["):
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    elif path.suffix in (".json", ".jsonl"):
        records = [record for _, record in files.jsonl_records(path, "data file")]
    else:
        raise UserError(f"{path}: unsupported data format {path.suffix!r} "
                        "(.json, .jsonl, .csv, .parquet or a datasets folder)")
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON array of objects")
    return _check_records(path, records)


def _check_records(path: Path, records: list) -> list[dict]:
    if not records:
        raise UserError(f"data file {path} holds no records")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {number} is a {type(record).__name__}, not an object")
    return records


def _datasets(path: Path):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: reading {path.suffix or 'a datasets folder'} needs the "
                        "datasets package (pip install datasets), or convert it to .jsonl"
                        ) from None
    return datasets


def load_client_files(data_path: str | Path, num_clients: int) -> list[list[dict]]:
    """The reference layout: ``data_path/<num_clients>/local_training_<k>.json``."""
    folder = Path(data_path) / str(num_clients)
    if not folder.is_dir():
        raise UserError(f"no client data folder {folder} (expected "
                        f"{folder}/local_training_<k>.json for k < {num_clients})")
    clients = []
    for k in range(num_clients):
        path = folder / f"local_training_{k}.json"
        if not path.exists():
            raise UserError(f"client {k}: missing data file {path}")
        clients.append(read_records(path))
    return clients


def render(record: dict, prompt_field: str | None = None, response_field: str | None = None
           ) -> tuple[str, str]:
    """``(prompt, response)`` of a record: the Alpaca template unless fields are given."""
    if prompt_field is None:
        if "instruction" not in record or "output" not in record:
            raise UserError(f"record without 'instruction'/'output' and no prompt_field: "
                            f"{sorted(record)}")
        template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
        return (template.format(instruction=record["instruction"], input=record.get("input")),
                str(record["output"]))
    for field in (prompt_field, response_field):
        if field not in record:
            raise UserError(f"record has no field {field!r}; it has {sorted(record)}")
    return str(record[prompt_field]), str(record[response_field])


# --------------------------------------------------------------------------------------------
# Splits: each returns a list of index arrays, one per client.


def split_iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random permutation cut into ``num_clients`` near-equal parts."""
    _check_clients(num_clients)
    perm = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def split_dirichlet(labels: Sequence, num_clients: int, alpha: float, seed: int
                    ) -> list[np.ndarray]:
    """Non-IID by category: for each category, its examples are divided among clients in
    proportions drawn from Dirichlet(``alpha``) (small alpha: each client sees few categories).
    """
    _check_clients(num_clients)
    if alpha <= 0:
        raise UserError(f"dirichlet alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    labels = np.asarray([str(x) for x in labels])
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for category in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == category))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for k, chunk in enumerate(np.split(members, cuts)):
            parts[k].extend(chunk.tolist())
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def split_by_field(records: Sequence[dict], field: str) -> tuple[list[str], list[np.ndarray]]:
    """One client per distinct value of ``field`` (sorted): ``(values, indices)``."""
    missing = [i for i, r in enumerate(records) if field not in r]
    if missing:
        raise UserError(f"split by field {field!r}: record {missing[0] + 1} has no such field")
    values = np.asarray([str(r[field]) for r in records])
    names = sorted(set(values.tolist()))
    return names, [np.flatnonzero(values == name) for name in names]


def holdout(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)``: a random ``fraction`` of ``indices`` held out (at least one
    example when ``fraction > 0`` and the client has two or more)."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"held-out fraction must be in [0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(indices)
    count = int(round(fraction * len(perm)))
    if fraction > 0 and count == 0 and len(perm) >= 2:
        count = 1
    return np.sort(perm[count:]), np.sort(perm[:count])


def _check_clients(num_clients: int) -> None:
    if num_clients <= 0:
        raise UserError(f"num_clients must be positive, got {num_clients}")


# --------------------------------------------------------------------------------------------
# Fixed-shape round batches


def local_steps(num_examples: int, epochs: float, per_step: int) -> int:
    """Optimizer steps of one client's local training: ``ceil(epochs * n / per_step)``."""
    if num_examples == 0:
        return 0
    return max(1, math.ceil(epochs * num_examples / per_step))


def client_round_batches(data: dict[str, np.ndarray], num_steps: int, max_steps: int,
                         micro_batch: int, grad_accum: int, seed: Sequence[int]
                         ) -> dict[str, np.ndarray]:
    """One client's batches for a round: leaves ``[max_steps, grad_accum, micro_batch, T]``.

    Steps ``< num_steps`` are :func:`~ffrag_jax.data.text.batch_at` of a permutation seeded by
    ``seed`` (say ``[run seed, round, client]``); the rest are all padding (attention and loss
    masks 0) and are skipped by the client update. Fixed shapes: a round compiles once.
    """
    length = data["input_ids"].shape[1]
    shape = (max_steps, grad_accum, micro_batch, length)
    out = {k: np.zeros(shape, np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    if num_steps == 0:
        return out
    seed_int = int(np.random.default_rng(list(seed)).integers(2**31))
    for step in range(num_steps):
        batch = text.batch_at(data, step, micro_batch, grad_accum, seed=seed_int)
        for k in out:
            out[k][step] = batch[k]
    return out

