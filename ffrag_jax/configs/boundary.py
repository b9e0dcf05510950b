"""The knowledge-boundary demo (issue 17): FF-RAG where each client's questions are answerable
from its case base, from the shared authoritative base, from both in agreement or in conflict
(the authority wins), or from neither (the answer is "insufficient evidence"). The reader reads
the top candidate after its source tag (``[case] ...`` / ``[authority] ...``) and learns the
dual task: answers tagged ``[case]`` / ``[authority]``, and abstentions (``rag.losses``:
``dual_task``, RAG-sequence over the tagged targets, and LM-supervised retrieval, which pulls
the passage that supports the answer, the authority's in a conflict, to the top). Reports per
client and round: answerable EM, abstention precision/recall/F1, hallucination rate, conflict
and attribution accuracy (``ffrag_jax.evaluation.boundary``).

    python -m ffrag_jax.launch --config boundary
    python -m ffrag_jax.launch --config boundary --config.boundary.dual_task=False  # baseline
"""

from ml_collections import ConfigDict

from ffrag_jax.configs import ffrag


def get_config() -> ConfigDict:
    c = ffrag.get_config()
    # As many entities as the ffrag demo. With 60 per client (seed 0, the gate at 0.5) the
    # dual task cost 5 points of answerable EM (0.180 against 0.231); with 150, 1.2 points
    # (0.168 against 0.180).
    c.data.private_entities = 150  # case entities per client (x 3 relations)
    c.data.shared_entities = 50  # authority-only entities per domain
    c.data.held_out = 0.2
    # The demo's shipped BPE with the tags and the abstention as one token each.
    c.tokenizer.added_tokens = "[case],[authority],insufficient evidence"
    c.boundary.enabled = True
    c.rag.source_tags = True
    c.rag.prompt_len = 56
    c.rag.answer_len = 12
    c.rag.losses = {"dual_task": 1.0, "lsr": 1.0}
    # Abstain when the abstention is likelier than not (greedy abstained on half the
    # answerable questions: their answers' first tokens are spread, the abstention is one).
    c.boundary.abstain_threshold = 0.5
    return c
