"""The centralised end-to-end RAG job (``task = "rag"``) on synthetic knowledge.

1. Knowledge: ``data.num_entities`` entities of a synthetic domain with one fact sentence per
   relation form the knowledge base (one passage each, :func:`synthetic.make_knowledge`); a
   question about each fact can only be answered by reading it. Entity names repeat across
   relations ("the capital of Rinkle", "the currency of Rinkle") and questions are also asked
   in users' words that overlap another relation's fact, so the retriever has to find the
   right relation, not just the name.
2. Generator: the tiny Llama pretrained on reading comprehension of the same domain with
   fresh facts (``base_model.pretrain``), or a local checkpoint (``model.path``).
3. Retriever: the packaged MiniLM (or ``retriever.path``) with a LoRA on its query side; the
   passages' vectors stay fixed (query-side training: no index refresh).
4. Before and after training, on held-out questions: retrieval recall@1/@k, closed-book exact
   match (empty context), and RAG exact match (the top-1 passage in the prompt).
5. Training: per step, the current query encoder retrieves the top ``rag.k`` passages of a
   batch of training questions (host side; exact or ScaNN by size), and
   :func:`ffrag_jax.rag.rag_step` updates the LoRAs with the configured losses (default: LSR
   alone, generator frozen).
   With ``train.passage_side`` the candidate passages are re-encoded by the LoRA encoder in
   the step, and the knowledge base is re-embedded and re-indexed every ``rag.refresh_every``
   steps in a background thread (and at the end); training searches the stale index until
   the new one is ready.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from ffrag_jax import rag
from ffrag_jax.config_types import LoRASection
from ffrag_jax.data import synthetic
from ffrag_jax.errors import UserError
from ffrag_jax.jobs.base_model import (
    check_rag_models,
    model_config,
    pretrain,
    run_tokenizer,
)
from ffrag_jax.models.llama import init_params
from ffrag_jax.rag import evaluate as rag_eval
from ffrag_jax.rag import prompts, system
from ffrag_jax.retrieval import encoder as encoder_lib
from ffrag_jax.retrieval import index as index_lib
from ffrag_jax.retrieval.encoder import TextEncoder
from ffrag_jax.training import health, sharding, train
from ffrag_jax.training.metrics import MetricsLog, open_log, plot_training_loss, read_jsonl
from ffrag_jax.training.trainer import StepInfo, Trainer, profiling
from ffrag_jax.training.workdir import write_summary


def knowledge(config: ConfigDict) -> tuple[list[dict], list[dict], list[dict]]:
    """``(facts, train questions, test questions)``; every question's fact is ``facts[i]``."""
    d = config.data
    texts, questions = synthetic.make_knowledge(d.domain, d.num_entities, config.seed + 7)
    facts = [{"id": f"fact{i}", "text": text} for i, text in enumerate(texts)]
    order = np.random.default_rng(config.seed).permutation(len(questions))
    test = [questions[i] for i in sorted(order[: d.num_test])]
    train_q = [questions[i] for i in sorted(order[d.num_test:])]
    return facts, train_q, test


def retrieve(enc: TextEncoder, index, questions: list[dict], k: int) -> np.ndarray:
    """Top-``k`` fact ids ``[N, k]`` of the questions with the encoder's current LoRA (one
    batch of at most 64: a training batch is not padded to more)."""
    vectors = enc.embed([q["question"] for q in questions], batch_size=min(len(questions), 64))
    return index.search(vectors, k)[1]


def evaluate(config, enc, index, facts, questions, gen_params, gen_cfg, tokenizer) -> dict:
    """Retrieval recall, answer-in-context rate (of the top passage), and closed-book / RAG
    exact match and F1 on ``questions`` (:func:`rag_eval.evaluate`)."""
    return rag_eval.evaluate(
        gen_params, gen_cfg, tokenizer, questions, retrieve(enc, index, questions, config.rag.k),
        [f["text"] for f in facts], closed_book=True, prompt_len=config.rag.prompt_len,
        max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size)


def refresh(enc: TextEncoder, texts: list[str], metrics: MetricsLog, step: int):
    """Re-embeds the knowledge base with the encoder's current LoRA and rebuilds the index
    (passage-side training changes the corpus vectors); the time is logged."""
    started = time.perf_counter()
    vectors = enc.embed(texts)
    index = index_lib.build(vectors, "dot", "auto")
    seconds = time.perf_counter() - started
    metrics.write(kind="index_refresh", step=step, seconds=round(seconds, 2), count=len(texts))
    logging.info("index refreshed at step %d in %.1f s", step, seconds)
    return vectors, index


def validate(config: ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The checks of the centralised RAG job that need only the config."""
    del mesh
    r, t = config.rag, config.train
    if r.k < 1:
        raise UserError(f"rag.k must be at least 1, got {r.k}")
    if t.steps < 0:
        raise UserError(f"train.steps must be >= 0, got {t.steps}")
    LoRASection.read(config, "retriever")
    check_rag_models(config)


def run(config: ConfigDict, workdir: Path, mesh: jax.sharding.Mesh) -> dict:
    started = time.perf_counter()
    r, t = config.rag, config.train
    metrics = open_log(workdir)
    facts, train_q, test_q = knowledge(config)
    if r.k > len(facts):
        raise UserError(f"rag.k={r.k} is larger than the knowledge base ({len(facts)} facts)")
    reading = synthetic.make_examples(config.data.domain, config.pretrain.num_examples,
                                      config.seed, distractors=0, user_questions=True)
    tokenizer = run_tokenizer(config, workdir, (
        prompts.prompt(e) + prompts.response(e) for e in reading + [
            {"context": f["text"], "question": "", "answer": ""} for f in facts]))
    train_q = rag.drop_long_answers(tokenizer, train_q, r.answer_len, "training questions")
    gen_cfg, gen_params = model_config(config, tokenizer)
    rng = jax.random.key(config.seed)
    if gen_params is None:
        gen_params = (pretrain(config, gen_cfg, tokenizer, reading, init_rng=rng,
                               rng=jax.random.fold_in(rng, 1), max_len=config.data.max_len,
                               mesh=mesh,
                               ckpt_dir=workdir / "checkpoints", metrics=metrics)
                      if config.pretrain.steps > 0 else init_params(rng, gen_cfg))

    enc = TextEncoder.load(config.retriever.path)
    fact_texts = [f["text"] for f in facts]
    fact_vectors = enc.embed(fact_texts)
    index = index_lib.build(fact_vectors, "dot", "auto")
    fact_tokens = encoder_lib.tokenize(enc.tokenizer, fact_texts, r.passage_len)
    records = read_jsonl(metrics.path) if metrics.path.exists() else []
    before = next((x for x in records if x.get("kind") == "eval" and x["model"] == "base"), None)
    if before is None:
        before = {"model": "base", **evaluate(config, enc, index, facts, test_q, gen_params,
                                              gen_cfg, tokenizer)}
        metrics.write(kind="eval", **before)
    logging.info("before: %s", before)

    ret_lora = LoRASection.read(config, "retriever").init(jax.random.fold_in(rng, 2), enc.params)
    opt_r = train.make_optimizer(t.retriever_lr, t.steps, warmup_steps=t.warmup_steps)
    states = {"generator": None, "retriever": train.init_train_state(ret_lora, opt_r)}
    trainer = Trainer("rag", ckpt_dir=workdir / "checkpoints", metrics=metrics, total=t.steps,
                      checkpoint_every=config.checkpoint_every, **profiling(config, workdir))
    start, states = trainer.initial_state(states)
    loss_cfg = rag.RagLossConfig(weights=tuple((k, float(v)) for k, v in r.losses.items()),
                                 score_scale=r.score_scale, tau_lm=r.tau_lm)
    states = sharding.on_one_device(states)  # so the step compiles once (see the helper)
    frozen = sharding.on_one_device({"generator": gen_params, "retriever": enc.params})
    background = ThreadPoolExecutor(max_workers=1)
    live = {"vectors": fact_vectors, "index": index, "pending": None}
    monitor = health.Monitor("rag", f"lower train.retriever_lr (now {t.retriever_lr:g})")

    def step_fn(states, step: int):
        enc.lora = states["retriever"].trainable
        if (t.passage_side and step > start and step % r.refresh_every == 0
                and not live["pending"]):
            # Rebuilt in the background from a snapshot of the LoRA (the step donates the
            # live one); training searches the stale index until the new one is ready.
            snapshot = dataclasses.replace(enc, lora=jax.tree.map(jnp.copy, enc.lora))
            live["pending"] = background.submit(refresh, snapshot, fact_texts, metrics, step)
        if live["pending"] and live["pending"].done():
            live["vectors"], live["index"] = live["pending"].result()
            live["pending"] = None
        pick = np.random.default_rng([config.seed, step]).choice(len(train_q), t.batch_size,
                                                                 replace=False)
        batch_q = [train_q[i] for i in pick]
        ids = retrieve(enc, live["index"], batch_q, r.k)
        batch = rag.question_batch(
            tokenizer, enc.tokenizer, batch_q, [[facts[i]["text"] for i in row] for row in ids],
            prompt_len=r.prompt_len, answer_len=r.answer_len, query_len=r.query_len)
        if t.passage_side:  # passages re-encoded by the LoRA encoder: gradients reach them
            batch["passage_ids"] = fact_tokens["input_ids"][ids]
            batch["passage_mask"] = fact_tokens["attention_mask"][ids]
        else:
            batch["passage_emb"] = live["vectors"][ids]
        return rag.rag_step(states, frozen, {k: jnp.asarray(v) for k, v in batch.items()},
                            jax.random.fold_in(rng, step), gen_cfg=gen_cfg, enc_cfg=enc.cfg,
                            loss_cfg=loss_cfg, optimizers=(None, opt_r))

    def log(info: StepInfo) -> None:
        out = sharding.to_host(info.out)
        monitor.check(info.step, float(out["loss"]))
        metrics.write(kind="train", phase="rag", step=info.step, loss=float(out["loss"]),
                      top1_is_lm_best=float(out["retrieval_top1_is_lm_best"]))
        trainer.show(loss=float(out["loss"]))
        logging.info("rag step %d/%d loss %.4f", info.step, t.steps, float(out["loss"]))

    trainer.add_hook(log, every=config.log_every)
    states = trainer.run(states, step_fn, start)
    fact_vectors, index, pending = live["vectors"], live["index"], live["pending"]

    if pending:
        pending.result()  # a rebuild still running: let it finish (and log) before the last
    background.shutdown()
    enc.lora = states["retriever"].trainable
    if t.passage_side:  # the final refresh: the index the trained encoder searches
        fact_vectors, index = refresh(enc, fact_texts, metrics, t.steps)
    after = {"model": "trained", **evaluate(config, enc, index, facts, test_q, gen_params,
                                            gen_cfg, tokenizer)}
    metrics.write(kind="eval", **after)
    logging.info("after: %s", after)
    system.export_system(
        workdir / "export", gen_cfg=gen_cfg, gen_params=gen_params, tokenizer=tokenizer,
        encoder=enc, retriever_path=config.retriever.path, global_retriever=enc.lora,
        bases={"facts": fact_texts}, quotas={"facts": r.k}, prompt_len=r.prompt_len,
        retriever_sides="both" if t.passage_side else "query")
    plot_training_loss(read_jsonl(metrics.path), workdir / "loss.png",
                       title="ffrag_jax RAG: LM-supervised retrieval")
    keys = [k for k in before if k not in ("model", "questions")]
    summary = {"facts": len(facts), "train_questions": len(train_q),
               "test_questions": len(test_q),
               "before": {k: round(before[k], 4) for k in keys},
               "after": {k: round(after[k], 4) for k in keys},
               "wall_time_s": round(time.perf_counter() - started, 1)}
    metrics.close()
    return write_summary(workdir, summary)
