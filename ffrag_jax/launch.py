"""``python -m ffrag_jax.launch``: the launcher in :mod:`ffrag_jax.cli.launch` (kept here so
that the documented command stays short)."""

from ffrag_jax.cli.launch import cli, config_names, config_path, load_config, main  # noqa: F401

if __name__ == "__main__":
    cli()
