"""The embedded default: tiny Llama pretrained on synthetic 'geography' reading comprehension,
then a LoRA adapting it to a 'clinic' domain. Runs on a 2-core CPU in a few minutes, no network.

Point it at a real local checkpoint with --config.model.path=/path/to/hf-llama (pretraining is
then skipped and the checkpoint's tokenizer is used).
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "demo"
    c.seed = 0
    c.log_every = 25
    c.checkpoint_every = 100
    c.export = True
    # Mesh axis sizes; -1 takes the remaining devices. One CPU: every axis is 1.
    c.mesh = ConfigDict(dict(clients=1, data=-1, fsdp=1, tensor=1))

    c.data = ConfigDict(dict(
        base_domain="geography",
        task_domain="clinic",
        num_base_train=4000,
        num_task_train=2000,
        num_eval=200,
        distractors=0,  # fact sentences besides the answer's (harder: needs more steps)
        max_len=56,  # tokens per example (prompt + answer), fixed so steps compile once
    ))
    c.tokenizer = ConfigDict(dict(vocab_size=1536))
    c.model = ConfigDict(dict(
        path=config_dict.placeholder(str),  # a local HF Llama folder; None: train a tiny one
        pad_to_eos=False,  # for tokenizers without a pad token (most Llama tokenizers)
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        dtype="float32",
        param_dtype="float32",
        remat="none",  # "dots", "dots_attn" or "full" trade compute for activation memory
        attention="auto",  # "ffrag" (custom-VJP, CPU default), "xla" (GPU default: cuDNN)
    ))
    c.pretrain = ConfigDict(dict(
        steps=800, batch_size=32, grad_accum=1, lr=3e-3, warmup_steps=30, weight_decay=0.01,
        max_grad_norm=1.0, response_only=False, seed=0,
    ))
    c.lora = ConfigDict(dict(
        targets="all-linear", rank=8, alpha=16.0, dropout=0.05,
        steps=300, batch_size=32, grad_accum=1, lr=3e-3, warmup_steps=10, weight_decay=0.0,
        max_grad_norm=1.0, response_only=True, seed=1,
    ))
    c.eval = ConfigDict(dict(max_new_tokens=8, batch_size=50))
    return c
