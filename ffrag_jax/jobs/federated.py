"""The federated LoRA job (``task = "federated"``): data, rounds, evaluation, checkpoints.

Per round (all pure steps are in :mod:`ffrag_jax.federated`; the strategy is an object from
:mod:`ffrag_jax.federated.strategies`, chosen once from ``fl.strategy``):

1. select ``max(int(fraction * N), 1)`` clients, seeded by the round (as the reference);
2. build their batches ``[K, S, A, B, T]`` (a pure function of seed, round and client);
3. run the jitted round: vmapped local training, NaN/inf rejection, aggregation;
4. evaluate loss and perplexity on every client's held-out split, for the global model and
   (personalised strategies) each client's fused model; log upload/download bytes per
   client;
5. save an orbax checkpoint of the server state.

A run resumes from its last completed round and gives the same result as an uninterrupted
run: nothing of a round depends on host state other than the checkpoint.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from ffrag_jax import federated
from ffrag_jax.config_types import LoRASection
from ffrag_jax.data import synthetic
from ffrag_jax.data.clients import client_records, encode_clients, pairs_of
from ffrag_jax.errors import UserError
from ffrag_jax.evaluation import mmlu
from ffrag_jax.evaluation.rounds import (
    exact_match_summary,
    mean,
)
from ffrag_jax.federated import privacy, strategies
from ffrag_jax.federated.driver import RoundDriver
from ffrag_jax.federated.strategies import REGISTRY, Strategy
from ffrag_jax.jobs.base_model import (
    abstract_model,
    model_config,
    pretrain,
    run_tokenizer,
    tokenizer_path,
)
from ffrag_jax.jobs.lm_clients import LocalClients, client_data, new_adapter
from ffrag_jax.models import hf, lora
from ffrag_jax.models.llama import init_params
from ffrag_jax.models.lora import LoRA
from ffrag_jax.rag import prompts as rag_prompts
from ffrag_jax.training import sharding
from ffrag_jax.training.metrics import open_log, plot_client_rounds, read_jsonl
from ffrag_jax.training.trainer import StepInfo, profiling
from ffrag_jax.training.workdir import write_summary

# --------------------------------------------------------------------------------------------
# The job


def init_server(strategy: Strategy | str, params: dict, template: LoRA, num_clients: int,
                per_round: int, max_rank: int, rng: jax.Array) -> dict:
    """The round-0 server state (see :mod:`ffrag_jax.federated.strategies`); ``template`` is
    an adapter at the largest client rank ``max_rank``."""
    if isinstance(strategy, str):
        strategy = strategies.get(strategy)
    start = personal = None
    if strategy.personalised:
        keys = jax.random.split(rng, num_clients)
        personal = federated.stack_clients(
            [new_adapter(keys[k], params, template) for k in range(num_clients)])
    elif not strategy.fresh_adapters:  # one global adapter carried from round to round
        start = new_adapter(rng, params, template)
    return strategy.init_server(params, start=start, personal=personal, per_round=per_round)


def clients_per_round(fl: ConfigDict) -> int:
    """Clients a round: ``fl.fraction`` of them (a job without the setting, FF-RAG: all)."""
    return max(int(fl.get("fraction", 1.0) * fl.num_clients), 1)


def validate(config: ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Every check of the federated job that needs only the config and the mesh."""
    fl, d = config.fl, config.data
    strategy = strategies.from_config(fl)
    if fl.rounds <= 0:
        raise UserError(f"fl.rounds must be positive, got {fl.rounds}")
    if fl.num_clients < 1:
        raise UserError(f"fl.num_clients must be at least 1, got {fl.num_clients}")
    if not 0 < fl.fraction <= 1:
        raise UserError(f"fl.fraction must be in (0, 1], got {fl.fraction}")
    if fl.micro_batch_size < 1 or fl.batch_size % fl.micro_batch_size:
        raise UserError(f"fl.batch_size={fl.batch_size} is not a multiple of "
                        f"fl.micro_batch_size={fl.micro_batch_size}")
    if fl.lr <= 0:
        raise UserError(f"fl.lr must be positive, got {fl.lr}")
    adapters = LoRASection.read(config, "generator")
    ranks = adapters.client_ranks(fl.num_clients)
    strategy.check(ranks)
    check_engine(config)
    privacy.from_config(fl)  # a bad fl.dp before any work
    per_round = clients_per_round(fl)
    if per_round % mesh.shape["clients"]:
        raise UserError(f"{per_round} clients per round do not divide over the mesh's "
                        f"{mesh.shape['clients']} 'clients' devices")
    if d.source not in ("synthetic", "client_files", "file"):
        raise UserError(f"data.source={d.source!r}; choose synthetic, client_files or file")
    if d.source != "synthetic":
        if not d.path:
            raise UserError(f"data.source={d.source!r} needs data.path")
        if not Path(d.path).expanduser().exists():
            raise UserError(f"data.path={d.path} does not exist")
    if config.eval.mmlu_path and not Path(config.eval.mmlu_path).expanduser().is_file():
        raise UserError(f"MMLU file not found: {config.eval.mmlu_path} (eval.mmlu_path)")
    _, shapes = abstract_model(config)  # data.max_len is a cap: batches are trimmed
    template = jax.eval_shape(lambda p: adapters.init(jax.random.key(0), p, max(ranks)), shapes)
    strategy.check(ranks, template)


ENGINES = ("local", "flower")


def check_engine(config: ConfigDict) -> None:
    """``fl.engine``: local, or flower with Flower installed and a tokenizer that the server
    can have without the clients' data."""
    engine = config.fl.get("engine", "local")
    if engine not in ENGINES:
        raise UserError(f"fl.engine={engine!r}; choose one of {', '.join(ENGINES)}")
    flower = config.fl.get("flower", {})
    if flower.get("secagg", False):
        check_secagg(config, engine)
    if engine != "flower":
        return
    try:
        import flwr  # noqa: F401
    except ImportError as e:
        raise UserError("fl.engine=flower needs Flower: pip install -e \".[flower]\"") from e
    if (not config.model.path and not tokenizer_path(config)
            and config.data.get("source") != "synthetic"):
        raise UserError("fl.engine=flower: the server cannot train a tokenizer on the "
                        "clients' data; give model.path or tokenizer.path")
    if jax.process_count() > 1:
        raise UserError("fl.engine=flower runs the server in one process; drop "
                        "--num_processes (each Flower client may use its own devices)")


def check_secagg(config: ConfigDict, engine: str) -> None:
    """``fl.flower.secagg``: a UserError unless the run can aggregate securely (the Flower
    engine, a summable strategy, plain fp32 payloads, two clients a round at least)."""
    fl = config.fl
    strategy = strategies.from_config(fl)
    if engine != "flower":
        raise UserError("fl.flower.secagg=True needs fl.engine=flower (the local engine is one "
                        "party: there is nothing to hide from)")
    if not strategy.summable:
        summable = [n for n, c in REGISTRY.items() if c.summable]
        raise UserError(f"fl.flower.secagg=True: fl.strategy={fl.strategy!r} needs every "
                        "client's adapter, not their sum; summable strategies: "
                        + ", ".join(summable))
    if fl.payload != "fp32":
        raise UserError(f"fl.flower.secagg=True sends SecAgg+'s own 32-bit fixed point; "
                        f"fl.payload={fl.payload!r} must be fp32")
    if not 0 < fl.flower.secagg_clip < float("inf"):
        raise UserError(f"fl.flower.secagg_clip must be positive, got {fl.flower.secagg_clip}")
    if clients_per_round(fl) < 2:
        raise UserError("fl.flower.secagg=True: a secure sum needs at least 2 clients a round "
                        f"(fl.num_clients={fl.num_clients})")


def run(config: ConfigDict, workdir: Path, mesh: jax.sharding.Mesh, grid=None) -> dict:
    """Runs the federated job in ``workdir``; returns the summary it writes. ``grid``: the
    Flower grid when this process is the Flower engine's server (``fl.engine="flower"``
    without one starts Flower's simulation runtime, which calls back with its grid)."""
    if config.fl.get("engine", "local") == "flower" and grid is None:
        from ffrag_jax.federated.flower import apps, simulation

        grid = apps.current_grid()  # inside the ServerApp of `flwr run`
        if grid is None:
            return simulation.run(config, workdir, mesh)
    started = time.perf_counter()
    fl, d = config.fl, config.data
    strategy = strategies.from_config(fl)
    adapters = LoRASection.read(config, "generator")
    ranks = adapters.client_ranks(fl.num_clients)
    max_rank = max(ranks)
    metrics = open_log(workdir)

    names, records, is_synthetic = client_records(config)
    pairs = [pairs_of(recs, is_synthetic, d) for recs in records]
    pretraining = not config.model.path and config.pretrain.steps > 0
    base_examples = (synthetic.make_examples(config.pretrain.domain, config.pretrain.num_examples,
                                             config.seed, distractors=d.distractors)
                     if pretraining else [])
    tokenizer = run_tokenizer(config, workdir, itertools.chain(
        (p + r for prompts, responses in pairs for p, r in zip(prompts, responses, strict=True)),
        (rag_prompts.prompt(e) + rag_prompts.response(e) for e in base_examples)))
    cfg, params = model_config(config, tokenizer)
    rng = jax.random.key(config.seed)
    init_rng, server_rng, _ = jax.random.split(rng, 3)  # the third: lm_clients.round_inputs
    if params is None and pretraining:
        params = pretrain(config, cfg, tokenizer, base_examples, init_rng=init_rng,
                          rng=jax.random.fold_in(rng, 7), max_len=d.max_len,
                          mesh=mesh, ckpt_dir=workdir / "checkpoints", metrics=metrics)
    elif params is None:
        params = init_params(init_rng, cfg)
    params = sharding.shard(params, mesh)
    # Raises on bad targets/ranks before any work.
    template = adapters.init(server_rng, params, max_rank)
    strategy.check(ranks, template)

    if grid is None:
        clients = LocalClients(config, strategy, cfg, tokenizer,
                               client_data(config, pairs, names,
                                           encode_clients(config, tokenizer, pairs)),
                               params, template, ranks, mesh)
    else:  # the clients hold their data; the server sends them the base model once
        from ffrag_jax.federated.flower.server import FlowerClients

        del pairs, records
        clients = FlowerClients(grid, config, strategy, cfg, tokenizer, params, template, ranks,
                                workdir)
    names, counts = clients.names, clients.counts
    logging.info("%d clients, training examples per client %s", len(counts), counts)
    if not any(counts):
        raise UserError(f"no client has a training example (fl.num_clients={fl.num_clients}, "
                        f"data.held_out={d.held_out}); give the clients more data")
    for k in np.flatnonzero(np.asarray(counts) == 0):
        logging.warning("client %s has no training examples: it gets weight 0", names[k])
    per_round = clients_per_round(fl)
    dp = privacy.from_config(fl)
    mmlu_items = (mmlu.load(config.eval.mmlu_path, config.eval.mmlu_limit)
                  if config.eval.mmlu_path else None)  # a bad file stops the run here

    server = sharding.shard(init_server(strategy, params, template, fl.num_clients,
                                        per_round, max_rank, server_rng), mesh)
    state = {"server": server, "global_rank": jnp.zeros((), jnp.int32)}
    driver = RoundDriver(strategy, name="rounds", ckpt_dir=workdir / "checkpoints",
                         metrics=metrics, rounds=fl.rounds, client_sizes=counts,
                         fraction=fl.fraction, profile=profiling(config, workdir))
    trainer = driver.trainer
    start, state = driver.initial_state(state)
    if start == 0:  # the base model, before any round (round 0 of the curves)
        for rec in clients.evaluate(state["server"], 0, base=True):
            metrics.write(kind=rec.pop("kind"), round=0, **rec)

    clock = {"round_start": time.perf_counter()}

    def one_round(state, t: int, selected: list[int], weights: np.ndarray):
        """The selected clients' round (one jitted program, or Flower messages); their
        records."""
        clock["round_start"] = time.perf_counter()
        global_rank = int(state["global_rank"])
        fusion = strategy.training_fusion(has_global=global_rank > 0)
        trainer.within(f"{len(selected)} clients training", 0, 2)
        server, info = clients.round(state["server"], t, selected, weights, fusion)
        trainer.within("evaluating", 1, 2)
        accepted = [bool(a) for a in info["accepted"]]
        new_global_rank = sum(ranks[k] for k, ok in zip(selected, accepted, strict=True) if ok)
        state = {"server": server, "global_rank": jnp.asarray(
            new_global_rank if any(accepted) else global_rank, jnp.int32)}
        for i, k in enumerate(selected):
            active = info["active"][i].astype(bool)
            loss = float(np.mean(info["loss"][i][active])) if active.any() else float("nan")
            up, down = strategy.payload_bytes(template, ranks[k], global_rank)
            metrics.write(kind="client", round=t + 1, client=k, name=names[k],
                          steps=int(active.sum()), train_loss=loss, accepted=accepted[i],
                          upload_bytes=up if accepted[i] else 0, download_bytes=down,
                          **({"refused": info["refused"][k]} if k in info["refused"] else {}))
            if not accepted[i] and weights[i] > 0 and k not in info["refused"]:
                logging.warning("round %d: client %s sent a non-finite update; rejected",
                                t + 1, names[k])
        if dp is not None:
            metrics.write(kind="privacy", round=t + 1, **privacy_spent(t + 1))
        return state, {"selected": selected}

    def privacy_spent(rounds: int) -> dict:
        """The largest client epsilon after ``rounds`` rounds (clients count the rounds they
        took part in), with the mechanism's settings."""
        taken = [sum(k in driver.selection(t)[0] for t in range(rounds))
                 for k in range(fl.num_clients)]
        return privacy.spent(dp, taken, fl.dp.delta)

    def after_round(info: StepInfo) -> None:
        """Held-out loss (and exact match, MMLU) of the round's models; the round record."""
        server, t = info.state["server"], info.step - 1
        records = clients.evaluate(server, t + 1)
        for rec in records:
            metrics.write(kind=rec["kind"], round=t + 1,
                          **{k: v for k, v in rec.items() if k != "kind"})
        round_eval = [r for r in records if r["kind"] == "eval"]
        mean_global = mean([r["loss"] for r in round_eval if r["model"] == "global"])
        em = [r for r in records if r["kind"] == "exact_match"]
        if em:
            logging.info("round %d: mean exact match %s", t + 1, {
                m: round(mean([r["exact_match"] for r in em if r["model"] == m]), 3)
                for m in ("global", "fused") if any(r["model"] == m for r in em)})
        if mmlu_items and ((t + 1) % max(config.eval.mmlu_every, 1) == 0
                           or t + 1 == fl.rounds):
            global_params, global_adapter = strategy.global_model(server)
            result = mmlu.evaluate(global_params, cfg, tokenizer, mmlu_items,
                                   jax.random.fold_in(rng, 10**6 + t), lora=global_adapter,
                                   batch_size=config.eval.mmlu_batch_size,
                                   progress=sys.stderr.isatty())
            metrics.write(kind="mmlu", round=t + 1, model="global", **result)
            logging.info("round %d: MMLU macro accuracy (global model) %.4f over %d items",
                         t + 1, result["macro"], result["count"])
        seconds = time.perf_counter() - clock["round_start"]
        metrics.write(kind="round", round=t + 1, selected=info.out["selected"],
                      seconds=round(seconds, 2), mean_global_loss=mean_global)
        trainer.show(global_loss=mean_global)
        logging.info("round %d/%d: clients %s, mean held-out loss (global) %.4f, %.1f s",
                     t + 1, fl.rounds, info.out["selected"], mean_global, seconds)

    driver.add_hook(after_round)
    state = driver.run(state, one_round, start)

    server = state["server"]
    records = read_jsonl(metrics.path)
    final = [r for r in records if r.get("kind") == "eval" and r["round"] == fl.rounds]
    exported = (export(config, strategy, workdir, cfg, server, tokenizer, ranks)
                if config.export else {})
    plot_client_rounds(records, workdir / "rounds.png",
                       title=f"ffrag_jax federated ({fl.strategy}): held-out metrics per client")
    summary = {
        "strategy": fl.strategy,
        "rounds": fl.rounds,
        "clients": fl.num_clients,
        "final_held_out_loss": {r["name"] + " " + r["model"]: round(r["loss"], 4) for r in final},
        "mean_base_loss": mean([r["loss"] for r in records
                                 if r.get("kind") == "eval" and r["model"] == "base"]),
        "mean_global_loss": mean([r["loss"] for r in final if r["model"] == "global"]),
        "mmlu_macro": next((r["macro"] for r in reversed(records)
                            if r.get("kind") == "mmlu"), None),
        **exact_match_summary(records, fl.rounds),
        "upload_bytes_total": sum(r.get("upload_bytes", 0) for r in records
                                  if r.get("kind") == "client"),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "exported": exported,
    }
    if dp is not None:
        summary["dp"] = privacy_spent(fl.rounds)
    if any(r["model"] == "fused" for r in final):  # only FF-LoRA has personalised models
        summary["mean_fused_loss"] = mean([r["loss"] for r in final if r["model"] == "fused"])
    metrics.close()
    return write_summary(workdir, summary)


def export(config, strategy: Strategy, workdir: Path, cfg, server: dict, tokenizer,
           ranks: list[int]) -> dict:
    """The merged global model as an HF folder (for ``lm_eval`` and transformers) and, for
    personalised strategies, each client's personal adapter in PEFT format (at its own rank):
    on the merged global model (additive fusion), or on the base model exported beside it
    with the global adapter chained in (chain fusion)."""
    server = sharding.to_host(server)  # gathered from every process (a collective)
    params, adapter = strategy.global_model(server)
    merged = params if adapter is None else lora.merge(params, adapter)
    global_dir = hf.save_llama(workdir / "export" / "global_model", cfg, sharding.to_host(merged),
                               tokenizer=tokenizer, overwrite=True)
    out = {"global_model": str(global_dir)}
    if strategy.personalised:
        base_params, chain_global = strategy.personal_base(server)
        base_dir = global_dir
        if chain_global is not None:
            base_dir = hf.save_llama(workdir / "export" / "base_model", cfg,
                                     sharding.to_host(base_params), tokenizer=tokenizer,
                                     overwrite=True)
            out["base_model"] = str(base_dir)
        for k, rank in enumerate(ranks):
            personal = strategy.client_adapter(server, k, chain_global)
            lora.save_peft_adapter(workdir / "export" / "personal" / f"client_{k}",
                                   federated.unpad_rank(personal, rank), cfg,
                                   base_model_name_or_path=str(base_dir), overwrite=True)
        out["personal_adapters"] = str(workdir / "export" / "personal")
    return out
