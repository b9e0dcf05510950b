"""ffrag_jax: federated, personalised fine-tuning of retrieval-augmented LLMs in JAX/Flax.

The research API is a set of pure functions over pytrees:

* :mod:`ffrag_jax.models.llama`: ``LlamaConfig``, ``init_params``, ``forward``.
* :mod:`ffrag_jax.models.lora`: ``init``, ``merge``, ``load_peft_adapter``, ``save_peft_adapter``.
* :mod:`ffrag_jax.models.hf`: ``load_llama``, ``save_llama``, ``load_tokenizer``.
* :mod:`ffrag_jax.training.train`: ``causal_lm_loss``, ``make_optimizer``, ``init_train_state``,
  ``train_step``.
"""

__version__ = "0.1.0"
