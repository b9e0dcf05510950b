"""Retriever training: InfoNCE against a PyTorch cross-entropy reference, and the jitted step
(LoRA and full) on a tiny random encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ffrag_jax.models import lora
from ffrag_jax.retrieval import contrastive
from ffrag_jax.retrieval.encoder import EncoderConfig, init_params
from ffrag_jax.training import train


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("symmetric,hard", [(True, False), (False, True), (True, True)])
def test_info_nce_matches_torch_cross_entropy(symmetric, hard):
    rng = np.random.default_rng(0)
    q, p = _unit(rng.normal(size=(6, 16))), _unit(rng.normal(size=(6, 16)))
    n = _unit(rng.normal(size=(6, 2, 16))) if hard else None
    ours, aux = contrastive.info_nce(jnp.asarray(q), jnp.asarray(p),
                                     None if n is None else jnp.asarray(n), scale=20.0,
                                     symmetric=symmetric)
    tq, tp = torch.tensor(q), torch.tensor(p)
    cand = tp if n is None else torch.cat([tp, torch.tensor(n).reshape(-1, 16)])
    labels = torch.arange(6)
    ref = torch.nn.functional.cross_entropy(20.0 * tq @ cand.T, labels)
    if symmetric:
        ref = 0.5 * (ref + torch.nn.functional.cross_entropy(20.0 * tp @ tq.T, labels))
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)
    assert float(aux["accuracy"]) == float(((tq @ cand.T).argmax(1) == labels).float().mean())


TINY = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=64, max_position_embeddings=32, max_seq_length=32)


def _batch(seed):
    rng = np.random.default_rng(seed)
    ids = lambda *s: jnp.asarray(rng.integers(1, 64, s), jnp.int32)
    mask = lambda *s: jnp.ones(s, jnp.int32).at[..., -2:].set(0)
    return {"query_ids": ids(8, 6), "query_mask": mask(8, 6), "passage_ids": ids(8, 12),
            "passage_mask": mask(8, 12), "negative_ids": ids(8, 1, 12),
            "negative_mask": mask(8, 1, 12)}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_step_lowers_the_loss_and_keeps_frozen_params(mode):
    params = init_params(jax.random.key(0), TINY)
    before = jax.tree.map(np.asarray, params)
    every_projection = ["query", "key", "value", "attention_output", "intermediate", "output"]
    trainable = (lora.init(jax.random.key(1), params, every_projection, 4, 8.0)
                 if mode == "lora" else params)
    opt = train.make_optimizer(1e-2 if mode == "lora" else 3e-3, 30, max_grad_norm=1.0)
    state = train.init_train_state(trainable, opt)
    batch = _batch(0)
    losses = []
    for step in range(30):
        state, metrics = contrastive.train_step(
            state, params if mode == "lora" else None, batch, jax.random.key(step), cfg=TINY,
            optimizer=opt, mode=mode, scale=20.0)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    if mode == "lora":
        jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))


def test_retriever_job_end_to_end(tmp_path):
    """The retriever task on a small SQuAD-format file: evaluation before and after, loss
    records, a resumable checkpoint, and an exported encoder that sentence-transformers loads."""
    import json

    from ffrag_jax.data import synthetic
    from ffrag_jax.launch import load_config
    from ffrag_jax.training import run as run_lib

    articles = []
    for a, domain in enumerate(["clinic", "legal", "retail", "sports"]):
        examples = synthetic.make_examples(domain, 12, seed=a, distractors=2)
        articles.append({"title": domain, "paragraphs": [
            {"context": e["context"], "qas": [{"id": f"{a}-{i}", "question": e["question"],
                                               "answers": [{"text": e["answer"]}]}]}
            for i, e in enumerate(examples)]})
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": articles, "version": "1.1"}))
    config = load_config("retriever", {"data.path": str(squad), "data.test_fraction": 0.5,
                                       "train.steps": 4, "train.batch_size": 4,
                                       "train.hard_negatives": True,
                                       "log_every": 2, "checkpoint_every": 2})
    summary = run_lib.run(config, tmp_path / "run")
    assert summary["test_questions"] == 24 and summary["train_questions"] == 24
    for when in ("before", "after"):
        assert 0.0 < summary[when]["recall@10"] <= 1.0
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    assert (tmp_path / "run/loss.png").exists()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(summary["exported"]["encoder"], device="cpu")
    assert model.encode(["a question"]).shape == (1, 384)
    with pytest.raises(run_lib.UserError, match="data.path must name a SQuAD"):
        run_lib.run(load_config("retriever"), tmp_path / "no_data")
