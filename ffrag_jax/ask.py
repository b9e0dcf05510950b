"""``python -m ffrag_jax.ask``: the command line in :mod:`ffrag_jax.cli.ask`."""

import sys

from ffrag_jax.cli.ask import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
