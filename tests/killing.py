"""Test helpers for runs of the launcher in subprocesses: kill a job at random points and
resume it; compare runs without their clock fields."""

import random
import subprocess
import sys
import time
from pathlib import Path

# Fields that differ between two runs of the same computation (clocks, throughput).
VOLATILE = ("time", "tokens_per_s", "steps_per_s", "seconds", "wall_time_s",
            "rerank_ms_per_question")


def comparable(value, workdir=None):
    """``value`` (a summary or a list of metrics records) without its clock fields, with the
    run's own path written as ``<workdir>``."""
    if isinstance(value, dict):
        return {k: comparable(v, workdir) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [comparable(v, workdir) for v in value]
    if isinstance(value, str) and workdir is not None:
        return value.replace(str(workdir), "<workdir>")
    return value


def _metrics_lines(path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_and_resume(args: list[str], workdir, *, total_records: int, seed: int,
                    points: int = 5, deadline_s: float = 600.0) -> list[str]:
    """Runs ``python -m ffrag_jax.launch ARGS`` and SIGKILLs it at ``points`` moments chosen
    by ``seed``: once ``metrics.jsonl`` holds a random number of lines (0 to
    ``total_records - 1``; 0 means during start-up), plus a random delay of up to 0.3 s. After
    each kill the same command is run again; the last run goes to the end. Returns what
    happened at each point (for assertion messages). Bounded: every process is killed by
    ``deadline_s``."""
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(total_records), points))
    metrics = Path(workdir) / "metrics.jsonl"
    command = [sys.executable, "-m", "ffrag_jax.launch", *args]
    stop_at = time.monotonic() + deadline_s
    log = []
    for target in targets:
        if (Path(workdir) / "summary.json").exists():
            log.append(f"finished before the kill at {target} records")
            break
        # stderr to a file: a pipe nobody reads fills up and stalls the run.
        err_path = Path(workdir).parent / f"{Path(workdir).name}.stderr"
        err_file = err_path.open("w")
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err_file)
        try:
            started = time.monotonic()
            wait = rng.uniform(0.5, 4.0) if target == 0 else None
            while proc.poll() is None and time.monotonic() < stop_at:
                if wait is not None and time.monotonic() - started >= wait:
                    break
                if wait is None and _metrics_lines(metrics) >= target:
                    time.sleep(rng.uniform(0.0, 0.3))
                    break
                time.sleep(0.02)
            lines = _metrics_lines(metrics)
            proc.kill()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            err_file.close()
        if proc.returncode not in (0, -9):
            raise AssertionError(f"run failed (status {proc.returncode}) before its kill at "
                                 f"{target} records: {err_path.read_text()[-3000:]}")
        log.append(f"killed at {lines} lines (target {target})" if proc.returncode == -9
                   else f"finished (target {target})")
    remaining = max(stop_at - time.monotonic(), 30)
    final = subprocess.run(command, capture_output=True, text=True, timeout=remaining)
    if final.returncode != 0 and not (
            "already holds a finished run" in final.stderr
            and (Path(workdir) / "summary.json").exists()):
        raise AssertionError(f"the resumed run failed after {log}: {final.stderr[-3000:]}")
    return log


def assert_strict_json_everywhere(workdir) -> int:
    """Parses every ``.json`` file and every ``metrics.jsonl`` line under ``workdir`` as strict
    JSON (a bare NaN or Infinity is an error); returns how many documents it read."""
    import json

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    count = 0
    for path in sorted(Path(workdir).rglob("*.json")):
        json.loads(path.read_text(), parse_constant=refuse)
        count += 1
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)
        count += 1
    return count
