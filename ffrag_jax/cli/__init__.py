"""The command lines: ``python -m ffrag_jax.launch`` (run a job), ``python -m ffrag_jax.ask``
(question an exported system), ``python -m ffrag_jax.kb`` (build and search knowledge
bases)."""
