"""Data safety of the run folder: ownership before deletion, one writer, torn-write-proof
metrics, a resume that redoes exactly the work after the last checkpoint, and one-line errors
(exit 2) for bad input, with every file that was there before left byte for byte."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ffrag_jax import files
from ffrag_jax.errors import UserError
from ffrag_jax.launch import load_config
from ffrag_jax.training import checkpoint, workdir
from ffrag_jax.training import run as run_lib
from ffrag_jax.training.metrics import MetricsLog, read_jsonl

# The single-LoRA job at its smallest: a few seconds of work after compilation.
TINY_LORA = {
    "pretrain.steps": 2, "train.steps": 4, "pretrain.num_examples": 32,
    "data.num_task_train": 32, "data.num_eval": 8, "eval.batch_size": 8,
    "pretrain.batch_size": 8, "train.batch_size": 8, "model.hidden_size": 32,
    "model.intermediate_size": 64, "model.num_layers": 2, "tokenizer.vocab_size": 300,
    "log_every": 1, "checkpoint_every": 2,
}


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> its sha256; folders -> "dir". The
    run's lock file is left out: each run that takes the lock writes its PID there."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.name == workdir.LOCK:
            continue
        rel = str(path.relative_to(folder))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def launch(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "ffrag_jax.launch", *args],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def finished_run(folder: Path, config_name: str = "heter", **overrides) -> Path:
    """A folder holding a finished run as far as the workdir contract goes (marker, config,
    metrics, a checkpoint folder, summary) without spending a training run on it."""
    run_lib.prepare_workdir(load_config(config_name, overrides), folder, overwrite=False)
    MetricsLog(folder / "metrics.jsonl").write(kind="round", round=1)
    (folder / "checkpoints" / "rounds").mkdir(parents=True)
    (folder / "export").mkdir()
    (folder / "export" / "weights.bin").write_bytes(os.urandom(64))
    files.atomic_write_json(folder / "summary.json", {"rounds": 1})
    return folder


# --------------------------------------------------------------------------------------------
# Ownership: validate first, delete only what ffrag_jax wrote


def test_overwrite_with_an_invalid_config_deletes_nothing(tmp_path):
    run = finished_run(tmp_path / "h")
    before = tree_hashes(run)
    result = launch("--config", "heter", "--workdir", str(run), "--overwrite",
                    "--config.fl.rounds=0")
    assert "fl.rounds must be positive, got 0" in error_line(result)
    assert "deleting" not in result.stderr
    assert tree_hashes(run) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    mine = tmp_path / "thesis"
    (mine / "src").mkdir(parents=True)
    (mine / "thesis.tex").write_text("\\documentclass{article}")
    (mine / "src" / "main.py").write_text("print('hi')")
    before = tree_hashes(mine)
    for extra in ([], ["--overwrite"]):
        result = launch("--config", "heter", "--workdir", str(mine), *extra)
        assert "holds no ffrag_jax run (it holds src, thesis.tex)" in error_line(result)
        assert tree_hashes(mine) == before  # not even a lock file was written


def test_overwrite_deletes_only_the_runs_own_outputs(tmp_path):
    run = finished_run(tmp_path / "h")
    (run / "notes.txt").write_text("my notes on this run")
    (run / "plots").mkdir()
    (run / "plots" / "mine.png").write_bytes(b"png")
    run_lib.prepare_workdir(load_config("heter", {"fl.rounds": 2}), run, overwrite=True)
    assert (run / "notes.txt").read_text() == "my notes on this run"
    assert (run / "plots" / "mine.png").read_bytes() == b"png"
    assert not (run / "summary.json").exists() and not (run / "export").exists()
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    assert json.loads((run / "config.json").read_text())["fl"]["rounds"] == 2
    assert (run / workdir.MARKER).exists()


def test_overwrite_refuses_a_run_without_the_marker(tmp_path):
    run = finished_run(tmp_path / "h")
    (run / workdir.MARKER).unlink()  # a run folder of an older version, or a look-alike
    before = tree_hashes(run)
    with pytest.raises(UserError, match="--overwrite replaces only runs made by ffrag_jax"):
        run_lib.prepare_workdir(load_config("heter"), run, overwrite=True)
    assert tree_hashes(run) == before


def test_a_model_folder_is_not_taken_for_a_run(tmp_path):
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights")
    before = tree_hashes(model)
    with pytest.raises(UserError, match="holds no ffrag_jax run"):
        run_lib.run(load_config("heter"), model)
    assert tree_hashes(model) == before


def test_a_start_that_failed_on_its_input_does_not_hold_the_workdir(tmp_path):
    """A bad data file is found after the workdir was set up: the corrected command starts
    afresh there instead of being refused as "an unfinished run with a different config"."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no instruction field"}\n' * 8)
    overrides = {"data.source": "file", "data.path": str(bad), "fl.num_clients": 2,
                 "lora.generator.ranks": (2, 1), "tokenizer.vocab_size": 300}
    with pytest.raises(UserError, match="record without 'instruction'/'output'"):
        run_lib.run(load_config("heter", overrides), tmp_path / "w")
    good = {**overrides, "data.path": str(tmp_path / "good.jsonl")}
    (tmp_path / "good.jsonl").write_text("")
    assert run_lib.prepare_workdir(load_config("heter", good), tmp_path / "w", False)
    assert json.loads((tmp_path / "w/config.json").read_text())["data"]["path"] == good[
        "data.path"]
    # ... but a run with checkpoints is never replaced without --overwrite
    (tmp_path / "w/checkpoints").mkdir()
    mngr = checkpoint.manager(tmp_path / "w/checkpoints/rounds")
    checkpoint.save(mngr, 1, {"x": 1}, MetricsLog(tmp_path / "w/metrics.jsonl"))
    mngr.wait_until_finished()
    mngr.close()
    with pytest.raises(UserError, match="unfinished run with a different config"):
        run_lib.prepare_workdir(load_config("heter", overrides), tmp_path / "w", False)


def test_workdir_naming_a_file_or_holding_a_damaged_config(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("a,b\n1,2\n")
    result = launch("--config", "heter", "--workdir", str(target))
    assert f"--workdir {target} is a file, not a folder" in error_line(result)
    assert target.read_text() == "a,b\n1,2\n"

    run = finished_run(tmp_path / "h")
    (run / "summary.json").unlink()  # unfinished
    (run / "config.json").write_bytes(b'{"task": "federated", "fl": {"rou')
    before = tree_hashes(run)
    result = launch("--config", "heter", "--workdir", str(run))
    assert "config.json is damaged" in error_line(result)
    assert tree_hashes(run) == before


# --------------------------------------------------------------------------------------------
# One writer per workdir


def test_a_second_run_is_refused_with_the_pid_holding_the_workdir(tmp_path):
    run = tmp_path / "w"
    run.mkdir()
    with workdir.Lock(run):
        result = launch("--config", "heter", "--workdir", str(run))
        assert f"in use by another run (PID {os.getpid()} on" in error_line(result)
    assert list(run.iterdir()) == [run / workdir.LOCK]
    # The lock is the OS's: a dead holder's lock file (its PID still in it) blocks nothing.
    (run / workdir.LOCK).write_text("PID 999999 on elsewhere\n")
    with workdir.Lock(run):
        pass


def test_two_launches_on_one_workdir_run_once(tmp_path):
    run = tmp_path / "w"
    args = ["--config", "lora", "--workdir", str(run), *flags(TINY_LORA)]
    procs = [subprocess.Popen([sys.executable, "-m", "ffrag_jax.launch", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [r[1][-2000:] for r in results]
    loser = next(err for p, (_, err) in zip(procs, results, strict=True) if p.returncode == 2)
    assert ("in use by another run (PID" in loser
            or "already holds a finished run" in loser), loser[-2000:]
    records = read_jsonl(run / "metrics.jsonl")
    steps = [(r["phase"], r["step"]) for r in records if r["kind"] == "train"]
    assert steps == [("pretrain", 1), ("pretrain", 2)] + [("lora", s) for s in (1, 2, 3, 4)]
    evals = [r["metric"] for r in records if r["kind"] == "eval"]
    assert len(evals) == len(set(evals)) == 3


def test_a_run_starts_from_another_runs_pretrained_base_and_leaves_it_untouched(tmp_path):
    """pretrain.from_run: the base is restored from a finished run (read only), so the run is
    the one that would have pretrained it itself; a run whose base would differ is refused
    before anything is written."""
    source, reuse = tmp_path / "source", tmp_path / "reuse"
    first = launch("--config", "lora", "--workdir", str(source), *flags(TINY_LORA))
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree_hashes(source)
    second = launch("--config", "lora", "--workdir", str(reuse), *flags(TINY_LORA),
                    f"--config.pretrain.from_run={source}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert tree_hashes(source) == before
    ours, theirs = read_jsonl(reuse / "metrics.jsonl"), read_jsonl(source / "metrics.jsonl")
    assert not [r for r in ours if r.get("phase") == "pretrain"]
    assert not (reuse / "checkpoints" / "pretrain").exists()

    def results(records):  # everything after pretraining, clock fields aside
        return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")}
                for r in records if r.get("phase") != "pretrain"]

    assert len(results(ours)) >= 4 and results(ours) == results(theirs)
    # A run that reused a base leads to the run that pretrained it.
    again = launch("--config", "lora", "--workdir", str(tmp_path / "again"), *flags(TINY_LORA),
                   f"--config.pretrain.from_run={reuse}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert results(read_jsonl(tmp_path / "again" / "metrics.jsonl")) == results(theirs)

    cases = {  # what from_run names, the flags -> what the one line must say
        "seed": (source, ["--config.seed=1"], "that run pretrained another base (seed: 0 -> 1)"),
        "nothing": (tmp_path / "nothing", [], "not an ffrag_jax run folder"),
        "early": (tmp_path / "early", [], "its pretraining has not finished (step 0 of 2)"),
    }
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.json").write_text((source / "config.json").read_text())
    for name, (named, extra, says) in cases.items():
        out = tmp_path / f"refused_{name}"
        line = error_line(launch("--config", "lora", "--workdir", str(out), *flags(TINY_LORA),
                                 f"--config.pretrain.from_run={named}", *extra))
        assert f"pretrain.from_run={named}" in line and says in line, line
        assert not out.exists() or not any(out.iterdir()), name


# --------------------------------------------------------------------------------------------
# Torn-write-proof metrics and summaries


def test_metrics_log_survives_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write(kind="train", step=1, loss=1.5)
    log.write(kind="train", step=2, loss=float("nan"))  # strict JSON: no bare NaN token
    whole = path.read_bytes()
    with path.open("ab") as f:
        f.write(b'{"kind": "train", "step": 3, "lo')  # what a kill mid-write leaves
    MetricsLog(path)
    assert path.read_bytes() == whole
    assert "dropping a torn last line" in caplog.text
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    json.loads(whole.splitlines()[1], parse_constant=pytest.fail)

    path.write_bytes(whole[:10] + b"\n" + whole)  # damage inside the file is not guessed at
    with pytest.raises(UserError, match=r"metrics.jsonl line 1 is damaged"):
        read_jsonl(path)


def test_resume_rewinds_metrics_to_the_latest_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    (tmp_path / "checkpoints").mkdir()
    pre = checkpoint.manager(tmp_path / "checkpoints/pretrain")
    log.write(kind="train", phase="pretrain", step=1)
    checkpoint.save(pre, 1, {"w": 1}, log)
    rounds = checkpoint.manager(tmp_path / "checkpoints/rounds")
    log.write(kind="eval", round=0)
    log.write(kind="round", round=1)
    checkpoint.save(rounds, 1, {"w": 2}, log)
    keep = log.offset()
    log.write(kind="eval", round=2)  # work after the last checkpoint: redone on resume
    for m in (pre, rounds):
        m.wait_until_finished()
        m.close()
    workdir.rewind_metrics(tmp_path)
    assert log.offset() == keep
    assert [r.get("round") for r in read_jsonl(log.path)] == [None, 0, 1]
    assert checkpoint.metrics_offsets(tmp_path / "checkpoints") == {
        "pretrain": len(json.dumps(read_jsonl(log.path)[0])) + 1, "rounds": keep}


def test_summary_and_configs_are_strict_json(tmp_path):
    path = files.atomic_write_json(tmp_path / "summary.json",
                                   {"mean_fused_loss": float("nan"), "x": [float("inf"), 1.0]})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "mean_fused_loss": None, "x": [None, 1.0]}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left


# --------------------------------------------------------------------------------------------
# Interrupts, a full disk, a read-only folder: one line, nothing lost


def test_ctrl_c_and_sigterm_end_with_one_line_and_the_same_command_resumes(tmp_path):
    run = tmp_path / "w"
    steps = 400  # long enough (a few seconds) for a signal to land mid-phase
    args = ["--config", "lora", "--workdir", str(run),
            *flags({**TINY_LORA, "train.steps": steps, "checkpoint_every": 50})]

    def lora_steps():
        path = run / "metrics.jsonl"
        return [r["step"] for r in (read_jsonl(path) if path.exists() else [])
                if r.get("phase") == "lora"]

    for sig in (signal.SIGINT, signal.SIGTERM):
        seen = max(lora_steps(), default=0)
        log = tmp_path / f"{sig.name}.log"  # a file, not a pipe: a full pipe would stall it
        with log.open("w") as err_file:
            proc = subprocess.Popen([sys.executable, "-m", "ffrag_jax.launch", *args],
                                    stdout=subprocess.DEVNULL, stderr=err_file)
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None:
                if max(lora_steps(), default=0) > seen:  # mid-phase, past the last run
                    break
                time.sleep(0.05)
            proc.send_signal(sig)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:  # stuck: its threads' stacks say where
                proc.send_signal(signal.SIGUSR1)
                time.sleep(3)
                proc.kill()
                proc.wait()
                pytest.fail(f"no exit 120 s after {sig.name}:\n{log.read_text()[-6000:]}")
        err = log.read_text()
        assert proc.returncode == 130, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: interrupted after phase lora, step ") and last.endswith(
            "; rerun the same command to resume"), last
        assert "Traceback" not in err
    result = launch(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert lora_steps() == list(range(1, steps + 1))


@pytest.fixture
def small_disk(tmp_path):
    """A 700 kB tmpfs (root only): a run's checkpoints do not fit on it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_full_disk_is_one_line_and_the_run_resumes_after_room_is_made(small_disk):
    run = small_disk / "w"
    args = ["--config", "lora", "--workdir", str(run), *flags(TINY_LORA)]
    result = launch(*args)
    line = error_line(result)
    assert "no space left on device" in line and "rerun the same command to resume" in line
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    result = launch(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r.get("phase") == "lora"]
    assert steps == [1, 2, 3, 4]


def test_read_only_workdir_is_one_line(small_disk):
    run = finished_run(small_disk / "h")
    (run / "summary.json").unlink()
    before = tree_hashes(run)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    line = error_line(launch("--config", "heter", "--workdir", str(run)))
    assert "read-only file system" in line
    assert tree_hashes(run) == before


def test_a_run_being_created_is_not_taken_for_a_foreign_folder(tmp_path):
    """Two launches at once: the second may look while the first is writing its marker
    (only the atomic write's temporary file exists yet); that folder is a run, not someone
    else's (it then waits for the lock's answer), and other temporary files still are not."""
    from ffrag_jax.training import workdir

    folder = tmp_path / "w"
    folder.mkdir()
    (folder / f".{workdir.MARKER}.x1y2.tmp").write_text("{")
    workdir.check_not_foreign(folder)
    (folder / ".notes.txt.x1y2.tmp").write_text("mine")
    with pytest.raises(UserError, match="holds no ffrag_jax run"):
        workdir.check_not_foreign(folder)
