"""Named experiment configs: `--config NAME` loads NAME.py and calls its get_config()."""
