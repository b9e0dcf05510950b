"""The README's first command: federated FF-RAG on synthetic knowledge, on a 2-core CPU with
no network and no files beyond the package (``configs/ffrag.py``, whose docstring says what
it runs; override anything with ``--config.<key>=<value>``).

    python -m ffrag_jax.launch --config demo
"""

from ml_collections import ConfigDict

from ffrag_jax.configs import ffrag


def get_config() -> ConfigDict:
    return ffrag.get_config()
