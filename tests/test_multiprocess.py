"""Multi-process runs: 2 processes x 4 fake CPU devices on 127.0.0.1 against 1 process x 8.

Every launch goes through :mod:`ffrag_jax.cli.local_cluster`, which stops all processes when
one fails or the time runs out (a broken collective never hangs the suite). The one-process
reference runs in this test process, which has 8 fake devices (conftest).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from killing import comparable

from ffrag_jax.cli import local_cluster
from ffrag_jax.errors import UserError
from ffrag_jax.launch import load_config
from ffrag_jax.training import distributed
from ffrag_jax.training import workdir as workdir_lib
from ffrag_jax.training.metrics import read_jsonl
from ffrag_jax.training.run import run

TINY_MODEL = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2,
              "tokenizer.vocab_size": 400}
# Both spread the vmapped clients over the processes: mesh clients=2 x data=4.
HETER = {"fl.num_clients": 4, "lora.generator.ranks": (4, 2, 2, 1), "fl.rounds": 2,
         "fl.batch_size": 8, "fl.micro_batch_size": 4, "fl.lr": 3e-3,
         "data.examples_per_client": 20, "data.held_out": 0.2, "eval.batch_size": 8,
         "mesh.clients": 2, "mesh.data": -1, **TINY_MODEL}
# No pretraining (a random tiny model): the rounds are what is distributed.
DEMO = {"pretrain.steps": 0,
        "data.domains": "clinic,legal", "data.private_entities": 4, "data.shared_entities": 1,
        "fl.num_clients": 2, "lora.generator.ranks": (4, 2), "fl.rounds": 2,
        "fl.local_steps": 2, "fl.batch_size": 4, "lora.retriever.rank": 2,
        "rag.k_private": 2, "rag.k_shared": 8, "log_every": 1,
        # A trained tokenizer; the string is what --config.tokenizer.path=None gives.
        "tokenizer.path": "None",
        "eval.batch_size": 8, "fl.vmap_clients": True, "mesh.clients": 2, "mesh.data": -1,
        **TINY_MODEL}
CASES = {"heter": ("heter", HETER, "rounds"), "demo": ("demo", DEMO, "ffrag")}
TIMEOUT = 300


def flag(key, value):
    value = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return f"--config.{key}={value}"


def launch_args(case, workdir):
    name, overrides, _ = CASES[case]
    return ["--config", name, "--workdir", str(workdir),
            *(flag(k, v) for k, v in overrides.items())]


def two_processes(args, tmp_path, **kwargs):
    logs = tmp_path / f"logs{len(list(tmp_path.glob('logs*')))}"
    return local_cluster.run(args, processes=2, cpu_devices=4, timeout_s=TIMEOUT, logs=logs,
                             **kwargs)


def why(results):
    return "\n".join(f"--- process {i} (exit {r.returncode}):\n{r.stderr[-3000:]}"
                     for i, r in enumerate(results))


def assert_close(a, b, where="summary"):
    """Equal structure; floats within 1e-5 (relative and absolute)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(a), b)
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) and
                                                                  math.isnan(b)):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), (where, a, b)
    else:
        assert a == b, (where, a, b)


_REFERENCES = {}


def one_process(case, tmp_path_factory):
    """The reference run of ``case``: 1 process x 8 devices, same config and mesh (run once
    per test worker)."""
    if case not in _REFERENCES:
        name, overrides, _ = CASES[case]
        workdir = tmp_path_factory.mktemp("one") / case
        _REFERENCES[case] = (workdir, run(load_config(name, overrides), workdir))
    return _REFERENCES[case]


def outputs(workdir: Path) -> dict:
    """Size of every file of a run, but its lock file: each run that takes the lock writes its
    PID there (as in test_workdir's hashes)."""
    return {str(p.relative_to(workdir)): p.stat().st_size
            for p in sorted(workdir.rglob("*")) if p.is_file() and p.name != workdir_lib.LOCK}


@pytest.mark.long
@pytest.mark.eight_devices
@pytest.mark.parametrize("case", ["demo", "heter"])
def test_two_processes_killed_mid_run_resume_to_the_one_process_result(case, tmp_path,
                                                                        tmp_path_factory):
    ref_dir, ref_summary = one_process(case, tmp_path_factory)
    workdir = tmp_path / "run"
    phase = CASES[case][2]
    first_round = workdir / "checkpoints" / phase / "1"
    # Both processes are killed (SIGKILL) once round 1's checkpoint is in place.
    killed = two_processes(launch_args(case, workdir), tmp_path,
                           kill_when=lambda: first_round.is_dir())
    assert all(r.returncode == -9 for r in killed), why(killed)
    assert not (workdir / "summary.json").exists(), "the run ended before the kill"

    # One process may not resume what two wrote: one line, nothing touched.
    before = outputs(workdir)
    with pytest.raises(UserError, match="written by 2 process"):
        run(load_config(CASES[case][0], CASES[case][1]), workdir)
    assert outputs(workdir) == before

    resumed = two_processes(launch_args(case, workdir), tmp_path)
    assert [r.returncode for r in resumed] == [0, 0], why(resumed)
    summary = comparable(read_summary(workdir), workdir)
    assert_close(comparable(ref_summary, ref_dir), summary)
    # Process 0 wrote the curves: the same records as the one-process run.
    assert_close(comparable(read_jsonl(ref_dir / "metrics.jsonl"), ref_dir),
                 comparable(read_jsonl(workdir / "metrics.jsonl"), workdir), "metrics")
    assert (workdir / "export").is_dir()
    # Only process 0 reports (its stdout shares its log).
    assert "done:" in resumed[0].stderr and "done:" not in resumed[1].stderr
    for process in (0, 1):  # process 1's scratch copy is gone, the killed run's too
        assert not distributed.scratch_folder(workdir, process).exists()


def read_summary(workdir):
    return json.loads((workdir / "summary.json").read_text())


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


free_port = local_cluster.free_port


def launch_alone(args, timeout=120):
    """One process of a would-be multi-process run (4 fake CPU devices), bounded in time."""
    return subprocess.run([sys.executable, "-m", "ffrag_jax.launch", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=local_cluster.child_env(4))


@pytest.mark.parametrize("process_id,reason", [
    (1, "the coordinator was not reachable"),
    (0, "not every process joined"),
])
def test_a_run_whose_processes_never_meet_is_one_line_and_writes_nothing(process_id, reason,
                                                                         tmp_path):
    workdir = tmp_path / "run"
    result = launch_alone([*launch_args("heter", workdir),
                           f"--coordinator_address=127.0.0.1:{free_port()}",
                           "--num_processes=2", f"--process_id={process_id}",
                           "--distributed_timeout=5"])
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "jax.distributed did not start within 5 s" in lines[0] and reason in lines[0]
    assert "Check failure" not in result.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("args,message", [
    (["--num_processes=2", "--process_id=2"], "--process_id=2 is not in [0, 2)"),
    (["--num_processes=2"], "--num_processes and --process_id need --coordinator_address"),
])
def test_bad_process_flags_are_one_line(args, message, tmp_path):
    extra = ([f"--coordinator_address=127.0.0.1:{free_port()}"]
             if "--process_id=2" in args else [])
    result = launch_alone([*launch_args("heter", tmp_path / "run"), *extra, *args])
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert message in lines[0]
    assert not (tmp_path / "run").exists()


def test_processes_with_different_device_counts_are_one_line(tmp_path):
    workdir = tmp_path / "run"
    results = local_cluster.run(launch_args("heter", workdir), processes=2,
                                cpu_devices=[4, 2], timeout_s=TIMEOUT, logs=tmp_path / "logs")
    for r in results:
        lines = error_lines(r)
        assert r.returncode == 2 and len(lines) == 1, why(results)
        assert "the processes have different numbers of devices {0: 4, 1: 2}" in lines[0]
    assert not workdir.exists()


def test_a_mesh_that_leaves_devices_out_of_a_multi_process_run_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    results = two_processes([*launch_args("heter", workdir), "--config.mesh.clients=1",
                             "--config.mesh.data=3"], tmp_path)
    for r in results:
        lines = error_lines(r)
        assert r.returncode == 2 and len(lines) == 1, why(results)
        assert "uses 3 of the 8 devices of 2 processes" in lines[0]
    assert not workdir.exists()

