"""Federated FF-RAG on synthetic knowledge (the README's demo): four clients, each with a
private case base in a domain of its own (clinic, legal, retail, sports) and access to a shared
authoritative base, train a personal generator LoRA (ranks 8, 8, 4, 4) and a personal
query-encoder LoRA with the end-to-end RAG loss (RAG-sequence marginal likelihood + LM-
supervised retrieval); the server stacks both into global adapters every round (FF-LoRA).
Reports per round and client: retrieval recall@1, RAG exact match / F1, and closed-book
exact match, for the base, global and fused (personalised) models.

    python -m ffrag_jax.launch --config ffrag
"""

from ml_collections import ConfigDict, config_dict

from ffrag_jax.config_types import lora_section
from ffrag_jax.configs import _common


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "ffrag"
    c.seed = 0
    c.log_every = 10
    c.checkpoint_every = 200  # pretraining steps (rounds are always checkpointed)
    # "(first, last)": a jax.profiler trace of those steps (rounds) of the main loop, to
    # workdir/profile (open it in TensorBoard or Perfetto); None: no trace.
    c.profile_steps = config_dict.placeholder(tuple)
    # JAX's persistent compilation cache: "auto" (on for GPU/TPU, in ~/.cache/ffrag_jax/xla
    # or $FFRAG_COMPILATION_CACHE), "off", or a folder.
    c.compilation_cache = "auto"
    c.mesh = ConfigDict(dict(clients=1, data=-1, fsdp=1, tensor=1))
    c.data = ConfigDict(dict(
        domains="clinic,legal,retail,sports",  # one per client
        private_entities=150,  # x 3 relations: 450 facts in each client's case base
        shared_entities=50,  # per domain, in the shared base (600 facts)
        held_out=0.15,  # of each client's questions
        max_len=56,  # pretraining sequence length
    ))
    # The demo's BPE ships in the package (data/make_demo_tokenizer.py): the same tokens on
    # every install. None: train one on the run's text (as the other configs do).
    c.tokenizer = ConfigDict(dict(
        vocab_size=1536, path=config_dict.FieldReference("packaged:demo", field_type=str),
        added_tokens=""))  # comma-separated whole tokens added to it (configs/boundary.py)
    c.model = _common.tiny_llama()
    c.pretrain = _common.pretrain(800)  # a reader of the geography domain (no client data)
    c.pretrain.distractors = 0  # other facts in each pretraining context (a reader of several)
    c.retriever = ConfigDict(dict(path=config_dict.placeholder(str)))  # None: packaged MiniLM
    c.rag = ConfigDict(dict(
        k_private=2, k_shared=2,  # candidates per question from each base
        prompt_len=48, answer_len=8,
        query_len=24,  # query-encoder tokens in training (the questions have <= 18)
        losses={"rag_sequence": 1.0, "lsr": 1.0},
        score_scale=20.0, tau_lm=1.0,
        # The reader reads the first n candidates as one context (n > 1: the single-passage
        # RAG losses do not apply; use ralt or dual_task), each after its base's source tag
        # ("[case]", "[authority]") with source_tags.
        context_passages=1, source_tags=False,
    ))
    # The knowledge boundary (configs/boundary.py): case, authority, agreeing, conflicting and
    # unanswerable questions; the dual task trains tagged answers and abstentions.
    c.boundary = ConfigDict(dict(
        enabled=False,
        dual_task=True,  # False: answerable questions only, plain answers (the baseline)
        overlap_entities=30,  # per client: in both bases (each relation agrees or conflicts)
        conflict_rate=0.5,  # of the overlap facts, the case note contradicts the authority
        unanswerable_rate=0.3,  # about this many unanswerable per answerable question
        # the share of the base reader's pretraining examples that abstain (None: the
        # unanswerable_rate). Abstaining examples cost the tiny reader copying: held out on
        # its base domain, 800 steps, it copies 0.32 of the values with 0.3, 0.60 with 0.
        pretrain_abstain_rate=config_dict.placeholder(float),
        # dual task: the share of answerable training questions shown without the passages
        # that support them, with the abstention as target (insufficient-evidence examples)
        negatives=0.0,
        # long records also stating facts (data/boundary.py digests): relevant to each, and
        # harder to read for a reader whose window cuts the record's end (the
        # relevant-but-unhelpful passages of DPA-RAG). digest_by="random": digest_rate of a
        # base's facts, digest_size to a record; "entity": digest_rate of its entities, each
        # record all of one entity's facts there (a case file)
        digest_rate=0.0, digest_size=3, digest_by="random",
        abstain_weight=1.0,  # the dual_task loss's weight on abstention answers
        tag_weight=1.0,  # and on the source tag's tokens
        # how the reader's answers with each candidate alone make one (evaluation/boundary.py
        # READINGS): "top" (the first candidate's), "first_answer" (the first not abstained
        # on), "authority_first" (the first tagged [authority], else first_answer)
        reading="top",
        # the first answer token abstains when the abstention's probability is at least
        # this (models/generate.py); None: plain greedy (the abstention against the likeliest
        # first token of an answer)
        abstain_threshold=config_dict.placeholder(float),
    ))
    c.fl = ConfigDict(dict(
        # ff: personal + stacked global adapters; stack: FLoRA, merged; or any other of
        # ffrag_jax.federated.strategies (fedavg, zeropad, fedadam, median, ffa, fedsa, ...)
        strategy="ff",
        settings=_common.strategy_settings(),  # lr, momentum, b1, b2, tau, trim, mu
        # How adapters travel, both ways: fp32 | fp16 | bf16 | int8 (blockwise absmax)
        payload="fp32",
        payload_block=64,
        dp=_common.dp(),  # client-level differential privacy (clip=0: off)
        # "local": the clients in this process; "flower": each client a Flower node (Flower's
        # simulation runtime from the launcher; `flwr run` for real SuperNodes)
        engine="local",
        flower=_common.flower(),
        num_clients=4, rounds=3,
        # retriever_lr=0: the query encoder stays as it is (an off-the-shelf retriever, as
        # in DPA-RAG, where only the reranker learns the generator's preferences)
        local_steps=30, batch_size=16, lr=3e-3, retriever_lr=1e-3,
        # True: each round's batches are retrieved up front (the round-start encoder) and all
        # clients train in one vmapped program; False: clients in turn, retrieval per step.
        vmap_clients=False,
    ))
    # The preference-aligned reranker (DPA-RAG; ffrag_jax.rerank.rounds): a per-client
    # cross-encoder adapter trained every round on what the client's generator answers right
    # with, aggregated like the other adapters; the reader reads the reranked candidates.
    c.rerank = ConfigDict(dict(
        enabled=False,
        path=config_dict.placeholder(str),  # None: the packaged MiniLM with a fresh head
        labels="preference",  # or "relevance": gold fact + case note (the baseline)
        # the generator's preference: "answer" (its greedy answer with the passage alone is
        # right) or "likelihood" (the passage under which the gold answer is likeliest)
        preference="likelihood",
        questions=48,  # training questions labelled per client and round
        augment="paraphrase,constraint,decomposition,specific,general,entity_swap",
        local_steps=20, batch_size=8, lr=2e-3,
        combine="mgda",  # or "fixed": the losses' weights
        losses={"pointwise": 1.0, "pairwise": 1.0, "contrastive": 1.0},
        temperature=1.0, max_len=64,  # cross-encoder tokens per query-passage pair
        # > 0: a residual reranker, score = logit + prior_scale x the retriever's score
        # (centred per question; rerank/cross_encoder.py retriever_prior); 0: the logit alone
        prior_scale=20.0,
        # DPA-RAG's pre-aligned stage before round 1's RAG training (ffrag_jax.rerank.
        # self_align): steps of the generator naming its aligned candidate; 0: off.
        pre_align_steps=0, pre_align_len=112,
    ))
    c.lora = ConfigDict(dict(
        generator=lora_section("all-linear", ranks=(8, 8, 4, 4)),  # one rank per client
        retriever=lora_section("query,value", 8),  # the query encoder's
        reranker=lora_section("query,value,pooler", 8),  # the cross-encoder's
    ))
    c.eval = ConfigDict(dict(max_new_tokens=8, batch_size=50))
    return c
