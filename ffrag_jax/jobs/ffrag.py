"""Federated FF-RAG (``task = "ffrag"``): every client trains a personal generator LoRA and a
personal query-encoder LoRA with the end-to-end RAG loss on its private questions, retrieving
from its private case base and the shared authoritative base; the server stacks both
(FLoRA, exact) into the next round's global adapters (FF-LoRA: a client's model is the base +
global + its personal adapters, fused additively).

Knowledge: :func:`ffrag_jax.data.knowledge.client_knowledge` (a private case base per client,
a shared authoritative base, questions on both; nothing answerable closed-book).

A round, for each client in turn (``fl.local_steps`` steps of :func:`ffrag_jax.rag.rag_step`):
the base generator and the query encoder get the global adapters merged in; per step the
client's current query encoder (merged global + personal LoRA) retrieves ``rag.k_private``
passages from the case base and ``rag.k_shared`` from the shared base (host side; exact or
ScaNN by size; the passages' vectors are fixed: query-side training needs no refresh), and the
step updates both personal LoRAs with ``rag.losses``. Then the server stacks the personal
adapters, weighted by training questions, into the global ones.

Evaluated on every client's held-out questions, before training (``base``) and after every
round (``global``: base + global adapters; ``fused``: + the client's personal ones): recall@1
of the merged candidates, answer-in-context rate of the top passage, RAG exact match and F1
with the top passage, and closed-book exact match (no passage). Rounds are checkpointed and
a killed run resumes at the last finished round.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from ffrag_jax import federated, files, rag
from ffrag_jax.config_types import LoRASection
from ffrag_jax.data import boundary
from ffrag_jax.data.knowledge import (
    boundary_enabled,
    client_knowledge,
    reading_examples,
    tokenizer_texts,
)
from ffrag_jax.errors import UserError
from ffrag_jax.federated import privacy, strategies
from ffrag_jax.federated.driver import RoundDriver
from ffrag_jax.jobs.base_model import (
    abstract_model,
    check_lengths,
    check_rag_models,
    model_config,
    pretrain,
    run_tokenizer,
)
from ffrag_jax.jobs.ffrag_client import (
    abstain_gate,
    client_batch,
    evaluate_client,
    pre_aligning,
    reranking,
    single_passage,
    train_client,
    training_questions,
)
from ffrag_jax.jobs.ffrag_client import reading as reading_rule
from ffrag_jax.models import lora
from ffrag_jax.models.llama import init_params
from ffrag_jax.rag import system
from ffrag_jax.rerank import rounds as rerank_rounds
from ffrag_jax.rerank import self_align
from ffrag_jax.rerank.cross_encoder import Reranker
from ffrag_jax.retrieval.encoder import TextEncoder, default_encoder_path
from ffrag_jax.retrieval.knowledge_base import KnowledgeBase
from ffrag_jax.retrieval.multi_source import Sources
from ffrag_jax.training import health, sharding, train
from ffrag_jax.training.metrics import open_log, plot_client_rounds, plot_training_loss, read_jsonl
from ffrag_jax.training.trainer import StepInfo, profiling
from ffrag_jax.training.workdir import write_summary


def merged(model: tuple[dict, lora.LoRA | None]) -> dict:
    """The weights of a ``(params, adapter)`` model with its adapter merged in."""
    params, adapter = model
    return params if adapter is None else lora.merge(params, adapter)


def base_generator(config: ConfigDict, gen_cfg, params, tokenizer, reading: list[dict],
                   rng: jax.Array, mesh: jax.sharding.Mesh, workdir: Path, metrics) -> dict:
    """The base generator on one device: ``params`` (a real checkpoint's), else the tiny
    model pretrained on ``reading`` (``pretrain.steps`` > 0; resumed from its checkpoints) or
    as initialised."""
    if params is None:
        params = (pretrain(config, gen_cfg, tokenizer, reading, init_rng=rng,
                           rng=jax.random.fold_in(rng, 1), max_len=config.data.max_len,
                           mesh=mesh, ckpt_dir=workdir / "checkpoints", metrics=metrics)
                  if config.pretrain.steps > 0 else init_params(rng, gen_cfg))
    # Clients train on one device: everything the step sees is committed to it, or it compiles
    # again (see sharding.on_one_device); a restored checkpoint is put there too.
    return sharding.on_one_device(params)


def adapter_rng(rng: jax.Array, offset: int, name: str, k: int) -> jax.Array:
    """The key of client ``k``'s fresh ``name`` adapter (``offset``: 0 for the first
    personal adapters, ``1000 * round`` for a round's fresh ones): one rule for the server and
    for a client that makes its own (the Flower engine)."""
    return jax.random.fold_in(rng, offset + {"generator": 10, "retriever": 100,
                                             "reranker": 200}[name] + k)


def fresh_adapters(sections: dict, trees: dict, rng: jax.Array, offset: int) -> dict:
    """Fresh adapters for every client of every model (``trees``: ``{model: (base weights,
    client ranks)}``), as client batches (each padded to the model's largest rank)."""
    return {name: federated.pad_and_stack(
        [sections[name].init(adapter_rng(rng, offset, name, k), base, rank)
         for k, rank in enumerate(ranks)], max(ranks))
        for name, (base, ranks) in trees.items()}


def initial_server(strategy: strategies.Strategy, sections: dict, trees: dict,
                   rng: jax.Array) -> dict:
    """``{model: the strategy's round-0 server state}``: every client's first personal
    adapter (personalised strategies), or one global adapter at the largest rank (strategies
    that carry one)."""
    personal = fresh_adapters(sections, trees, rng, 0) if strategy.personalised else {}
    start = {}
    if not (strategy.personalised or strategy.fresh_adapters):  # one global adapter carried
        seeds = {"generator": 9, "retriever": 99, "reranker": 199}
        start = {name: sections[name].init(jax.random.fold_in(rng, seeds[name]), base,
                                           max(ranks))
                 for name, (base, ranks) in trees.items()}
    return {name: strategy.init_server(base, start=start.get(name),
                                       personal=personal.get(name), ranks=ranks,
                                       per_round=len(ranks))
            for name, (base, ranks) in trees.items()}


def shared_knowledge_base(shared: list[str], enc: TextEncoder) -> KnowledgeBase:
    """The shared authoritative base, embedded by the (frozen) passage encoder."""
    return KnowledgeBase.from_passages("shared", shared, enc, vectors=enc.embed(shared))


def client_sources(config: ConfigDict, k: int, client, shared_base: KnowledgeBase,
                   enc: TextEncoder) -> Sources:
    """What client ``k`` searches: its private case base and the shared base, with the
    quotas ``rag.k_private`` and ``rag.k_shared``."""
    r = config.rag
    cases = KnowledgeBase.from_passages(f"cases_{k}", client.private, enc,
                                        vectors=enc.embed(client.private))
    if len(cases) < r.k_private or len(shared_base) < r.k_shared:
        logging.warning("client %s: a base holds fewer passages than its quota; the "
                        "missing candidates are masked out", client.name)
    return Sources([cases, shared_base], [r.k_private, r.k_shared],
                   tags=boundary.SOURCES if r.source_tags else None)


def strategy_of(config: ConfigDict) -> strategies.Strategy:
    return strategies.from_config(config.fl)


def validate(config: ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Every check of the FF-RAG job that needs only the config: rounds, strategy, ranks,
    quotas, lengths, the adapters against the model's shapes, the retriever folder."""
    r, fl = config.rag, config.fl
    if fl.rounds <= 0:
        raise UserError(f"fl.rounds must be positive, got {fl.rounds}")
    privacy.from_config(fl)  # a bad fl.dp before any work
    from ffrag_jax.jobs.federated import check_engine

    check_engine(config)
    if fl.get("engine", "local") == "flower":
        from ffrag_jax.federated.flower.ffrag_server import check

        check(config)
    if fl.num_clients < 1:
        raise UserError(f"fl.num_clients must be at least 1, got {fl.num_clients}")
    if fl.vmap_clients and fl.num_clients % mesh.shape["clients"]:
        raise UserError(f"fl.num_clients={fl.num_clients} do not divide over the mesh's "
                        f"{mesh.shape['clients']} 'clients' devices (fl.vmap_clients)")
    strategy = strategy_of(config)
    gen_section = LoRASection.read(config, "generator")
    LoRASection.read(config, "retriever")
    if reranking(config) or pre_aligning(config):
        rerank_rounds.validate(config)
    if reranking(config):
        LoRASection.read(config, "reranker")
    ranks = gen_section.client_ranks(fl.num_clients)
    strategy.check(ranks)
    if min(r.k_private, r.k_shared) < 0 or r.k_private + r.k_shared == 0:
        raise UserError(f"rag.k_private={r.k_private} and rag.k_shared={r.k_shared}: "
                        "quotas must be >= 0 and retrieve at least one passage")
    if r.context_passages < 1:
        raise UserError(f"rag.context_passages must be at least 1, got {r.context_passages}")
    if not single_passage(config):
        scoring = [name for name in r.losses if name in ("rag_sequence", "rag_token", "lsr")]
        if scoring:
            raise UserError(f"rag.losses {scoring[0]} scores single passages; with "
                            f"rag.context_passages={r.context_passages} the reader reads one "
                            "context: use ralt or dual_task")
    if "dual_task" in r.losses and not boundary_enabled(config):
        raise UserError("rag.losses dual_task trains the knowledge boundary: set "
                        "boundary.enabled=True (or use ralt)")
    for name in ("local_steps", "batch_size"):
        if fl[name] < 1:
            raise UserError(f"fl.{name} must be at least 1, got {fl[name]}")
    if fl.lr <= 0:
        raise UserError(f"fl.lr must be positive, got {fl.lr}")
    if fl.retriever_lr < 0:  # 0: the query encoder is not trained (an off-the-shelf retriever)
        raise UserError(f"fl.retriever_lr must be >= 0, got {fl.retriever_lr}")
    shapes = check_rag_models(config)
    if pre_aligning(config):
        check_lengths(abstract_model(config)[0],
                      {"rerank.pre_align_len": config.rerank.pre_align_len})
    for rank in sorted(set(ranks)):
        jax.eval_shape(lambda p, rank=rank: gen_section.init(jax.random.key(0), p, rank),
                       shapes)


def run(config: ConfigDict, workdir: Path, mesh: jax.sharding.Mesh, grid=None) -> dict:
    """Runs the FF-RAG job in ``workdir``; returns the summary it writes. On the Flower engine
    (``fl.engine="flower"``) the server's side runs here
    (:mod:`ffrag_jax.federated.flower.ffrag_server`) with ``grid``, or starts Flower's
    simulation runtime, which calls back with its grid."""
    if config.fl.get("engine", "local") == "flower":
        from ffrag_jax.federated.flower import apps, ffrag_server, simulation

        grid = grid or apps.current_grid()  # inside the ServerApp of `flwr run`
        if grid is None:
            return simulation.run(config, workdir, mesh, job_run=run)
        return ffrag_server.run(config, workdir, mesh, grid)
    started = time.perf_counter()
    r, fl = config.rag, config.fl
    metrics = open_log(workdir)
    shared, clients = client_knowledge(config)
    for c in clients:
        c.train = training_questions(config, c)
    reading = reading_examples(config)
    tokenizer = run_tokenizer(config, workdir, tokenizer_texts(reading, shared, clients))
    abstain_gate(config, tokenizer)  # a bad answer-or-abstain rule fails before training
    for c in clients:
        c.train = rag.drop_long_answers(tokenizer, c.train, r.answer_len, f"client {c.name}")
    gen_cfg, params = model_config(config, tokenizer)
    rng = jax.random.key(config.seed)
    enc = TextEncoder.load(config.retriever.path)
    gen_section, ret_section = (LoRASection.read(config, name)
                                for name in ("generator", "retriever"))
    gen_ranks = tuple(gen_section.client_ranks(len(clients)))
    ret_ranks = tuple(ret_section.client_ranks(len(clients)))
    rr = rr_section = None
    if reranking(config):  # the cross-encoder: the packaged MiniLM and a fresh head, or a folder
        rr = Reranker.load(config.rerank.path, max_len=config.rerank.max_len, seed=config.seed,
                           prior_scale=config.rerank.prior_scale)
        rr_section = LoRASection.read(config, "reranker")
        rr_ranks = tuple(rr_section.client_ranks(len(clients)))
        rr_section.init(rng, rr.params)
    # Bad adapter settings fail here, not after minutes of pretraining (shapes only).
    shapes = jax.eval_shape(lambda: init_params(rng, gen_cfg)) if params is None else params
    for rank in sorted(set(gen_ranks)):
        gen_section.init(rng, shapes, rank)
    ret_section.init(rng, enc.params)
    params = base_generator(config, gen_cfg, params, tokenizer, reading, rng, mesh, workdir,
                            metrics)
    # The bases this job searches are the ones it exports (multi_source: one search).
    shared_base = shared_knowledge_base(shared, enc)
    sources = [client_sources(config, k, c, shared_base, enc) for k, c in enumerate(clients)]
    logging.info("%d clients; shared base %d facts; private %s; training questions %s",
                  len(clients), len(shared), [len(c.private) for c in clients],
                  [len(c.train) for c in clients])

    records = read_jsonl(metrics.path)
    if not any(x.get("kind") == "eval" and x.get("round") == 0 for x in records):
        for k, (c, s) in enumerate(zip(clients, sources, strict=True)):
            m = evaluate_client(config, c, s, enc, params, None, gen_cfg, tokenizer,
                                closed_book=True)
            metrics.write(kind="eval", round=0, client=k, name=c.name, model="base", **m)
            logging.info("round 0 %s base: %s", c.name, _short(m))

    strategy = strategy_of(config)
    dp = privacy.from_config(fl)

    trees = {"generator": (params, gen_ranks), "retriever": (enc.params, ret_ranks)}
    sections = {"generator": gen_section, "retriever": ret_section}
    if rr is not None:
        trees["reranker"] = (rr.params, rr_ranks)
        sections["reranker"] = rr_section

    def new_adapters(offset: int) -> dict:
        return fresh_adapters(sections, trees, rng, offset)

    server = initial_server(strategy, sections, trees, rng)
    # Every client takes part in every round (FF-RAG's clients are few, and each keeps a
    # personal adapter); a round is minutes of work, so its checkpoint is finished at once.
    driver = RoundDriver(strategy, name="ffrag", ckpt_dir=workdir / "checkpoints",
                         metrics=metrics, rounds=fl.rounds,
                         client_sizes=[len(c.train) for c in clients],
                         servers=tuple(trees), wait_each_save=True,
                         profile=profiling(config, workdir))
    trainer = driver.trainer
    done, server = driver.initial_state(sharding.on_one_device(server))
    loss_cfg = rag.RagLossConfig(weights=tuple((k, float(v)) for k, v in r.losses.items()),
                                 score_scale=r.score_scale, tau_lm=r.tau_lm)
    # What the strategy changes in local training (FedProx's proximal term, FFA's frozen a).
    opt_gen = strategy.client_optimizer(
        train.make_optimizer(fl.lr, fl.local_steps, warmup_steps=0))
    opt_ret = strategy.client_optimizer(
        train.make_optimizer(fl.retriever_lr, fl.local_steps, warmup_steps=0))

    hint = f"lower fl.lr (now {fl.lr:g}) or fl.retriever_lr (now {fl.retriever_lr:g})"
    monitors = [health.Monitor(f"client {c.name}", hint) for c in clients]

    by_client = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients"))
    everywhere = sharding.replicated(mesh)

    def train_reranker(rnd: int, k: int, gen_params: dict, gen_lora, query_enc: TextEncoder,
                       reranker: Reranker):
        """Client k's reranker round (ffrag_jax.rerank.rounds): preference data from its
        freshly trained generator and query encoder, then local steps. Returns the adapter."""
        c, s = clients[k], sources[k]

        def search(texts):
            return s.search(query_enc.embed(texts))

        def label(questions, ids):
            return preference_labels(config, gen_params, gen_lora, s, questions, ids)

        trainer.within(f"client {k + 1}/{len(clients)} {c.name} reranker data", 0,
                       config.rerank.local_steps)
        data = rerank_rounds.client_data(config, c.train, c.domain, search, s.tagged_texts,
                                         label, reranker, (rnd, k))
        rngs = [jax.random.fold_in(rng, rnd * 100_000 + k * 1000 + 500 + step)
                for step in range(config.rerank.local_steps)]
        adapter, steps = rerank_rounds.local_steps(config, reranker.lora, reranker, data, rngs,
                                                   (rnd, k, 7), strategy.client_optimizer)
        for step, out in enumerate(steps, 1):
            if step % config.log_every == 0 or step == len(steps):
                metrics.write(kind="train", phase="rerank", round=rnd, client=k, name=c.name,
                              step=(rnd - 1) * len(steps) + step, **out)
        metrics.write(kind="rerank_data", round=rnd, client=k, name=c.name, kept=data.kept,
                      augmented=data.augmented, filtered=data.filtered,
                      no_aligned=data.no_aligned, seconds=round(data.seconds, 2))
        logging.info("round %d %s reranker: %d queries (%d augmented, %d filtered out), "
                     "loss %.4f -> %.4f", rnd, c.name, data.kept, data.augmented, data.filtered,
                     steps[0]["loss"], steps[-1]["loss"])
        return adapter

    def preference_labels(config, gen_params, gen_lora, s: Sources, questions, ids):
        """The client generator's preferences over candidates ``ids`` (rerank.preference:
        its greedy answers' correctness, or the gold answer's likelihood)."""
        common = dict(tags=s.passage_tags, lora=gen_lora, prompt_len=r.prompt_len,
                      batch_size=config.eval.batch_size)
        if config.rerank.preference == "likelihood":
            return rerank_rounds.preferences.likelihood_labels(
                gen_params, gen_cfg, tokenizer, questions, ids, s.texts,
                answer_len=r.answer_len, **common)
        return rerank_rounds.preferences.preference_labels(
            gen_params, gen_cfg, tokenizer, questions, ids, s.texts,
            max_new_tokens=config.eval.max_new_tokens, **common)

    def pre_align(k: int, gen_params: dict, query_params: dict, adapter):
        """Client k's pre-aligned stage (ffrag_jax.rerank.self_align) before its first RAG
        training: its generator learns to name the candidate it answers right with."""
        c, s, ra = clients[k], sources[k], config.rerank
        pool = [q for q in c.train if q.get("type") != "unanswerable"]
        pick = np.random.default_rng([config.seed, k, 11]).choice(len(pool), ra.questions)
        questions = [pool[i] for i in pick]
        query_enc = dataclasses.replace(enc, params=query_params, lora=None)
        ids = s.search(query_enc.embed([q["question"] for q in questions]))[1]
        labels = preference_labels(config, gen_params, adapter, s, questions, ids)
        prompts_, responses = self_align.examples(questions, ids, s.texts, s.passage_tags,
                                                  labels)
        rngs = [jax.random.fold_in(rng, 900_000 + k * 1000 + step)
                for step in range(ra.pre_align_steps)]
        trainer.within(f"client {k + 1}/{len(clients)} {c.name} pre-alignment", 0,
                       ra.pre_align_steps)
        adapter, steps = self_align.train_adapter(
            gen_params, gen_cfg, tokenizer, adapter, prompts_, responses,
            steps=ra.pre_align_steps, batch_size=fl.batch_size, lr=fl.lr,
            max_len=ra.pre_align_len, rngs=rngs, seed=(config.seed, k, 12))
        for step, out in enumerate(steps, 1):
            if step % config.log_every == 0 or step == len(steps):
                metrics.write(kind="train", phase="pre_align", round=1, client=k, name=c.name,
                              step=step, **out)
        return adapter

    def one_round(server: dict, t: int, selected: list[int], weights: np.ndarray):
        """Every client's local training from the strategy's start, then aggregation."""
        rnd = t + 1
        everyone = np.asarray(selected)
        fresh = new_adapters(1000 * rnd) if strategy.fresh_adapters else {}
        starts = {name: strategy.client_start(srv, everyone, fresh.get(name))
                  for name, srv in server.items()}
        # A client of rank r trains the first r components of a wider start (a carried
        # global adapter; zero-padding's rule); its padding stays exactly zero.
        starts["generator"] = federated.pad_and_stack(
            [federated.unpad_rank(federated.client(starts["generator"], k), gen_ranks[k])
             for k in range(len(clients))], max(gen_ranks))
        round_gen = strategy.round_params(server["generator"])[0]
        round_query = strategy.round_params(server["retriever"])[0]
        frozen = sharding.on_one_device({"generator": round_gen, "retriever": round_query})
        round_rr = None if rr is None else dataclasses.replace(
            rr, params=strategy.round_params(server["reranker"])[0])
        if rnd == 1 and pre_aligning(config):
            starts["generator"] = federated.pad_and_stack([
                pre_align(k, round_gen, round_query, federated.unpad_rank(
                    federated.client(starts["generator"], k), gen_ranks[k]))
                for k in range(len(clients))], max(gen_ranks))

        def start_reranker(k: int) -> Reranker | None:
            """Client k's reranker at the round's start (it orders the reader's contexts)."""
            return None if rr is None else dataclasses.replace(
                round_rr, lora=federated.client(starts["reranker"], k))
        static = dict(gen_cfg=gen_cfg, enc_cfg=enc.cfg, loss_cfg=loss_cfg,
                      optimizers=(opt_gen, opt_ret))
        step_rngs = [[jax.random.fold_in(rng, rnd * 100_000 + k * 1000 + step)
                      for step in range(fl.local_steps)] for k in range(len(clients))]
        logged = [step for step in range(1, fl.local_steps + 1)
                  if step % config.log_every == 0 or step == fl.local_steps]

        def log(k: int, step: int, out: dict, rnd: int = rnd) -> None:
            out = {n: float(v) for n, v in out.items()}
            monitors[k].check(step, out["loss"])
            # One schema for every job: client index + name; the step counts on across
            # rounds (round r's local step s is (r - 1) * local_steps + s).
            metrics.write(kind="train", phase="ffrag", round=rnd, client=k,
                          name=clients[k].name, step=(rnd - 1) * fl.local_steps + step, **out)
            logging.info("round %d %s step %d/%d loss %.4f", rnd, clients[k].name, step,
                         fl.local_steps, out["loss"])

        if fl.vmap_clients:
            # Every client's batches first, retrieved by its round-start query encoder (stale
            # within the round), then all clients' local training as one vmapped program.
            per_client = []
            for k, (c, s) in enumerate(zip(clients, sources, strict=True)):
                query_enc = dataclasses.replace(
                    enc, params=round_query, lora=federated.client(starts["retriever"], k))
                steps = [client_batch(config, tokenizer, query_enc, s, c, (rnd, k, step),
                                       start_reranker(k))
                         for step in range(fl.local_steps)]
                per_client.append(jax.tree.map(lambda *xs: np.stack(xs), *steps))
            batches = jax.tree.map(lambda *xs: np.stack(xs), *per_client)
            states = {
                "generator": jax.vmap(lambda g: train.init_train_state(g, opt_gen))(
                    starts["generator"]),
                "retriever": jax.vmap(lambda t: train.init_train_state(t, opt_ret))(
                    starts["retriever"])}
            rngs = jnp.stack([jnp.stack(keys) for keys in step_rngs])
            # The clients over the mesh's `clients` axis (each device, of any process, trains
            # its own), the round's frozen models replicated.
            states, batches, rngs = sharding.put((states, batches, rngs), by_client)
            trainer.within(f"{len(clients)} clients training (one program)", 0, 1)
            with jax.set_mesh(mesh):  # the model's activation hints (models.partitioning)
                states, out = rag.update_clients(states, sharding.put(frozen, everywhere),
                                                 batches, rngs, **static)
            # Back to the host loop's one device (gathered from every process); the metrics
            # to the host, where they are logged.
            states, out = sharding.on_one_device(states), sharding.to_host(out)
            for k in range(len(clients)):
                for step in logged:
                    log(k, step, {n: v[k, step - 1] for n, v in out.items()})
            new_gen = [federated.client(states["generator"].trainable, k)
                       for k in range(len(clients))]
            new_ret = [federated.client(states["retriever"].trainable, k)
                       for k in range(len(clients))]
        else:
            new_gen, new_ret = [], []
            for k, (c, s) in enumerate(zip(clients, sources, strict=True)):

                def on_step(step: int, out: dict, k: int = k, c=c) -> None:
                    if step in logged:
                        log(k, step, sharding.to_host(out))
                        trainer.show(loss=float(out["loss"]))
                    trainer.within(f"client {k + 1}/{len(clients)} {c.name} step", step,
                                   fl.local_steps)

                gen, ret = train_client(
                    config, c, s, enc, tokenizer, (rnd, k), frozen, static,
                    federated.unpad_rank(federated.client(starts["generator"], k),
                                         gen_ranks[k]),
                    federated.client(starts["retriever"], k), step_rngs[k],
                    reranker=start_reranker(k), on_step=on_step)
                new_gen.append(gen)
                new_ret.append(ret)
        # Each client's update at its own rank (padding cut), as client batches.
        updated = {"generator": federated.pad_and_stack(
                       [federated.unpad_rank(g, rank) for g, rank in zip(new_gen, gen_ranks,
                                                                         strict=True)],
                       max(gen_ranks)),
                   "retriever": federated.stack_clients(new_ret)}
        if rr is not None:
            updated["reranker"] = federated.stack_clients([
                train_reranker(rnd, k, round_gen, federated.unpad_rank(new_gen[k], gen_ranks[k]),
                               dataclasses.replace(enc, params=round_query, lora=new_ret[k]),
                               start_reranker(k))
                for k in range(len(clients))])
        if dp is not None:  # clipped and noised on each client before it is sent
            # A model the clients do not train (retriever_lr=0) is sent as it started.
            private = {n: u for n, u in updated.items()
                       if n != "retriever" or fl.retriever_lr > 0}
            masks = {n: jnp.stack([federated.rank_mask(r, max(trees[n][1]))
                                   for r in trees[n][1]]) for n in private}
            keys = jax.random.split(jax.random.fold_in(rng, 7919 * rnd), len(clients))
            updated.update(privacy.privatise(
                private, {n: starts[n] for n in private}, masks, keys, dp))
            metrics.write(kind="privacy", round=rnd, **privacy.spent(
                dp, [rnd] * len(clients), fl.dp.delta))
        for k, c in enumerate(clients):  # what each client sent and received this round
            sizes = [strategy.payload_bytes(federated.client(updated[name], k), ranks[k],
                                            0 if rnd == 1 else sum(ranks))
                     for name, (_, ranks) in trees.items()]
            metrics.write(kind="payload", round=rnd, client=k, name=c.name,
                          upload_bytes=sum(u for u, _ in sizes),
                          download_bytes=sum(d for _, d in sizes))
        return sharding.on_one_device({
            name: strategy.server_update(server[name], updated[name], weights,
                                         np.ones(len(clients), bool), everyone, trees[name][1])
            for name in server}), {}

    def evaluate_round(info: StepInfo) -> None:
        """The global and (personalised) fused models on every client's held-out questions;
        after the last round, each question's answer too (``predictions.jsonl``)."""
        server, rnd = info.state, info.step
        gen_global = merged(strategy.global_model(server["generator"]))
        query_global = dataclasses.replace(
            enc, params=merged(strategy.global_model(server["retriever"])))
        rr_global = None if rr is None else dataclasses.replace(
            rr, params=merged(strategy.global_model(server["reranker"])))
        # The last round's answers, question by question (what `ask` must reproduce).
        predictions = [] if rnd == fl.rounds else None
        for k, (c, s) in enumerate(zip(clients, sources, strict=True)):
            models = [("global", None, None, rr_global)]
            if strategy.personalised:
                models.append(("fused", federated.unpad_rank(strategy.client_adapter(
                    server["generator"], k), gen_ranks[k]),
                    strategy.client_adapter(server["retriever"], k),
                    None if rr is None else dataclasses.replace(
                        rr_global, lora=strategy.client_adapter(server["reranker"], k))))
            for model, gen_lora, ret_lora, reranker in models:
                rows = None if predictions is None else []
                m = evaluate_client(config, c, s, dataclasses.replace(query_global,
                                                                      lora=ret_lora),
                                    gen_global, gen_lora, gen_cfg, tokenizer,
                                    closed_book=rnd == fl.rounds and model == models[-1][0],
                                    predictions=rows, reranker=reranker)
                metrics.write(kind="eval", round=rnd, client=k, name=c.name, model=model, **m)
                logging.info("round %d %s %s: %s", rnd, c.name, model, _short(m))
                if rows is not None:
                    predictions.extend({"round": rnd, "client": k, "name": c.name,
                                        "model": model, **row} for row in rows)
        if predictions is not None:
            files.atomic_write_text(workdir / "predictions.jsonl", "".join(
                files.dumps(row) + "\n" for row in predictions))

    driver.add_hook(evaluate_round)
    server = driver.run(server, one_round, done)

    gen_global = merged(strategy.global_model(server["generator"]))
    global_ret = strategy.global_model(server["retriever"])[1]
    export = system.export_system(
        workdir / "export", gen_cfg=gen_cfg, gen_params=gen_global, tokenizer=tokenizer,
        encoder=enc, retriever_path=config.retriever.path, global_retriever=global_ret,
        query_params=server["retriever"]["params"] if strategy.changes_base else None,
        bases={"shared": shared_base, **{s.bases[0].name: s.bases[0] for s in sources}},
        quotas={"private": r.k_private, "shared": r.k_shared}, prompt_len=r.prompt_len,
        context_passages=r.context_passages, reading=reading_rule(config),
        abstain_threshold=config.boundary.abstain_threshold if boundary_enabled(config)
        else None,
        reranker=None if rr is None else {
            "reranker": dataclasses.replace(
                rr, params=merged(strategy.global_model(server["reranker"]))),
            "source": config.rerank.path or default_encoder_path(),
            "clients": [strategy.client_adapter(server["reranker"], k)
                        for k in range(len(clients))] if strategy.personalised else []},
        tags=dict(zip(("private", "shared"), boundary.SOURCES, strict=True))
        if r.source_tags else None,
        clients=[{"name": c.name, "base": f"cases_{k}",
                  "generator": federated.unpad_rank(
                      strategy.client_adapter(server["generator"], k), gen_ranks[k]),
                  "retriever": strategy.client_adapter(server["retriever"], k)}
                 for k, c in enumerate(clients)] if strategy.personalised else [])
    logging.info("exported the system to %s (python -m ffrag_jax.ask --workdir %s ...)",
                 export, workdir)
    records = read_jsonl(metrics.path)
    panels = [("eval", "recall@1", "retrieval recall@1"), ("eval", "rag_em", "RAG exact match")]
    if boundary_enabled(config):
        panels += [("eval", "hallucination_rate", "hallucination rate"),
                   ("eval", "abstain_f1", "abstention F1")]
    plot_client_rounds(records, workdir / "rounds.png", "ffrag_jax FF-RAG: held-out questions",
                       panels=panels)
    plot_training_loss(records, workdir / "loss.png", title="ffrag_jax FF-RAG")
    summary = summarize(records, fl.rounds)
    if dp is not None:
        summary["dp"] = privacy.spent(dp, [fl.rounds] * len(clients), fl.dp.delta)
    summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    metrics.close()
    return write_summary(workdir, summary)


def _short(m: dict) -> str:
    keys = ("recall@1", "answer_in_context", "rag_em", "rag_f1", "closed_book_em")
    return " ".join(f"{k} {m[k]:.3f}" for k in keys if k in m)


def summarize(records: list[dict], rounds: int) -> dict:
    """Mean over clients of each model's metrics: ``base`` (round 0), and ``global`` and
    ``fused`` after the last round; the closed-book scores of the base and the final fused
    models."""
    evals = [x for x in records if x.get("kind") == "eval"]

    def mean(model: str, rnd: int) -> dict:
        rows = [x for x in evals if x["model"] == model and x["round"] == rnd]
        keys = dict.fromkeys(k for x in rows for k, v in x.items()
                             if (isinstance(v, float) or v == "nan") and k != "time")
        # A client without questions of a kind has NaN there ("nan"): the mean is of the rest.
        values = {k: [x[k] for x in rows if isinstance(x.get(k), float)] for k in keys}
        return {k: round(float(np.mean(v)), 4) if v else None for k, v in values.items()}

    out = {"rounds": rounds, "base": mean("base", 0), "global": mean("global", rounds)}
    if any(x["model"] == "fused" for x in evals):
        out["fused"] = mean("fused", rounds)
    return out
