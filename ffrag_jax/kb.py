"""``python -m ffrag_jax.kb``: the knowledge-base command line in :mod:`ffrag_jax.cli.kb`."""

import sys

from ffrag_jax.cli.kb import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
