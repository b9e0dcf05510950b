"""Federated, personalised LoRA (FF-LoRA) without retrieval on a 2-core CPU, no network (the
demo before retrieval joined it; ``configs/demo.py`` is now federated FF-RAG).

A tiny Llama is pretrained on synthetic 'geography' reading comprehension. Four clients, each
holding a private synthetic domain of its own (clinic, legal, retail, sports), then run three
FF-LoRA rounds: every client trains a personal adapter (heterogeneous ranks 8, 8, 4, 4) on top
of the frozen global adapter, the server stacks the client adapters exactly (FLoRA) into the
next global adapter. Exact match on each client's held-out questions is reported for the base
model, the global model and each client's fused (global + personal) model.

Point it at a real local checkpoint with --config.model.path=/path/to/hf-llama (pretraining is
then skipped and the checkpoint's tokenizer is used).
"""

from ml_collections import ConfigDict

from ffrag_jax.configs import _common, homo


def get_config() -> ConfigDict:
    c = homo.get_config()
    c.seed = 0
    c.model.remat = "none"
    c.pretrain = _common.pretrain(800)
    c.data.update(dict(
        synthetic_domains="clinic,legal,retail,sports",
        examples_per_client=1500,
        held_out=0.1,  # 150 held-out questions per client
        max_len=56,
    ))
    c.fl.update(dict(
        num_clients=4,
        strategy="ff",
        rounds=3,
        local_epochs=1.0,
        batch_size=32,
        micro_batch_size=32,
        lr=3e-3,
    ))
    c.lora.generator.update(dict(targets="all-linear", ranks=(8, 8, 4, 4)))
    c.eval.update(dict(exact_match=True, batch_size=50))
    return c
