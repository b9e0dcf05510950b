"""The launcher and the jobs end to end: one-line errors, outputs, exports, resume, no
overwrite; the single-LoRA job and the federated demo."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from killing import comparable, kill_and_resume

from ffrag_jax.launch import load_config
from ffrag_jax.training import run as run_lib

# The single-LoRA job small enough for a test: same code path, a few steps.
TINY = {
    "pretrain.steps": 6,
    "train.steps": 4,
    "pretrain.num_examples": 64,
    "data.num_task_train": 64,
    "data.num_eval": 8,
    "eval.batch_size": 8,
    "pretrain.batch_size": 8,
    "train.batch_size": 8,
    "model.hidden_size": 32,
    "model.intermediate_size": 64,
    "model.num_layers": 2,
    "tokenizer.vocab_size": 400,
    "log_every": 2,
    "checkpoint_every": 2,
}


def _launch(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ffrag_jax.launch", *args],
                          capture_output=True, text=True, timeout=timeout)


def _tiny_config(**extra):
    return load_config("lora", {**TINY, **extra})


def _error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def test_unknown_config_name_lists_configs():
    line = _error_line(_launch("--config", "nope"))
    assert "unknown config 'nope'; configs: boundary, demo, fflora" in line


def test_unknown_override_key_lists_keys():
    line = _error_line(_launch("--config=lora", "--config.lora.generator.rnak=4"))
    assert "unknown config key 'lora.generator.rnak'" in line and "rank" in line


def test_bad_override_value_is_one_line():
    assert "--config.lora.generator.rank=abc" in _error_line(_launch("--config", "lora",
                                                           "--config.lora.generator.rank=abc"))


def test_bad_lora_rank_fails_before_any_work(tmp_path):
    line = _error_line(_launch("--config", "lora", "--config.lora.generator.rank=0",
                               "--workdir", str(tmp_path / "w")))
    assert "LoRA rank must be a positive integer" in line
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_lora_job_end_to_end_via_launcher(tmp_path):
    workdir = tmp_path / "run"
    overrides = [f"--config.{k}={v}" for k, v in TINY.items()]
    result = _launch("--config", "lora", "--workdir", str(workdir), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("Unable to initialize backend", "DEBUG:", "Traceback"):  # a quiet log
        assert noise not in result.stderr, noise
    for name in ("config.json", "metrics.jsonl", "loss.png", "summary.json",
                 "tokenizer/tokenizer.json", "export/base_model/config.json",
                 "export/base_model/model.safetensors", "export/lora_adapter/adapter_config.json"):
        assert (workdir / name).exists(), name
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records if r["phase"] == "lora"] == [2, 4]
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in train_records)
    summary = json.loads((workdir / "summary.json").read_text())
    assert 0.0 <= summary["task_domain_em_with_lora"] <= 1.0

    # The exports load in transformers + peft and give our logits.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ffrag_jax.models import hf, llama, lora

    model = AutoModelForCausalLM.from_pretrained(workdir / "export/base_model")
    model = PeftModel.from_pretrained(model, workdir / "export/lora_adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "export/base_model")
    ids = tokenizer("Context: Patient Ab was prescribed Cdin.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    cfg, params = hf.load_llama(workdir / "export/base_model")
    adapter = lora.load_peft_adapter(workdir / "export/lora_adapter", cfg)
    out = np.asarray(llama.forward(params, cfg, jax.numpy.asarray(ids.numpy()), None, adapter))
    assert np.abs(out - ref).max() <= 1e-4

    # A finished run is never overwritten without --overwrite...
    again = _launch("--config", "lora", "--workdir", str(workdir), *overrides)
    assert "already holds a finished run; pass --overwrite" in _error_line(again)
    assert json.loads((workdir / "summary.json").read_text()) == summary


def test_workdir_guards(tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(run_lib.UserError, match="holds no ffrag_jax run"):
        run_lib.prepare_workdir(_tiny_config(), stranger, overwrite=False)
    assert (stranger / "notes.txt").read_text() == "mine"

    partial = tmp_path / "partial"
    run_lib.prepare_workdir(_tiny_config(), partial, overwrite=False)
    with pytest.raises(run_lib.UserError,
                       match=r"different config \(lora.generator.rank: 8 -> 4\)"):
        run_lib.prepare_workdir(_tiny_config(**{"lora.generator.rank": 4}), partial,
                                overwrite=False)
    # same config: resume is allowed
    run_lib.prepare_workdir(_tiny_config(), partial, overwrite=False)


def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    """Kill the LoRA phase after its step-2 checkpoint; the resumed run ends where an
    uninterrupted run does, bit for bit."""
    from ffrag_jax.data import text

    config = _tiny_config(**{"export": False, "log_every": 1})  # step 3 is logged, then lost
    full = run_lib.run(config, tmp_path / "full")

    real_batch_at = text.batch_at
    calls = {"lora": 0}

    def dying_batch_at(data, step, batch_size, num_micro, seed):
        if seed == config.train.seed and step == 3:  # after step 3 was logged, checkpoint at 2
            calls["lora"] += 1
            raise KeyboardInterrupt("simulated kill")
        return real_batch_at(data, step, batch_size, num_micro, seed)

    monkeypatch.setattr(text, "batch_at", dying_batch_at)
    with pytest.raises(KeyboardInterrupt):
        run_lib.run(config, tmp_path / "killed")
    assert calls["lora"] == 1 and not (tmp_path / "killed" / "summary.json").exists()
    monkeypatch.setattr(text, "batch_at", real_batch_at)
    resumed = run_lib.run(config, tmp_path / "killed")
    assert resumed["task_domain_em_with_lora"] == full["task_domain_em_with_lora"]

    from ffrag_jax.training import checkpoint

    def final_adapter(workdir):
        mngr = checkpoint.manager(workdir / "checkpoints" / "lora")
        restored = mngr.restore(mngr.latest_step())
        mngr.close()
        return restored

    def lora_steps(workdir):
        return [r["step"] for r in (json.loads(x) for x in
                (workdir / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train" and r["phase"] == "lora"]

    # step 3 was never logged twice: the resumed phase forgot records after its checkpoint
    assert lora_steps(tmp_path / "killed") == lora_steps(tmp_path / "full") == [1, 2, 3, 4]
    a, b = final_adapter(tmp_path / "full"), final_adapter(tmp_path / "killed")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_lora_job_on_a_local_hf_checkpoint(tmp_path):
    """--config.model.path: no pretraining, the folder's tokenizer, LoRA on the real weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ffrag_jax.data import synthetic, text
    from ffrag_jax.models import hf, lora
    from ffrag_jax.rag import prompts

    examples = synthetic.make_examples("clinic", 200, seed=0)
    tokenizer = text.train_bpe_tokenizer(
        [prompts.prompt(e) + prompts.response(e) for e in examples], 400)
    tokenizer.pad_token = None  # like most Llama tokenizers
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    config = _tiny_config(**{"model.path": str(folder)})
    with pytest.raises(run_lib.UserError, match="has no pad token"):
        run_lib.run(config, tmp_path / "no_pad")
    config = _tiny_config(**{"model.path": str(folder), "model.pad_to_eos": True})
    summary = run_lib.run(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "pretrain").exists()
    assert (tmp_path / "run" / "checkpoints" / "lora").exists()
    # the exported base model is the checkpoint itself, and the adapter fits it
    cfg, params = hf.load_llama(folder)
    _, exported = hf.load_llama(tmp_path / "run" / "export" / "base_model")
    jax.tree.map(np.testing.assert_array_equal, params, exported)
    adapter = lora.load_peft_adapter(summary["exported"]["peft_adapter"], cfg)
    assert set(adapter.targets) == set(lora.resolve_targets("all-linear"))


TINY_DEMO = {
    "pretrain.steps": 4,
    "pretrain.num_examples": 64,
    "pretrain.batch_size": 8,
    "data.examples_per_client": 30,
    "fl.rounds": 2,
    "fl.batch_size": 8,
    "fl.micro_batch_size": 4,
    "model.hidden_size": 32,
    "model.intermediate_size": 64,
    "model.num_layers": 2,
    "tokenizer.vocab_size": 400,
    "eval.generate_batch_size": 8,
    "log_every": 2,
    "checkpoint_every": 2,
}


@pytest.fixture(scope="module")
def fflora_run(tmp_path_factory):
    """The shrunk FF-LoRA demo run by the launcher: ``(workdir, completed process)``."""
    workdir = tmp_path_factory.mktemp("fflora") / "demo"
    overrides = [f"--config.{k}={v}" for k, v in TINY_DEMO.items()]
    return workdir, _launch("--config", "fflora", "--workdir", str(workdir), *overrides)


def test_federated_lora_demo_via_launcher(fflora_run):
    """The FF-LoRA demo (shrunk): pretraining, FF-LoRA rounds over four synthetic domains,
    exact match of the base, global and fused models, exports."""
    workdir, result = fflora_run
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("phase") == "pretrain"] == [2, 4]
    em = [r for r in records if r["kind"] == "exact_match"]
    assert {(r["round"], r["model"]) for r in em} == {
        (0, "base"), (1, "global"), (1, "fused"), (2, "global"), (2, "fused")}
    assert {r["name"] for r in em} == {"0:clinic", "1:legal", "2:retail", "3:sports"}
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["exact_match"]["2:retail"]) == {"base", "global", "fused"}
    assert all(0.0 <= summary[f"mean_exact_match_{m}"] <= 1.0
               for m in ("base", "global", "fused"))
    for name in ("rounds.png", "export/global_model/model.safetensors",
                 "export/personal/client_3/adapter_config.json"):
        assert (workdir / name).exists(), name


def test_fflora_demo_killed_at_5_random_points(fflora_run, tmp_path):
    """SIGKILL at 5 points chosen by a seed, resumed with the same command each time: the
    summary and every metrics record equal the uninterrupted run's."""
    full_dir, result = fflora_run
    assert result.returncode == 0, result.stderr[-3000:]
    args = ["--config", "fflora", "--workdir", str(tmp_path / "killed"),
            *[f"--config.{k}={v}" for k, v in TINY_DEMO.items()]]
    records = lambda w: [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    log = kill_and_resume(args, tmp_path / "killed", total_records=len(records(full_dir)),
                          seed=7)
    summary = lambda w: json.loads((w / "summary.json").read_text())
    assert comparable(summary(tmp_path / "killed"), tmp_path / "killed") == comparable(
        summary(full_dir), full_dir), log
    assert comparable(records(tmp_path / "killed")) == comparable(records(full_dir)), log


def test_a_learning_rate_far_too_large_is_reported(tmp_path, caplog):
    """lr=1e6: Adam's normalised steps keep the loss finite while the adapter explodes; the
    run says so, with the step and the setting to change."""
    run_lib.run(_tiny_config(**{"train.lr": 1e6, "export": False, "log_every": 1}),
                tmp_path / "run")
    assert "lora: the trainable weights' norm grew from" in caplog.text
    assert "lower train.lr (now 1e+06)" in caplog.text


def test_a_tokenizer_larger_than_the_model_is_named_before_any_work(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ffrag_jax.data import synthetic, text
    from ffrag_jax.rag import prompts

    examples = synthetic.make_examples("clinic", 100, seed=0)
    tokenizer = text.train_bpe_tokenizer(
        [prompts.prompt(e) + prompts.response(e) for e in examples], 400)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(run_lib.UserError, match=f"the tokenizer has {len(tokenizer)} tokens but "
                                                "the model's vocab_size is 300"):
        run_lib.run(_tiny_config(**{"model.path": str(folder)}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config_name", ["lora", "heter", "demo", "rag_e2e", "retriever"])
def test_every_config_reads_one_typed_lora_section_that_refuses_unknown_keys(config_name):
    """A typo in a config file's LoRA section is one line naming the key and the valid ones
    (before any work: validate); a task that is no job lists the tasks."""
    from ffrag_jax.config_types import LoRASection

    config = load_config(config_name)
    names = [n for n in ("generator", "retriever") if n in config.lora]
    assert names and all(LoRASection.read(config, n).targets for n in names)
    with config.unlocked():
        config.lora[names[0]].rnk = 4
    with pytest.raises(run_lib.UserError, match=rf"unknown LoRA key lora\.{names[0]}\.rnk; "
                       rf"lora\.{names[0]} keys: targets, rank, ranks, alpha_ratio, dropout"):
        run_lib.validate(config)
    with config.unlocked():
        del config.lora[names[0]]["rnk"]
        config.task = "finetune"
    with pytest.raises(run_lib.UserError, match="unknown task 'finetune'; tasks: lora, "):
        run_lib.validate(config)


def test_help_explains_the_launcher_and_its_flags():
    result = _launch("--help", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout + result.stderr
    assert "Launch an ffrag_jax experiment." in text
    for flag in ("--config", "--workdir", "--overwrite", "--coordinator_address",
                 "--num_processes", "--process_id"):
        assert flag in text, flag
