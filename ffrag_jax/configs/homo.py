"""Federated LoRA, homogeneous ranks: the FLoRA / FF-RAG reference setting.

10 clients, every client rank 16 with alpha 32, targets q_proj/v_proj, dropout 0.05, AdamW
lr 3e-4 without warmup and a linear decay to 0 over each client's own steps, grad clip 1.0,
effective batch 128 from micro-batches of 16, cutoff 512 tokens, Alpaca prompts, FLoRA
stacking (``fl.strategy``: stack, fedavg, zeropad, ff, or a server optimiser or robust rule;
see ``ffrag_jax.federated.strategies``).

Real runs name a local HF Llama folder and the reference data layout:

    python -m ffrag_jax.launch --config homo --workdir runs/homo \\
        --config.model.path=/models/llama-7b --config.model.pad_to_eos=True \\
        --config.data.source=client_files --config.data.path=data/dolly

Without overrides it runs on the built-in synthetic clients with a tiny random Llama (a smoke
test of the whole loop on a CPU, not a meaningful experiment).
"""

from ml_collections import ConfigDict, config_dict

from ffrag_jax.config_types import lora_section
from ffrag_jax.configs import _common


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "federated"
    c.seed = 42
    c.export = True
    c.mesh = ConfigDict(dict(clients=1, data=-1, fsdp=1, tensor=1))
    c.log_every = 25  # pretraining phase only
    c.checkpoint_every = 100
    # "(first, last)": a jax.profiler trace of those steps (rounds) of the main loop, to
    # workdir/profile (open it in TensorBoard or Perfetto); None: no trace.
    c.profile_steps = config_dict.placeholder(tuple)
    # JAX's persistent compilation cache: "auto" (on for GPU/TPU, in ~/.cache/ffrag_jax/xla
    # or $FFRAG_COMPILATION_CACHE), "off", or a folder.
    c.compilation_cache = "auto"
    c.model = _common.tiny_llama()  # a tiny Llama unless model.path is given
    c.model.remat = "dots_attn"
    c.pretrain = _common.pretrain(steps=0)  # >0: pretrain the tiny model first (the demo)
    c.tokenizer = ConfigDict(dict(vocab_size=1536))  # only for the tiny model's own BPE
    c.data = ConfigDict(dict(
        # synthetic: built-in domains per client; client_files: data.path/<N>/
        # local_training_<k>.json (the reference layout); file: one .json/.jsonl/.csv/.parquet
        # or datasets folder split across clients by data.split.
        source="synthetic",
        path=config_dict.placeholder(str),
        split="iid",  # iid | dirichlet (by data.field) | field (one client per value)
        field="category",
        dirichlet_alpha=0.5,
        prompt_field=config_dict.placeholder(str),  # None: Alpaca instruction/input/output
        response_field=config_dict.placeholder(str),
        synthetic_domains="clinic,geography",
        examples_per_client=64,
        client_sizes=config_dict.placeholder(tuple),  # per-client counts; overrides the above
        distractors=0,
        held_out=0.1,  # fraction of each client's examples kept for evaluation
        max_len=512,  # cutoff; batches are trimmed to the longest example
        response_only=True,  # loss on the response only (train_on_inputs=False)
    ))
    c.fl = ConfigDict(dict(
        num_clients=10,
        fraction=1.0,  # clients per round: max(int(fraction * N), 1)
        rounds=3,
        # stack (FLoRA) | fedavg (FedIT) | zeropad (HetLoRA-style) | ff (FF-LoRA) | fedavgm |
        # fedadam | fedyogi (server optimisers) | median | trimmed_mean (robust) | fedprox |
        # ffa (FFA-LoRA: a frozen) | fedsa (FedSA-LoRA: a shared, b personal)
        strategy="stack",
        fusion="add",  # ff only: add (W + G + P_k) | chain (reference's literal variant)
        settings=_common.strategy_settings(),  # lr, momentum, b1, b2, tau, trim, mu
        # How adapters travel, both ways: fp32 | fp16 | bf16 | int8 (blockwise absmax, one
        # float32 scale per payload_block values); the run computes with what is received.
        payload="fp32",
        payload_block=64,
        # local: every client in this process, a round one jitted program; flower: every
        # client a Flower node that holds its own data (the simulation runtime from the
        # launcher; launch/flower_local.sh for SuperLink and SuperNodes on real processes).
        engine="local",
        dp=_common.dp(),  # client-level differential privacy (clip=0: off)
        flower=_common.flower(),
        local_epochs=1.0,
        batch_size=128,  # effective batch per optimizer step
        micro_batch_size=16,
        lr=3e-4,
        weight_decay=0.0,
        max_grad_norm=1.0,
    ))
    # The clients' adapters: rank 16 (lora.generator.ranks: one per client, "(8, 4)"),
    # alpha = alpha_ratio * rank, so every client's scale is 2.
    c.lora = ConfigDict(dict(generator=lora_section("q_proj,v_proj", 16, dropout=0.05)))
    c.eval = ConfigDict(dict(
        batch_size=32,  # held-out loss batches
        # Exact match of generated answers on each client's held-out split (base model before
        # round 1, then global and fused models per round): generation, so slower than loss.
        exact_match=False,
        max_new_tokens=8,
        generate_batch_size=50,
        # The reference's MMLU harness on the global model (ffrag_jax.evaluation.mmlu),
        # optional: the
        # mmlu_test_1444 file (not shipped), items per subject (None: all), every n rounds
        # (the last round always).
        mmlu_path=config_dict.placeholder(str),
        mmlu_limit=config_dict.placeholder(int),
        mmlu_every=1,
        mmlu_batch_size=16,
    ))
    return c
