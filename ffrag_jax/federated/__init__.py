"""Federated LoRA: client selection and local training (:mod:`.clients`), the aggregation
rules (:mod:`.aggregation`), the strategies built from them (:mod:`.strategies`), and one
jitted round (:mod:`.round_step`). The names below are the research API."""

from ffrag_jax.federated.aggregation import (
    apply_rank_mask,
    client,
    fedavg,
    finite_clients,
    fuse,
    pad_and_stack,
    pad_rank,
    rank_mask,
    stack,
    stack_clients,
    stack_padded,
    unpad_rank,
    unstack_clients,
    weighted_mean,
    zeropad,
)
from ffrag_jax.federated.clients import (
    client_update,
    client_weights,
    select_clients,
    update_clients,
)
from ffrag_jax.federated.strategies import FF, REGISTRY, FedAvg, Stack, Strategy, ZeroPad
from ffrag_jax.federated.strategies import get as get_strategy
from ffrag_jax.models.lora import module_weights

__all__ = [
    "FF", "REGISTRY", "FedAvg", "Stack", "Strategy", "ZeroPad", "apply_rank_mask", "client",
    "client_update", "client_weights", "fedavg", "finite_clients", "fuse", "get_strategy",
    "module_weights", "pad_and_stack", "pad_rank", "rank_mask", "select_clients", "stack",
    "stack_clients", "stack_padded", "unpad_rank", "unstack_clients", "update_clients",
    "weighted_mean", "zeropad",
]
