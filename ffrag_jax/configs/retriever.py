"""Retriever fine-tuning: the packaged all-MiniLM-L6-v2 (or --config.encoder.path) trained with
symmetric in-batch InfoNCE (logit scale 100, as in the DALM toolkit) on SQuAD v1.1 questions
and their paragraphs, evaluated on held-out articles before and after.

    python -m ffrag_jax.launch --config retriever \\
        --config.data.path=../shared/data/squad/dev-v1.1.json
"""

from ml_collections import ConfigDict, config_dict

from ffrag_jax.config_types import lora_section


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "retriever"
    c.seed = 0
    c.export = True
    c.log_every = 10
    c.checkpoint_every = 50
    # "(first, last)": a jax.profiler trace of those steps (rounds) of the main loop, to
    # workdir/profile (open it in TensorBoard or Perfetto); None: no trace.
    c.profile_steps = config_dict.placeholder(tuple)
    # JAX's persistent compilation cache: "auto" (on for GPU/TPU, in ~/.cache/ffrag_jax/xla
    # or $FFRAG_COMPILATION_CACHE), "off", or a folder.
    c.compilation_cache = "auto"
    c.mesh = ConfigDict(dict(clients=1, data=-1, fsdp=1, tensor=1))
    c.encoder = ConfigDict(dict(path=config_dict.placeholder(str)))  # None: packaged MiniLM
    c.data = ConfigDict(dict(
        path=config_dict.placeholder(str),  # a SQuAD v1.1 JSON file
        test_fraction=0.3,  # of the articles; their questions are the test set
        max_test_questions=config_dict.placeholder(int),  # None: all of them
    ))
    c.train = ConfigDict(dict(
        mode="lora",  # lora (lora.retriever) | full
        steps=150, batch_size=32, lr=5e-4, warmup_steps=15, weight_decay=0.0,
        max_grad_norm=1.0,
        logit_scale=100.0, symmetric=True,
        hard_negatives=False,  # one BM25-mined wrong paragraph per question (1.5x the compute)
        max_query_len=48, max_passage_len=128,  # training truncation (evaluation uses 256)
    ))
    c.lora = ConfigDict(dict(retriever=lora_section(
        "query,key,value,attention_output,intermediate,output", 8)))
    c.eval = ConfigDict(dict(batch_size=64))
    return c
