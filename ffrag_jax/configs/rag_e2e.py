"""Centralised end-to-end RAG on synthetic knowledge: a tiny Llama that reads (pretrained on
the domain's reading comprehension), the packaged MiniLM retriever with a query-side LoRA, a
knowledge base of fact sentences whose entity names repeat across relations, and training of
the retriever with the LM-supervised loss (LSR, generator frozen). Reports retrieval recall and
closed-book vs RAG exact match on held-out questions, before and after.

    python -m ffrag_jax.launch --config rag_e2e
"""

from ml_collections import ConfigDict, config_dict

from ffrag_jax.config_types import lora_section
from ffrag_jax.configs import _common


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "rag"
    c.seed = 0
    c.log_every = 10
    c.checkpoint_every = 50
    # "(first, last)": a jax.profiler trace of those steps (rounds) of the main loop, to
    # workdir/profile (open it in TensorBoard or Perfetto); None: no trace.
    c.profile_steps = config_dict.placeholder(tuple)
    # JAX's persistent compilation cache: "auto" (on for GPU/TPU, in ~/.cache/ffrag_jax/xla
    # or $FFRAG_COMPILATION_CACHE), "off", or a folder.
    c.compilation_cache = "auto"
    c.mesh = ConfigDict(dict(clients=1, data=-1, fsdp=1, tensor=1))
    c.data = ConfigDict(dict(domain="geography", num_entities=500, num_test=300, max_len=56))
    c.tokenizer = ConfigDict(dict(vocab_size=1536))
    c.model = _common.tiny_llama()
    c.pretrain = _common.pretrain(800)
    c.retriever = ConfigDict(dict(path=config_dict.placeholder(str)))  # None: packaged MiniLM
    c.rag = ConfigDict(dict(
        k=4,  # passages per question
        prompt_len=48, answer_len=8,
        query_len=24,  # query-encoder tokens in training (the questions have <= 18)
        losses={"lsr": 1.0},  # any of rag_sequence, rag_token, lsr, ralt with weights
        score_scale=20.0, tau_lm=1.0,
        passage_len=32,  # encoder tokens per fact (passage-side training)
        refresh_every=50,  # steps between index rebuilds (passage-side training only)
    ))
    c.train = ConfigDict(dict(
        steps=150, batch_size=16,
        retriever_lr=1e-3, warmup_steps=10,
        passage_side=False,  # also train the passage side (then the index is refreshed)
    ))
    c.lora = ConfigDict(dict(retriever=lora_section("query,value", 8)))  # query side
    c.eval = ConfigDict(dict(max_new_tokens=8, batch_size=50))
    return c
