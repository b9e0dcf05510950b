"""Writes the config of a Flower deployment run: the launcher's flags in, one JSON file out
(``WORKDIR.flower.json`` beside the run folder, for ``flwr run --run-config
"config-file=..."``).

    python -m ffrag_jax.federated.flower.configure --config heter --workdir runs/fed \\
        --config.fl.num_clients=3

The config is checked whole first (as the launcher does), with ``fl.engine=flower``; nothing
is written for a bad one. ``launch/flower_local.sh`` calls it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app

from ffrag_jax.cli import launch
from ffrag_jax.errors import UserError


def config_file(workdir: str | Path) -> Path:
    """Where the config of the run in ``workdir`` is written (beside it: the workdir holds
    only what the run writes)."""
    workdir = Path(workdir).expanduser()
    return workdir.parent / f"{workdir.name}.flower.json"


def _is_ours(path: Path) -> bool:
    """A file this command wrote: a JSON config with a task (replaced by a new one)."""
    import json

    try:
        return "task" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def main(argv: list[str]) -> None:
    from ffrag_jax import files
    from ffrag_jax.federated.flower import records
    from ffrag_jax.training.run import validate

    if len(argv) > 1:
        launch._fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = launch._CONFIG.value
    with config.unlocked():
        config.fl.engine = "flower"
    if config.task not in ("federated", "ffrag"):
        launch._fail(f"the Flower deployment runs the federated jobs (tasks federated and "
                     f"ffrag); this config's task is {config.task!r}")
    try:
        validate(config)
    except UserError as e:
        launch._fail(str(e))
    path = config_file(launch._WORKDIR.value)
    if path.exists() and not _is_ours(path):
        launch._fail(f"{path} exists and is not a config this command wrote; move it away")
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(path, records.config_to_json(config))
    print(path)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=launch.parse_flags))
