"""One LoRA on one domain (the centralised counterpart of the federated demo): a tiny Llama
pretrained on synthetic 'geography' reading comprehension, then a LoRA adapting it to the
'clinic' domain. About 4 minutes on a 2-core CPU, no network.

Point it at a real local checkpoint with --config.model.path=/path/to/hf-llama (pretraining is
then skipped and the checkpoint's tokenizer is used).
"""

from ml_collections import ConfigDict, config_dict

from ffrag_jax.config_types import lora_section
from ffrag_jax.configs import _common


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "lora"
    c.seed = 0
    c.log_every = 25
    c.checkpoint_every = 100
    # "(first, last)": a jax.profiler trace of those steps (rounds) of the main loop, to
    # workdir/profile (open it in TensorBoard or Perfetto); None: no trace.
    c.profile_steps = config_dict.placeholder(tuple)
    # JAX's persistent compilation cache: "auto" (on for GPU/TPU, in ~/.cache/ffrag_jax/xla
    # or $FFRAG_COMPILATION_CACHE), "off", or a folder.
    c.compilation_cache = "auto"
    c.export = True
    # Mesh axis sizes; -1 takes the remaining devices. One CPU: every axis is 1.
    c.mesh = ConfigDict(dict(clients=1, data=-1, fsdp=1, tensor=1))

    c.data = ConfigDict(dict(
        task_domain="clinic",
        num_task_train=2000,
        num_eval=200,
        distractors=0,  # fact sentences besides the answer's (harder: needs more steps)
        max_len=56,  # tokens per example (prompt + answer), fixed so steps compile once
    ))
    c.tokenizer = ConfigDict(dict(vocab_size=1536))
    c.model = _common.tiny_llama()
    c.pretrain = _common.pretrain(800)
    c.lora = ConfigDict(dict(generator=lora_section("all-linear", 8, dropout=0.05)))
    c.train = ConfigDict(dict(  # the adapter's training (the "lora" phase)
        steps=300, batch_size=32, grad_accum=1, lr=3e-3, warmup_steps=10, weight_decay=0.0,
        max_grad_norm=1.0, response_only=True, seed=1,
    ))
    c.eval = ConfigDict(dict(max_new_tokens=8, batch_size=50))
    return c
