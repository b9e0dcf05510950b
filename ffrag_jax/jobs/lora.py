"""The single-adapter job (``task = "lora"``): pretrain a tiny Llama, adapt it to a new domain
with one LoRA (the centralised counterpart of the federated demo).

Steps (each resumable from the workdir):

1. Data: two synthetic reading-comprehension domains (:mod:`ffrag_jax.data.synthetic`), written to
   ``workdir/data/*.jsonl`` for inspection.
2. Tokenizer: a byte-level BPE trained on the training text (``workdir/tokenizer``), or the
   tokenizer of ``model.path`` when a real checkpoint is given.
3. Base model: a tiny Llama trained on the base domain (``pretrain`` phase), or the local HF
   checkpoint at ``model.path`` (no pretraining then).
4. LoRA: an adapter trained on the task domain with the base frozen (``lora`` phase).
5. Evaluation: exact match of greedy answers on held-out questions of the task domain, before
   and after LoRA (and of the base domain), written to ``metrics.jsonl`` and ``summary.json``.
6. Export: the base model as an HF folder with its tokenizer (``export/base_model``) and the
   adapter in PEFT format (``export/lora_adapter``), plus ``loss.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
from absl import logging
from ml_collections import ConfigDict

from ffrag_jax import evaluation
from ffrag_jax.config_types import LoRASection
from ffrag_jax.data import synthetic
from ffrag_jax.jobs.base_model import (
    abstract_model,
    check_lengths,
    encode_synthetic,
    model_config,
    pretrain,
    run_tokenizer,
)
from ffrag_jax.models import hf, lora
from ffrag_jax.rag import prompts
from ffrag_jax.training import sharding
from ffrag_jax.training.loop import train_phase
from ffrag_jax.training.metrics import open_log, plot_training_loss, read_jsonl
from ffrag_jax.training.workdir import write_summary


def _examples(config: ConfigDict, workdir: Path) -> dict[str, list[dict]]:
    d = config.data
    sets = {
        "base_train": (config.pretrain.domain, config.pretrain.num_examples, config.seed),
        "task_train": (d.task_domain, d.num_task_train, config.seed + 1),
        "base_eval": (config.pretrain.domain, d.num_eval, config.seed + 1000),
        "task_eval": (d.task_domain, d.num_eval, config.seed + 1001),
    }
    out = {}
    for name, (domain, n, seed) in sets.items():
        out[name] = synthetic.make_examples(domain, n, seed, distractors=d.distractors)
        synthetic.write_jsonl(workdir / "data" / f"{name}.jsonl", out[name])
    return out


def _tokenizer(config: ConfigDict, workdir: Path, examples: dict[str, list[dict]]):
    return run_tokenizer(config, workdir, (
        prompts.prompt(e) + prompts.response(e)
        for split in ("base_train", "task_train")
        for e in examples[split]
    ))


def _exact_match(config, cfg, params, tokenizer, examples, adapter=None) -> float:
    predictions = evaluation.generate_answers(
        params,
        cfg,
        tokenizer,
        [prompts.prompt(e) for e in examples],
        lora=adapter,
        max_prompt_len=config.data.max_len - config.eval.max_new_tokens,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
    )
    return evaluation.exact_match_score(predictions, [e["answer"] for e in examples])


def _init_lora(config: ConfigDict, rng: jax.Array, params) -> lora.LoRA:
    return LoRASection.read(config, "generator").init(rng, params)


def validate(config: ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The model, its lengths and the LoRA settings, checked on shapes before any work."""
    del mesh
    cfg, shapes = abstract_model(config)
    check_lengths(cfg, {"data.max_len": config.data.max_len})
    jax.eval_shape(lambda p: _init_lora(config, jax.random.key(0), p), shapes)


def run(config: ConfigDict, workdir: Path, mesh: jax.sharding.Mesh) -> dict:
    """Runs the single-adapter job in ``workdir`` on ``mesh``; returns the summary it writes."""
    started = time.perf_counter()
    metrics = open_log(workdir)
    rng = jax.random.key(config.seed)
    init_rng, pretrain_rng, lora_init_rng, lora_rng = jax.random.split(rng, 4)
    common = dict(mesh=mesh, ckpt_dir=workdir / "checkpoints", metrics=metrics,
                  log_every=config.log_every, checkpoint_every=config.checkpoint_every)

    examples = _examples(config, workdir)
    tokenizer = _tokenizer(config, workdir, examples)
    cfg, params = model_config(config, tokenizer)
    logging.info("model: %s", cfg)
    max_len = config.data.max_len  # checked against the model's positions in validate()

    if params is None:
        params = pretrain(config, cfg, tokenizer, examples["base_train"], init_rng=init_rng,
                          rng=pretrain_rng, max_len=max_len, mesh=mesh,
                          ckpt_dir=common["ckpt_dir"], metrics=metrics)
    params = sharding.shard(params, mesh)

    adapter = _init_lora(config, lora_init_rng, params)
    logging.info("LoRA on %s, rank %d: %d trainable parameters (base: %d)",
                 ",".join(adapter.targets), max(adapter.ranks.values()), adapter.num_params(),
                 sum(x.size for x in jax.tree.leaves(params)))
    adapter = train_phase(
        "lora", cfg=cfg, trainable=adapter, frozen=params, mode="lora",
        data=encode_synthetic(tokenizer, examples["task_train"], max_len,
                              config.train.response_only),
        phase=config.train, section="train", rng=lora_rng, **common,
    )

    results = {
        "base_domain_em_base_model": _exact_match(config, cfg, params, tokenizer,
                                                  examples["base_eval"]),
        "task_domain_em_base_model": _exact_match(config, cfg, params, tokenizer,
                                                  examples["task_eval"]),
        "task_domain_em_with_lora": _exact_match(config, cfg, params, tokenizer,
                                                 examples["task_eval"], adapter),
    }
    for name, value in results.items():
        metrics.write(kind="eval", phase="eval", metric=name, value=value)
        logging.info("%s: %.3f", name, value)

    exported = {}
    if config.export:
        base_dir = hf.save_llama(workdir / "export" / "base_model", cfg, params,
                                 tokenizer=tokenizer, overwrite=True)
        lora.save_peft_adapter(workdir / "export" / "lora_adapter", adapter, cfg,
                               base_model_name_or_path=str(base_dir), overwrite=True)
        exported = {"hf_model": str(base_dir), "peft_adapter": str(workdir / "export" /
                                                                  "lora_adapter")}
    plot_training_loss(read_jsonl(metrics.path), workdir / "loss.png",
                       title="ffrag_jax: pretrain, then LoRA on a new domain")
    summary = {
        **results,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "lora_trainable_params": adapter.num_params(),
        "exported": exported,
    }
    metrics.close()
    return write_summary(workdir, summary)
