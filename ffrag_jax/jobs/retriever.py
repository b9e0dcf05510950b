"""The retriever fine-tuning job (``task = "retriever"``): SQuAD questions -> their paragraphs.

1. Data: SQuAD v1.1 (``data.path``) as a retrieval task, questions split by article into
   train and test (no paragraph on both sides).
2. Evaluation before training: the test questions against every paragraph of the file,
   exact search, recall@1/5/10/100, MRR@10, nDCG@10.
3. Training: symmetric in-batch InfoNCE (:mod:`ffrag_jax.retrieval.contrastive`) on
   (question, paragraph) pairs of the train articles; every batch has distinct paragraphs, so
   no in-batch negative is a positive; optionally one BM25-mined hard negative per question
   (``train.hard_negatives``). LoRA (default) or full fine-tuning; checkpointed and
   resumable; loss logged to ``metrics.jsonl`` and ``loss.png``.
4. Evaluation after training, and export of the (merged) encoder as a sentence-transformers
   folder (``export/encoder``) that ``SentenceTransformer`` loads.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from ffrag_jax.config_types import LoRASection
from ffrag_jax.errors import UserError
from ffrag_jax.models import hf, lora
from ffrag_jax.retrieval import beir, contrastive
from ffrag_jax.retrieval import encoder as encoder_lib
from ffrag_jax.retrieval import index as index_lib
from ffrag_jax.retrieval.encoder import TextEncoder
from ffrag_jax.training import health, sharding, train
from ffrag_jax.training.metrics import open_log, plot_training_loss, read_jsonl
from ffrag_jax.training.trainer import StepInfo, Trainer, profiling
from ffrag_jax.training.workdir import write_summary


def evaluate(encoder: TextEncoder, paragraphs: list[dict], questions: list[dict],
             batch_size: int) -> dict:
    """Retrieval scores of ``questions`` against all ``paragraphs`` (exact search)."""
    vectors = encoder.embed([p["text"] for p in paragraphs], batch_size=batch_size,
                            progress=sys.stderr.isatty())
    queries = encoder.embed([q["text"] for q in questions], batch_size=batch_size)
    _, ids = index_lib.ExactIndex(vectors, "dot").search(queries, 100)
    ranked = {q["id"]: [paragraphs[i]["id"] for i in row if i >= 0]
              for q, row in zip(questions, ids, strict=True)}
    return beir.scores(ranked, {q["id"]: {q["paragraph"]: 1} for q in questions})


def mine_hard_negatives(questions: list[dict], paragraphs: dict[str, str], depth: int = 5
                        ) -> list[list[str]]:
    """Per question, the ids of the BM25 top-``depth`` paragraphs (of ``paragraphs``) that are
    not its own: lexically close, wrong passages."""
    import bm25s

    from ffrag_jax.retrieval.knowledge_base import bm25_tokens

    ids = sorted(paragraphs)
    bm25 = bm25s.BM25()
    bm25.index(bm25_tokens([paragraphs[i] for i in ids]), show_progress=False)
    found, _ = bm25.retrieve(bm25_tokens([q["text"] for q in questions]),
                             k=min(depth + 1, len(ids)), show_progress=False)
    return [[ids[j] for j in row if ids[j] != q["paragraph"]][:depth]
            for q, row in zip(questions, found, strict=True)]


def batch_at(step: int, pairs_by_paragraph: list[list[int]], questions: list[dict],
             paragraphs: dict[str, str], tokenizer, config: ConfigDict,
             negatives: list[list[str]] | None = None) -> dict:
    """The batch of ``step`` (a pure function of the seed and step): ``batch_size`` distinct
    paragraphs, one of their questions each, and (with ``negatives``) one hard negative per
    question that is none of the batch's positives."""
    t = config.train
    rng = np.random.default_rng([config.seed, step])
    chosen = rng.choice(len(pairs_by_paragraph), t.batch_size, replace=False)
    indices = [int(rng.choice(pairs_by_paragraph[c])) for c in chosen]
    picked = [questions[i] for i in indices]
    q = encoder_lib.tokenize(tokenizer, [x["text"] for x in picked], t.max_query_len)
    p = encoder_lib.tokenize(tokenizer, [paragraphs[x["paragraph"]] for x in picked],
                             t.max_passage_len)
    batch = {"query_ids": q["input_ids"], "query_mask": q["attention_mask"],
             "passage_ids": p["input_ids"], "passage_mask": p["attention_mask"]}
    if negatives is not None:
        positives = {x["paragraph"] for x in picked}
        hard = []
        for i in indices:
            options = [n for n in negatives[i] if n not in positives]
            # No usable mined negative: a random paragraph outside the batch.
            hard.append(options[0] if options else next(
                pid for pid in rng.permutation(sorted(paragraphs)) if pid not in positives))
        n = encoder_lib.tokenize(tokenizer, [paragraphs[h] for h in hard], t.max_passage_len)
        batch["negative_ids"] = n["input_ids"][:, None]
        batch["negative_mask"] = n["attention_mask"][:, None]
    return batch


def validate(config: ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The checks of the retriever job that need only the config."""
    del mesh
    t, d = config.train, config.data
    if t.mode not in contrastive.MODES:
        raise UserError(f"train.mode={t.mode!r}; choose one of {', '.join(contrastive.MODES)}")
    LoRASection.read(config, "retriever")
    if not d.path:
        raise UserError("data.path must name a SQuAD v1.1 JSON file (e.g. "
                        "../shared/data/squad/dev-v1.1.json)")
    if not Path(d.path).expanduser().is_file():
        raise UserError(f"data.path={d.path} is not a file")
    if config.encoder.path:
        hf.check_model_dir(config.encoder.path)


def run(config: ConfigDict, workdir: Path, mesh: jax.sharding.Mesh) -> dict:
    del mesh  # single-device job for now: the encoder is small
    started = time.perf_counter()
    t, d = config.train, config.data
    metrics = open_log(workdir)
    base = TextEncoder.load(config.encoder.path)
    paragraphs, questions = beir.load_squad(d.path)
    train_q, test_q = beir.split_by_article(questions, d.test_fraction, config.seed)
    if d.max_test_questions and len(test_q) > d.max_test_questions:
        keep = np.random.default_rng(config.seed).choice(len(test_q), d.max_test_questions,
                                                         replace=False)
        test_q = [test_q[i] for i in sorted(keep)]
    by_paragraph: dict[str, list[int]] = {}
    for i, q in enumerate(train_q):
        by_paragraph.setdefault(q["paragraph"], []).append(i)
    groups = list(by_paragraph.values())
    if len(groups) < t.batch_size:
        raise UserError(f"train.batch_size={t.batch_size} exceeds the {len(groups)} training "
                        "paragraphs")
    logging.info("%d paragraphs; %d train questions (%d paragraphs), %d test questions",
                 len(paragraphs), len(train_q), len(groups), len(test_q))

    records = read_jsonl(metrics.path) if metrics.path.exists() else []
    before = next((r for r in records if r.get("kind") == "eval" and r["model"] == "base"), None)
    if before is None:
        before = {"model": "base", **evaluate(base, paragraphs, test_q, config.eval.batch_size)}
        metrics.write(kind="eval", **before)
    logging.info("before training: recall@1 %.4f, recall@10 %.4f, nDCG@10 %.4f",
                 before["recall@1"], before["recall@10"], before["ndcg@10"])

    rng = jax.random.key(config.seed)
    if t.mode == "lora":
        trainable = LoRASection.read(config, "retriever").init(rng, base.params)
    else:
        trainable = base.params
    optimizer = train.make_optimizer(t.lr, t.steps, warmup_steps=t.warmup_steps,
                                     weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)
    state = train.init_train_state(trainable, optimizer)
    trainer = Trainer("retriever", ckpt_dir=workdir / "checkpoints", metrics=metrics,
                      total=t.steps, checkpoint_every=config.checkpoint_every,
                      **profiling(config, workdir))
    start, state = trainer.initial_state(state)
    texts = {p["id"]: p["text"] for p in paragraphs}
    negatives = None
    if t.hard_negatives:
        train_ids = {q["paragraph"] for q in train_q}
        negatives = mine_hard_negatives(train_q, {i: texts[i] for i in train_ids})
    frozen = base.params if t.mode == "lora" else None
    window = {"outs": [], "start": time.perf_counter()}
    monitor = health.Monitor("retriever", f"lower train.lr (now {t.lr:g})")

    def step_fn(state, step: int):
        batch = batch_at(step, groups, train_q, texts, base.tokenizer, config, negatives)
        state, out = contrastive.train_step(
            state, frozen, batch, jax.random.fold_in(rng, step), cfg=base.cfg,
            optimizer=optimizer, mode=t.mode, scale=t.logit_scale, symmetric=t.symmetric)
        window["outs"].append(out)
        return state, out

    def log(info: StepInfo) -> None:
        got = sharding.to_host(window["outs"])
        loss = float(np.mean([w["loss"] for w in got]))
        monitor.check(info.step, loss, float(got[-1]["grad_norm"]))
        metrics.write(kind="train", phase="retriever", step=info.step, loss=loss,
                      accuracy=float(np.mean([w["accuracy"] for w in got])),
                      grad_norm=float(got[-1]["grad_norm"]),
                      steps_per_s=round(len(got) / (time.perf_counter() - window["start"]), 3))
        logging.info("retriever step %d/%d  loss %.4f  in-batch accuracy %.3f", info.step,
                     t.steps, loss, np.mean([w["accuracy"] for w in got]))
        trainer.show(loss=loss)
        window.update(outs=[], start=time.perf_counter())

    trainer.add_hook(log, every=config.log_every)
    state = trainer.run(state, step_fn, start)

    tuned_params = (lora.merge(base.params, state.trainable) if t.mode == "lora"
                    else state.trainable)
    tuned = TextEncoder(base.cfg, tuned_params, base.tokenizer, base.name + "+tuned",
                        encoder_lib.params_sha256(tuned_params))
    after = {"model": "tuned", **evaluate(tuned, paragraphs, test_q, config.eval.batch_size)}
    metrics.write(kind="eval", **after)
    logging.info("after training: recall@1 %.4f, recall@10 %.4f, nDCG@10 %.4f",
                 after["recall@1"], after["recall@10"], after["ndcg@10"])
    exported = {}
    if config.export:
        folder = encoder_lib.save(workdir / "export" / "encoder", base.cfg,
                                  sharding.to_host(tuned_params),
                                  encoder_lib.default_encoder_path() if config.encoder.path
                                  is None else config.encoder.path, overwrite=True)
        exported = {"encoder": str(folder)}
    plot_training_loss(read_jsonl(metrics.path), workdir / "loss.png",
                       title="ffrag_jax retriever: in-batch InfoNCE on SQuAD")
    keys = ("recall@1", "recall@5", "recall@10", "recall@100", "mrr@10", "ndcg@10")
    summary = {
        "train_questions": len(train_q),
        "test_questions": len(test_q),
        "before": {k: round(before[k], 4) for k in keys},
        "after": {k: round(after[k], 4) for k in keys},
        "wall_time_s": round(time.perf_counter() - started, 1),
        "exported": exported,
    }
    metrics.close()
    return write_summary(workdir, summary)
