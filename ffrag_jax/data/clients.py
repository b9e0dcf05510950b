"""The federated language-model job's client data: records per client (synthetic domains, the
reference's per-client files, or one file split IID, by Dirichlet or by a field), their
``(prompt, response)`` pairs, the held-out split, and the encoded arrays."""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict

from ffrag_jax import data
from ffrag_jax.data import synthetic, text
from ffrag_jax.errors import UserError
from ffrag_jax.rag import prompts as rag_prompts


def client_records(config: ConfigDict) -> tuple[list[str], list[list[dict]], bool]:
    """``(client names, records per client, synthetic?)`` from ``config.data``."""
    d, n = config.data, config.fl.num_clients
    if d.source == "synthetic":
        domains = [x.strip() for x in d.synthetic_domains.split(",") if x.strip()]
        sizes = list(d.client_sizes) if d.client_sizes else [d.examples_per_client] * n
        if len(sizes) != n:
            raise UserError(f"data.client_sizes has {len(sizes)} entries for "
                            f"fl.num_clients={n}")
        records = [synthetic.make_examples(domains[k % len(domains)], sizes[k],
                                           seed=config.seed + 100 + k, distractors=d.distractors)
                   for k in range(n)]
        return [f"{k}:{domains[k % len(domains)]}" for k in range(n)], records, True
    if d.source == "client_files":
        if not d.path:
            raise UserError("data.source='client_files' needs data.path")
        return [str(k) for k in range(n)], data.load_client_files(d.path, n), False
    if d.source == "file":
        if not d.path:
            raise UserError("data.source='file' needs data.path")
        records = data.read_records(d.path)
        if d.split == "iid":
            parts = data.split_iid(len(records), n, config.seed)
        elif d.split == "dirichlet":
            parts = data.split_dirichlet([r.get(d.field, "") for r in records], n,
                                         d.dirichlet_alpha, config.seed)
        elif d.split == "field":
            names, parts = data.split_by_field(records, d.field)
            if len(parts) != n:
                raise UserError(f"data.field={d.field!r} has {len(parts)} values "
                                f"({', '.join(names[:8])}...) but fl.num_clients={n}")
        else:
            raise UserError(f"data.split={d.split!r}; choose iid, dirichlet or field")
        return [str(k) for k in range(n)], [[records[i] for i in p] for p in parts], False
    raise UserError(f"data.source={d.source!r}; choose synthetic, client_files or file")


def pairs_of(records: list[dict], is_synthetic: bool, d: ConfigDict) -> tuple[list, list]:
    """``(prompts, responses)`` of a client's records."""
    if is_synthetic:
        return [rag_prompts.prompt(r) for r in records], [rag_prompts.response(r) for r in records]
    pairs = [data.render(r, d.prompt_field, d.response_field) for r in records]
    return [p for p, _ in pairs], [r for _, r in pairs]


def held_out_split(config: ConfigDict, client: int, num_examples: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` example indices of a client (seeded by the client)."""
    return data.holdout(np.arange(num_examples), config.data.held_out,
                        seed=config.seed + client)


def encode_clients(config, tokenizer, pairs, ids: list[int] | None = None,
                   width: int | None = None) -> tuple[list[dict], list[dict]]:
    """Per client ``(train, held_out)`` encoded arrays of its ``(prompts, responses)``
    (client ids ``ids``, default ``0..len-1``, seed the held-out split), all cut to ``width``
    or else to one common length (the longest example, rounded up to 8, at most
    ``data.max_len``)."""
    d = config.data
    ids = list(range(len(pairs))) if ids is None else ids
    train_sets, held_sets = [], []
    for k, (prompts, responses) in zip(ids, pairs, strict=True):
        enc = (text.encode_pairs(tokenizer, prompts, responses, d.max_len,
                                 response_only=d.response_only) if prompts else None)
        tr, ho = held_out_split(config, k, len(prompts))
        for out, idx in ((train_sets, tr), (held_sets, ho)):
            out.append({key: v[idx] for key, v in enc.items()} if enc else
                       {key: np.zeros((0, d.max_len), np.int32) for key in
                        ("input_ids", "attention_mask", "loss_mask")})
    trim = text.trim_padding(train_sets + held_sets, d.max_len, width=width)
    return trim[:len(pairs)], trim[len(pairs):]
