"""``python -m ffrag_jax.launch``: the launcher in :mod:`ffrag_jax.cli.launch` (kept here so
that the documented command stays short)."""

from ffrag_jax.cli import launch as _launch
from ffrag_jax.cli.launch import cli, config_names, config_path, load_config, main  # noqa: F401

if __name__ == "__main__":
    # --help shows the launcher's own text and flags (absl describes the __main__ module).
    import sys

    from absl import flags

    sys.modules["__main__"].__doc__ = _launch.__doc__
    flags.adopt_module_key_flags(_launch)
    cli()
