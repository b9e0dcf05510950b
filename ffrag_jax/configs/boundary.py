"""The knowledge-boundary demo (issue 17): FF-RAG where each client's questions are answerable
from its case base, from the shared authoritative base, from both in agreement or in conflict
(the authority wins), or from neither (the answer is "insufficient evidence"). The reader reads
the top 3 candidates, each after its source tag, and learns the dual task: answers tagged
``[case]`` / ``[authority]`` and abstentions (``rag.losses = {dual_task: 1}``). Reports per
client and round: answerable EM, abstention precision/recall/F1, hallucination rate, conflict
and attribution accuracy (``ffrag_jax.evaluation.boundary``).

    python -m ffrag_jax.launch --config boundary
    python -m ffrag_jax.launch --config boundary --config.boundary.dual_task=False  # baseline
"""

from ml_collections import ConfigDict

from ffrag_jax.configs import ffrag


def get_config() -> ConfigDict:
    c = ffrag.get_config()
    c.data.private_entities = 60  # case entities per client (x 3 relations)
    c.data.shared_entities = 30  # authority-only entities per domain
    c.data.held_out = 0.2
    c.data.max_len = 96  # pretraining contexts of 3 facts
    c.pretrain.distractors = 2
    # A BPE trained on the run's text (the tags and the abstention are words of its own).
    c.tokenizer.path = None
    c.boundary.enabled = True
    c.rag.context_passages = 3
    c.rag.source_tags = True
    c.rag.prompt_len = 96
    c.rag.answer_len = 12
    c.rag.losses = {"dual_task": 1.0}
    return c
