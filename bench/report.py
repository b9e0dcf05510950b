"""Writes a benchmark's results: ``bench/results/<name>.json`` (everything) and ``<name>.md``
(the table lines given, then the command that produced them), and prints the table."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count()}


def command() -> str:
    return " ".join(["python"] + sys.argv)


def save(name: str, result: dict, lines: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [*lines, "", f"Command: `{result.get('command', command())}` "
             f"({os.cpu_count()} CPU cores)"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
