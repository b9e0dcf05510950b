"""One module per task; the file name is ``config.task`` (``lora``, ``federated``,
``retriever``, ``rag``, ``ffrag``). Each has ``validate(config, mesh)`` and
``run(config, workdir, mesh)``, composing the library's pieces on the one trainer."""
