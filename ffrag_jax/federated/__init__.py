"""Federated LoRA: client selection and local training (:mod:`.clients`), the aggregation
rules (:mod:`.aggregation`), the strategies built from them (:mod:`.strategies`), and one
jitted round (:mod:`.round_step`). The names below are the research API."""

# Re-exported names (``x as x``): the package's research API.
from ffrag_jax.federated.aggregation import apply_rank_mask as apply_rank_mask
from ffrag_jax.federated.aggregation import client as client
from ffrag_jax.federated.aggregation import coordinate_median as coordinate_median
from ffrag_jax.federated.aggregation import fedavg as fedavg
from ffrag_jax.federated.aggregation import finite_clients as finite_clients
from ffrag_jax.federated.aggregation import fuse as fuse
from ffrag_jax.federated.aggregation import pad_and_stack as pad_and_stack
from ffrag_jax.federated.aggregation import pad_rank as pad_rank
from ffrag_jax.federated.aggregation import rank_mask as rank_mask
from ffrag_jax.federated.aggregation import stack as stack
from ffrag_jax.federated.aggregation import stack_clients as stack_clients
from ffrag_jax.federated.aggregation import stack_padded as stack_padded
from ffrag_jax.federated.aggregation import trimmed_mean as trimmed_mean
from ffrag_jax.federated.aggregation import unpad_rank as unpad_rank
from ffrag_jax.federated.aggregation import unstack_clients as unstack_clients
from ffrag_jax.federated.aggregation import weighted_mean as weighted_mean
from ffrag_jax.federated.aggregation import zeropad as zeropad
from ffrag_jax.federated.clients import client_update as client_update
from ffrag_jax.federated.clients import client_weights as client_weights
from ffrag_jax.federated.clients import select_clients as select_clients
from ffrag_jax.federated.clients import update_clients as update_clients
from ffrag_jax.federated.strategies import FF as FF
from ffrag_jax.federated.strategies import REGISTRY as REGISTRY
from ffrag_jax.federated.strategies import FedAdam as FedAdam
from ffrag_jax.federated.strategies import FedAvg as FedAvg
from ffrag_jax.federated.strategies import FedAvgM as FedAvgM
from ffrag_jax.federated.strategies import FedYogi as FedYogi
from ffrag_jax.federated.strategies import Median as Median
from ffrag_jax.federated.strategies import Stack as Stack
from ffrag_jax.federated.strategies import Strategy as Strategy
from ffrag_jax.federated.strategies import TrimmedMean as TrimmedMean
from ffrag_jax.federated.strategies import ZeroPad as ZeroPad
from ffrag_jax.federated.strategies import from_config as strategy_from_config  # noqa: F401
from ffrag_jax.federated.strategies import get as get_strategy  # noqa: F401
from ffrag_jax.models.lora import module_weights as module_weights
