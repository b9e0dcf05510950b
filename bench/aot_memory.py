"""Per-device memory of the 7B/8B steps on sharded meshes, proven without the hardware.

The heter round step (``federated.round_step.run_round``: K clients' LoRA training vmapped,
FLoRA stacking) and the FF-RAG step (``rag.update``: generator LoRA + query-encoder LoRA) are
AOT-compiled (``jax.jit(...).lower(...).compile()``) on ``jax.ShapeDtypeStruct`` inputs that
carry the project's shardings (``training.sharding``: parameters over ``fsdp``/``tensor``, LoRA
and optimizer state with them, batches over ``data``/``fsdp``, the vmapped clients over
``clients``), for Llama-2-7B and Llama-3-8B shapes in bfloat16 on meshes of 8, 16 and 64 fake
CPU devices. No weights exist; ``compiled.memory_analysis()`` gives each device's arguments,
outputs and temporaries, and the table says which mesh fits 16 GB (v5e), 32 GB (v4), 80 GB
(H100) and 141 GB (H200) per device, at which micro-batch.

    python bench/aot_memory.py                       # the full table (about 15 min on 2 cores)
    python bench/aot_memory.py --models 7b --devices 8 --micro 1

It sets ``--xla_force_host_platform_device_count`` itself (64). XLA's CPU compiler assigns
buffers as the GPU/TPU compilers do in kind (the same partitioned program, the same live
ranges), not to the byte: read the numbers as the size of the program, with a margin.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=64").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import report  # noqa: E402  (bench/report.py)

MODELS = {  # the published shapes (config.json of each)
    "7b": dict(name="Llama-2-7B", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_layers=32, num_heads=32, num_kv_heads=32, rope_theta=10000.0),
    "8b": dict(name="Llama-3-8B", vocab_size=128256, hidden_size=4096,
               intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
               rope_theta=500000.0),
}
# (clients, data, fsdp, tensor) per device count: pure FSDP, clients split in two, and FSDP
# with 2- or 4-way tensor parallelism.
MESHES = {
    8: [(1, 1, 8, 1), (2, 1, 4, 1), (1, 1, 4, 2)],
    16: [(1, 1, 16, 1), (2, 1, 8, 1), (1, 1, 8, 2)],
    64: [(1, 1, 64, 1), (2, 1, 32, 1), (1, 1, 16, 4)],
}
ACCELERATORS = (("TPU v5e", 16), ("TPU v4", 32), ("H100", 80), ("H200", 141))
GB = 1e9


def llama_config(model: str, seq: int, remat: str):
    from ffrag_jax.models.llama import LlamaConfig

    shape = {k: v for k, v in MODELS[model].items() if k != "name"}
    return LlamaConfig(**shape, max_position_embeddings=max(seq, 4096), dtype="bfloat16",
                       param_dtype="bfloat16", remat=remat, attention="xla")


def abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return {"args_gb": m.argument_size_in_bytes / GB, "temp_gb": m.temp_size_in_bytes / GB,
            "out_gb": m.output_size_in_bytes / GB, "total_gb": total / GB}


def round_step(model, mesh_shape, micro, args) -> dict:
    """The heter round: K clients (ranks of the heter config), one local step each."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from ffrag_jax.cli.launch import load_config
    from ffrag_jax.config_types import LoRASection
    from ffrag_jax.federated import round_step as rs
    from ffrag_jax.federated import strategies
    from ffrag_jax.jobs.federated import init_server
    from ffrag_jax.models.llama import init_params
    from ffrag_jax.training import sharding, train

    cfg = llama_config(model, args.seq, args.remat)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape, strict=True)))
    config = load_config("heter")
    section = LoRASection.read(config, "generator")
    ranks = section.client_ranks(config.fl.num_clients)
    k = args.clients_per_round
    strategy = strategies.get("stack")
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    template = jax.eval_shape(lambda p: section.init(jax.random.key(1), p, max(ranks)), params)
    server = jax.eval_shape(lambda p, t: init_server(strategy, p, t, len(ranks), k, max(ranks),
                                                     jax.random.key(2)), params, template)
    server = abstract(server, sharding.tree_shardings(server, mesh))
    by_client = NamedSharding(mesh, PartitionSpec("clients"))
    # Clients over `clients`, each client's micro-batch over the data-parallel axes.
    batch_spec = NamedSharding(mesh, PartitionSpec("clients", None, None, sharding.BATCH_AXES))
    per_device = micro * mesh.shape["data"] * mesh.shape["fsdp"]  # each client's batch
    tokens = jax.ShapeDtypeStruct((k, 1, 1, per_device, args.seq), jnp.int32,
                                  sharding=batch_spec)
    batches = {"input_ids": tokens, "attention_mask": tokens, "loss_mask": tokens}

    def per_client(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=by_client)

    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), k))
    fresh = None
    if strategy.fresh_adapters:  # K new adapters [K, ...]: clients, then the weights' rules
        from ffrag_jax import federated

        fresh = jax.eval_shape(lambda t: federated.stack_clients([t] * k), template)
        fresh = jax.tree_util.tree_map_with_path(
            lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
                mesh, PartitionSpec("clients", *sharding.spec_for(
                    sharding.path_str(path), x.shape[1:], mesh)))), fresh)
    inputs = (fresh, per_client((k,), jnp.int32), per_client((k,), jnp.float32),
              per_client((k, max(ranks)), jnp.float32), batches,
              per_client(keys.shape, keys.dtype), per_client((k,), jnp.int32))
    fn = jax.jit(functools.partial(
        rs.run_round, cfg=cfg, strategy=strategy,
        optimizer=lambda n: train.make_optimizer(1e-4, n, max_grad_norm=1.0)),
        out_shardings=(sharding.tree_shardings(server, mesh), None, None))
    with jax.set_mesh(mesh):  # as the job runs it: activation hints on
        return fn.lower(server, *inputs).compile()


def rag_step(model, mesh_shape, micro, args):
    """One FF-RAG step: 4 retrieved passages per question, generator and encoder LoRAs."""
    import jax
    import jax.numpy as jnp

    from ffrag_jax import rag
    from ffrag_jax.models import lora
    from ffrag_jax.models.llama import init_params
    from ffrag_jax.retrieval.encoder import TextEncoder
    from ffrag_jax.training import sharding, train

    cfg = llama_config(model, args.seq, args.remat)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape, strict=True)))
    enc = TextEncoder.load()
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    opt_g, opt_r = train.make_optimizer(1e-4, 100), train.make_optimizer(1e-5, 100)
    states = jax.eval_shape(lambda p: {
        "generator": train.init_train_state(
            lora.init(jax.random.key(1), p, ["q_proj", "v_proj"], 16, 32.0), opt_g),
        "retriever": train.init_train_state(
            lora.init(jax.random.key(2), enc.params, ["query", "value"], 8, 16.0), opt_r)},
        params)
    frozen = {"generator": params, "retriever": jax.eval_shape(lambda: enc.params)}
    states = abstract(states, sharding.tree_shardings(states, mesh))
    frozen = abstract(frozen, sharding.tree_shardings(frozen, mesh))
    passages, answer = 4, 64
    prompt = args.seq - answer
    micro = micro * mesh.shape["data"] * mesh.shape["fsdp"]  # micro is per device

    def batch(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=sharding.batch_sharding(mesh, len(shape)))

    data = {"gen_ids": batch((micro, passages, prompt + answer), jnp.int32),
            "gen_mask": batch((micro, passages, prompt + answer), jnp.int32),
            "targets": batch((micro, answer), jnp.int32),
            "answer_mask": batch((micro, answer), jnp.int32),
            "query_ids": batch((micro, 32), jnp.int32),
            "query_mask": batch((micro, 32), jnp.int32),
            "passage_emb": batch((micro, passages, enc.cfg.hidden_size), jnp.float32)}
    loss_cfg = rag.RagLossConfig(weights=(("rag_sequence", 1.0), ("lsr", 0.5)))
    fn = jax.jit(rag.update, static_argnames=("gen_cfg", "enc_cfg", "loss_cfg", "optimizers"),
                 out_shardings=(sharding.tree_shardings(states, mesh), None))
    with jax.set_mesh(mesh):
        return fn.lower(states, frozen, data, jax.eval_shape(lambda: jax.random.key(0)),
                        gen_cfg=cfg, enc_cfg=enc.cfg, loss_cfg=loss_cfg,
                        optimizers=(opt_g, opt_r)).compile()


STEPS = {"heter_round": round_step, "ffrag_step": rag_step}


def fits(total_gb: float) -> str:
    return ", ".join(name for name, size in ACCELERATORS if total_gb <= 0.9 * size) or "none"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--devices", nargs="+", type=int, default=list(MESHES),
                   choices=list(MESHES))
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    p.add_argument("--micro", nargs="+", type=int, default=[1, 4],
                   help="micro-batch per device (a client's batch is micro x data x fsdp)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--clients_per_round", type=int, default=8)
    p.add_argument("--remat", default="full", help="the model's remat policy")
    p.add_argument("--name", default="aot_memory")
    args = p.parse_args(argv)
    rows = []
    for step in args.steps:
        for model in args.models:
            for n in args.devices:
                for mesh_shape in MESHES[n]:
                    if step == "ffrag_step" and mesh_shape[0] > 1:
                        continue  # one client's step: no clients axis
                    for micro in args.micro:
                        t0 = time.perf_counter()
                        try:
                            mem = memory(STEPS[step](model, mesh_shape, micro, args))
                        except Exception as e:  # a mesh that cannot host the step: say why
                            mem = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
                        row = {"step": step, "model": MODELS[model]["name"], "devices": n,
                               "mesh": "x".join(map(str, mesh_shape)), "micro": micro, **mem,
                               "compile_s": round(time.perf_counter() - t0, 1)}
                        rows.append(row)
                        print(row, file=sys.stderr, flush=True)
    lines = [
        f"Per-device memory (GB) of AOT-compiled steps, bfloat16, seq {args.seq}, remat "
        f"{args.remat!r}; the round has {args.clients_per_round} clients (heter ranks, "
        "max 64) and one local step; the FF-RAG step 4 passages per question. Micro-batch is "
        "per device (a client's batch = micro x data x fsdp). Mesh = "
        "clients x data x fsdp x tensor. 'fits' = total <= 90% of the device's memory.",
        "", "| step | model | devices | mesh | micro-batch | args | temp | total | fits |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['step']} | {r['model']} | {r['devices']} | {r['mesh']} | "
                         f"{r['micro']} | - | - | - | {r['error']} |")
        else:
            lines.append(f"| {r['step']} | {r['model']} | {r['devices']} | {r['mesh']} | "
                         f"{r['micro']} | {r['args_gb']:.2f} | {r['temp_gb']:.2f} | "
                         f"{r['total_gb']:.2f} | {fits(r['total_gb'])} |")
    report.save(args.name, {"args": vars(args), "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
