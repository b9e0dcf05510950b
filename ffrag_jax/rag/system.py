"""A trained RAG system as a folder, and question answering with it.

The RAG jobs end by writing ``WORKDIR/export`` (:func:`export_system`)::

    system.json                     format, retriever folder, prompt budget, quotas, clients
    generator/                      HF Llama folder (global adapter merged) + tokenizer
    retriever_lora.safetensors      the global query-encoder LoRA (absent: none trained)
    query_encoder/                  or the whole query encoder (``stack``: adapters merged)
    knowledge/<base>/               knowledge bases (retrieval.knowledge_base), embedded by
                                    the plain retriever: the LoRAs are on the query side only
    clients/<k>/generator/          a client's personal generator adapter (PEFT)
    clients/<k>/retriever_lora.safetensors
    clients/<k>/retriever/          the client's query encoder (global + personal LoRA) as a
                                    PEFT adapter on the base sentence-transformers model

:func:`load_system` reads it back as a :class:`RagSystem` (the global model and the shared
bases, or one client's fused model with its private base too), and :meth:`RagSystem.ask`
retrieves from every base with its quota, puts the best passage in the prompt (the readers
here are trained with one) and generates with a KV cache, greedy or top-p sampled.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from absl import logging

from ffrag_jax import federated, files
from ffrag_jax.errors import UserError
from ffrag_jax.evaluation.boundary import abstain_gate, parse, read
from ffrag_jax.models import hf, lora
from ffrag_jax.models.llama import LlamaConfig
from ffrag_jax.models.lora import LoRA
from ffrag_jax.rag import compression, expansion, prompts
from ffrag_jax.rag.evaluate import answer_each, answer_prompts
from ffrag_jax.rerank import cross_encoder as rerank_lib
from ffrag_jax.rerank.cross_encoder import Reranker
from ffrag_jax.retrieval import encoder as encoder_lib
from ffrag_jax.retrieval import multi_source
from ffrag_jax.retrieval.encoder import TextEncoder, default_encoder_path, params_sha256
from ffrag_jax.retrieval.knowledge_base import KnowledgeBase
from ffrag_jax.training import sharding

FORMAT = 1


@dataclasses.dataclass
class RagSystem:
    """A reader, its query encoder and the knowledge bases it searches with ``quotas``."""

    gen_cfg: LlamaConfig
    gen_params: dict
    gen_lora: LoRA | None
    tokenizer: object
    bases: list[KnowledgeBase]
    quotas: dict[str, int]
    prompt_len: int
    context_passages: int = 1  # the reader reads the first n passages
    tags: dict[str, str] | None = None  # base name -> source tag shown before its passages
    reranker: Reranker | None = None  # the preference-aligned cross-encoder, if trained
    # how the answers with each hit alone make one (evaluation.boundary.READINGS); "top":
    # the reader reads the first context_passages only
    reading: str = "top"
    abstain: tuple[int, float] | None = None  # the decoder's answer-or-abstain rule

    def tagged(self, hit: dict) -> str:
        """A hit's text after its base's source tag (the text alone without tags), as the
        reader reads it and the reranker scores it."""
        return prompts.tagged_context([hit["text"]],
                                      None if self.tags is None else [self.tags.get(hit["kb"])])

    def search(self, questions: Sequence[str], mode: str = "dense"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`multi_source.rank` of ``questions`` over the system's bases with its quotas
        (the jobs' own search: what a job evaluated is what this retrieves)."""
        for name in self.quotas:
            if name not in [kb.name for kb in self.bases]:
                raise UserError(f"quotas name unknown knowledge base {name!r}")
        return multi_source.rank(self.bases, [self.quotas.get(kb.name, 0) for kb in self.bases],
                                 list(questions), mode=mode)

    def ask(self, questions: Sequence[str], *, mode: str = "dense", max_new_tokens: int = 16,
            temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
            batch_size: int = 32, rerank: bool = False, expand: bool = False,
            compress: int = 0) -> list[dict]:
        """Per question ``{"question", "answer", "context", "sources", "cut", "abstained"}``:
        ``sources`` are the hits of every base (best first, each naming its base), ``context``
        the passage text the reader saw (its first ``context_passages``, tagged by source when
        the system was trained so) ("" when nothing was retrieved: the question is answered
        closed-book, with a warning), ``cut`` what was shortened to fit the reader's
        ``prompt_len`` (``[]``, ``["question"]``, ``["passage"]``; a warning says so too),
        ``abstained`` whether the answer is the knowledge boundary's abstention. With
        ``rerank`` the system's reranker reorders every question's hits first (each hit then
        has its ``rerank_score`` beside the retriever's ``score``). ``expand``: query expansion
        (:mod:`ffrag_jax.rag.expansion`: the reader's closed-book draft appended, both queries'
        hits merged; ``draft`` in the record). ``compress``: a token budget for the passages
        read, whose best sentences by the reranker are kept (:mod:`ffrag_jax.rag.compression`;
        the rest in ``dropped``). A system trained with a boundary ``reading`` other than
        ``top`` answers with each hit alone (``per_hit``) and keeps one answer by that rule.
        An empty question is an error."""
        questions = list(questions)
        if not questions:
            return []
        for i, question in enumerate(questions):
            if not question.strip():
                raise UserError(f"question {i + 1} is empty")
        room = self.gen_cfg.max_position_embeddings - self.prompt_len
        if max_new_tokens > room:
            raise UserError(f"--max-new-tokens {max_new_tokens}: this reader has room for "
                            f"{room} new tokens after its {self.prompt_len}-token prompt")
        if (rerank or compress > 0) and self.reranker is None:
            raise UserError(f"--{'rerank' if rerank else 'compress'}: this system was trained "
                            "without a reranker (rerank.enabled=False)")
        hits = multi_source.hits(self.bases, self.search(questions, mode))
        drafts = [""] * len(questions)
        if expand:
            drafts = answer_prompts(
                self.gen_params, self.gen_cfg, self.tokenizer,
                prompts.fit_prompts(self.tokenizer, questions, [""] * len(questions),
                                    self.prompt_len),
                lora=self.gen_lora, prompt_len=self.prompt_len, max_new_tokens=max_new_tokens,
                batch_size=batch_size)
            drafts = ["" if parse(d).abstained else parse(d).value for d in drafts]
            more = multi_source.hits(self.bases, self.search(expansion.expanded(questions,
                                                                                drafts), mode))
            hits = expansion.merge_hits(hits, more, sum(self.quotas.values()))
        if rerank:
            pairs = [(q, h) for q, row in zip(questions, hits, strict=True) for h in row]
            scores = self.reranker.score_pairs(  # one batched pass, passages after their tags
                [q for q, _ in pairs],
                [self.tagged(h) for _, h in pairs])
            if self.reranker.prior_scale > 0 and mode != "dense":
                logging.warning("the reranker's prior was trained on dense retrieval scores; "
                                "with --mode %s its order mixes other scores", mode)
            at = 0
            for row in hits:  # a residual reranker adds its prior of the row's scores
                logits = scores[at : at + len(row)]
                at += len(row)
                final = self.reranker.with_prior(logits, np.asarray([h["score"] for h in row]),
                                                 np.ones(len(row), bool))
                for h, score in zip(row, final, strict=True):
                    h["rerank_score"] = float(score)
                row.sort(key=lambda h: -h["rerank_score"])  # stable: ties keep their order
        contexts, dropped = [], []
        for question, row in zip(questions, hits, strict=True):
            if not row:
                logging.warning("no passage retrieved for %r: answering closed-book", question)
            shown = row[: self.context_passages]
            kept, cut = compression.compress(
                question, [h["text"] for h in shown],
                lambda q, texts: self.reranker.score(q, texts),
                lambda t: len(self.tokenizer(t, add_special_tokens=False)["input_ids"]),
                compress)
            dropped.append(cut)
            contexts.append(prompts.tagged_context(
                [text for _, text in kept],
                None if self.tags is None else [self.tags.get(shown[i]["kb"]) for i, _ in kept]))
        fitted = prompts.fit_prompts(self.tokenizer, questions, contexts, self.prompt_len)
        cuts = []
        for i, (q, c, p) in enumerate(zip(questions, contexts, fitted, strict=True)):
            cut = [name for name, full, kept in (("question", q, p.question),
                                                 ("passage", c, p.passage)) if kept != full]
            if cut:
                logging.warning("question %d: the %s was cut to fit the reader's %d-token "
                                "prompt (it read %r)", i + 1, " and the ".join(cut),
                                self.prompt_len, p.question if "question" in cut else p.passage)
            cuts.append(cut)
        rng = jax.random.key(seed) if temperature > 0 else None
        common = dict(lora=self.gen_lora, prompt_len=self.prompt_len,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, rng=rng,
                      temperature=temperature, top_p=top_p, top_k=top_k, abstain=self.abstain)
        per_hit = None
        if self.reading != "top" and self.context_passages == 1:
            # Each hit alone, after its tag (a question without hits: closed-book), as the
            # jobs evaluate such a reading; the first hit's prompt is among them.
            per_hit = answer_each(
                self.gen_params, self.gen_cfg, self.tokenizer, questions,
                [[self.tagged(h) for h in row] or [""] for row in hits], **common)
            answers = read(per_hit, self.reading)
        else:
            answers = answer_prompts(self.gen_params, self.gen_cfg, self.tokenizer, fitted,
                                     **common)
        out = [{"question": q, "answer": a, "context": p.passage, "sources": row, "cut": cut,
                "abstained": parse(a).abstained}
               for q, a, p, row, cut in zip(questions, answers, fitted, hits, cuts, strict=True)]
        if per_hit is not None:
            for record, each in zip(out, per_hit, strict=True):
                record["per_hit"] = each
        for record, draft, cut in zip(out, drafts, dropped, strict=True):
            if expand:
                record["draft"] = draft
            if compress > 0:
                record["dropped"] = cut
        return out


def export_system(folder: Path, *, gen_cfg: LlamaConfig, gen_params: dict, tokenizer,
                  encoder: TextEncoder, retriever_path: str | None,
                  global_retriever: LoRA | None,
                  bases: dict[str, list[str] | KnowledgeBase],
                  quotas: dict[str, int], prompt_len: int, clients: Sequence[dict] = (),
                  retriever_sides: str = "query", query_params: dict | None = None,
                  context_passages: int = 1, tags: dict[str, str] | None = None,
                  reranker: dict | None = None, reading: str = "top",
                  abstain_threshold: float | None = None) -> Path:
    """Writes the system folder (see the module docstring). ``bases`` maps a base name to its
    passages, or to the :class:`KnowledgeBase` a job searched (saved as it is, so the system
    searches exactly as the job evaluated); ``clients`` are ``{"name", "base", "generator":
    LoRA, "retriever": LoRA}`` (``base``: the name of the client's private base, searched with
    ``quotas["private"]``).
    ``retriever_sides="both"``: the global retriever LoRA was trained on passages too, so the
    bases are embedded with it (merged); ``"query"``: by the plain ``encoder``.
    ``query_params``: full query-encoder weights instead of a LoRA (strategies that merge
    every round's adapters into the base), saved as a sentence-transformers folder.
    ``context_passages`` and ``tags`` (``{"private": tag, <base>: tag}``): how the reader was
    trained to read (the first n passages, each after its base's source tag).
    ``reranker``: ``{"reranker": Reranker (global adapter merged), "source": its folder,
    "clients": [LoRA per client]}``: written as ``reranker/`` (a transformers
    ``BertForSequenceClassification``) and ``clients/<k>/reranker_lora.safetensors``.
    ``reading``: how the answers with each hit alone make one (a knowledge boundary's
    ``boundary.reading``); ``abstain_threshold``: the decoder's answer-or-abstain rule
    (:func:`~ffrag_jax.evaluation.boundary.abstain_gate`)."""
    folder = Path(folder)
    if retriever_sides not in ("query", "both"):
        raise ValueError(f"retriever_sides must be 'query' or 'both', got {retriever_sides!r}")
    encoder = dataclasses.replace(encoder, lora=None)
    if retriever_sides == "both" and global_retriever is not None:
        encoder = _merged(encoder, global_retriever)
    hf.save_llama(folder / "generator", gen_cfg, sharding.to_host(gen_params),
                  tokenizer=tokenizer, overwrite=True)
    if global_retriever is not None:
        lora.save_weights(folder / "retriever_lora.safetensors", global_retriever)
    if query_params is not None:
        source = default_encoder_path() if retriever_path is None else retriever_path
        encoder_lib.save(folder / "query_encoder", encoder.cfg, sharding.to_host(query_params),
                         source, overwrite=True)
    for name, base in bases.items():
        if not isinstance(base, KnowledgeBase):  # passages: embedded by the export's encoder
            docs = [{"id": f"{name}-{i}", "text": t, "source": name} for i, t in enumerate(base)]
            base = KnowledgeBase.build(name, docs, encoder, index_kind="exact")
        base.save(folder / "knowledge" / name, overwrite=True)
    base_name = retriever_path or "sentence-transformers/all-MiniLM-L6-v2"
    for k, client in enumerate(clients):
        where = folder / "clients" / str(k)
        lora.save_peft_adapter(where / "generator", client["generator"], gen_cfg,
                               base_model_name_or_path=str(folder / "generator"),
                               overwrite=True)
        lora.save_weights(where / "retriever_lora.safetensors", client["retriever"])
        # The client's query encoder for other tools: global + personal retriever LoRAs
        # stacked exactly (FLoRA) into one PEFT adapter on the plain base encoder.
        query_lora = client["retriever"] if global_retriever is None else federated.stack(
            [global_retriever, client["retriever"]], [1.0, 1.0])
        encoder_lib.save_peft_adapter(where / "retriever", query_lora, encoder.cfg,
                                      base_model_name_or_path=base_name, overwrite=True)
    if reranker is not None:
        rr = reranker["reranker"]
        rerank_lib.save(folder / "reranker", rr.cfg, sharding.to_host(rr.params),
                        reranker["source"], overwrite=True)
        for k, adapter in enumerate(reranker["clients"]):
            lora.save_weights(folder / "clients" / str(k) / "reranker_lora.safetensors",
                              adapter)
    system = {"format": FORMAT, "retriever": retriever_path, "retriever_sides": retriever_sides,
              "reranker": None if reranker is None else {
                  "max_len": reranker["reranker"].max_len,
                  "prior_scale": reranker["reranker"].prior_scale},
              "prompt_len": prompt_len,
              # How the reader was trained to be prompted: <s> + this template, fitted to
              # prompt_len tokens by rag.fit_prompt, then " <answer></s>".
              "prompt_template": prompts.TEMPLATE,
              "context_passages": context_passages, "tags": tags, "reading": reading,
              "abstain_threshold": abstain_threshold,
              "quotas": quotas, "clients": [{"name": c["name"], "base": c["base"]}
                                            for c in clients]}
    files.atomic_write_json(folder / "system.json", system)
    return folder


def _merged(encoder: TextEncoder, adapter: LoRA) -> TextEncoder:
    """The encoder with ``adapter`` merged into its weights (its identity follows)."""
    params = lora.merge(encoder.params, adapter)
    return dataclasses.replace(encoder, params=params, sha256=params_sha256(params), lora=None)


def load_system(folder: str | Path, client: int | None = None) -> RagSystem:
    """The system in ``folder`` (a workdir or its ``export``): the global model over the
    shared bases, or with ``client`` that client's fused model over its base and the shared
    ones."""
    folder = Path(folder)
    if not (folder / "system.json").exists() and (folder / "export" / "system.json").exists():
        folder = folder / "export"
    if not (folder / "system.json").exists():
        raise UserError(f"{folder}: no system.json (not a RAG run's workdir or export); run a "
                        "RAG job (--config ffrag or rag_e2e) first")
    system = json.loads((folder / "system.json").read_text())
    if system.get("format") != FORMAT:
        raise UserError(f"{folder}/system.json: format {system.get('format')!r}, this "
                        f"ffrag_jax reads {FORMAT}")
    clients = system["clients"]
    if client is not None and not 0 <= client < len(clients):
        names = ", ".join(f"{k} ({c['name']})" for k, c in enumerate(clients)) or "none"
        raise UserError(f"--client {client}: this system's clients are {names}")
    gen_cfg, gen_params = hf.load_llama(folder / "generator")
    tokenizer = hf.load_tokenizer(folder / "generator")
    encoder = TextEncoder.load(system["retriever"])
    query = encoder
    global_retriever = folder / "retriever_lora.safetensors"
    if (folder / "query_encoder").is_dir():
        query = TextEncoder.load(folder / "query_encoder")
    elif global_retriever.exists():
        query = _merged(encoder, lora.load_weights(global_retriever))
        if system.get("retriever_sides") == "both":
            encoder = query
    quotas = dict(system["quotas"])
    private = {c["base"] for c in clients}
    gen_lora = None
    names = [p.name for p in sorted((folder / "knowledge").iterdir())
             if p.name not in private and not p.name.startswith(".")]  # .tmp: a cut save
    if client is not None:
        where = folder / "clients" / str(client)
        gen_lora = lora.load_peft_adapter(where / "generator", gen_cfg)
        query = dataclasses.replace(query, lora=lora.load_weights(
            where / "retriever_lora.safetensors"))
        base = clients[client]["base"]
        names.insert(0, base)
        quotas[base] = quotas.pop("private")
    quotas.pop("private", None)
    tags = system.get("tags")
    if tags is not None and client is not None and "private" in tags:
        tags = {**tags, clients[client]["base"]: tags["private"]}
    bases = [KnowledgeBase.load(folder / "knowledge" / n, encoder, query_encoder=query)
             for n in names]
    reranker = None
    if system.get("reranker"):
        reranker = Reranker.load(folder / "reranker", max_len=system["reranker"]["max_len"],
                                 prior_scale=system["reranker"].get("prior_scale", 0.0))
        if client is not None:
            reranker.lora = lora.load_weights(folder / "clients" / str(client) /
                                              "reranker_lora.safetensors")
    return RagSystem(gen_cfg, gen_params, gen_lora, tokenizer, bases, quotas,
                     system["prompt_len"], system.get("context_passages", 1), tags, reranker,
                     system.get("reading", "top"),
                     abstain_gate(tokenizer, system.get("abstain_threshold")))
