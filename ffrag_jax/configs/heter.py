"""Federated LoRA, heterogeneous ranks: the FLoRA / FF-RAG reference setting.

As ``homo`` (see there for real runs), with client ranks [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
and alpha = 2r (scale 2 for every client). ``stack`` aggregates them exactly; ``zeropad`` is
the HetLoRA-style baseline; ``ff`` keeps a personal adapter per client.
"""

from ml_collections import ConfigDict

from ffrag_jax.configs import homo


def get_config() -> ConfigDict:
    c = homo.get_config()
    c.lora.generator.ranks = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)
    return c
