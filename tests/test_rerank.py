"""The preference-aligned reranker: its losses against PyTorch implementations of their
textbook definitions, MGDA against the closed form and an exact solver, the cross-encoder
against transformers' BertForSequenceClassification, and its training step."""

import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ffrag_jax import rerank
from ffrag_jax.models import lora as lora_lib
from ffrag_jax.rerank.step import task_losses as step_task_losses
from ffrag_jax.training import train

TOL = dict(rtol=1e-5, atol=1e-5)


def _problem(seed=0, b=5, k=6):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(b, k)).astype(np.float32) * 3
    labels = (rng.random((b, k)) < 0.4).astype(np.float32)
    valid = rng.random((b, k)) < 0.85
    labels[0] = 0  # no positive: pairwise and contrastive skip it
    labels[1] = valid[1]  # positives only: no pair, no negative
    valid[2] = False
    valid[2, :2] = True
    labels[2, :2] = (1, 0)
    return scores, labels, valid


# Textbook definitions in PyTorch, question by question (float64), with autograd.
def _torch_pointwise(s, y, v):
    out = []
    for i in range(s.shape[0]):
        m = v[i]
        if m.any():
            out.append(torch.nn.functional.binary_cross_entropy_with_logits(s[i][m], y[i][m]))
    return torch.stack(out).mean()


def _torch_ranknet(s, y, v):
    out = []
    for i in range(s.shape[0]):
        pairs = [(a, b) for a, b in itertools.permutations(range(s.shape[1]), 2)
                 if v[i, a] and v[i, b] and y[i, a] > y[i, b]]
        if pairs:
            out.append(torch.stack([-torch.log(torch.sigmoid(s[i, a] - s[i, b]))
                                    for a, b in pairs]).mean())
    return torch.stack(out).mean()


def _torch_supcon(s, y, v, tau):
    out = []
    for i in range(s.shape[0]):
        m = v[i]
        pos = [j for j in range(s.shape[1]) if m[j] and y[i, j] > 0]
        if not pos or all(y[i, j] > 0 for j in range(s.shape[1]) if m[j]):
            continue
        denom = torch.exp(s[i][m] / tau).sum()
        out.append(-torch.stack([torch.log(torch.exp(s[i, p] / tau) / denom)
                                 for p in pos]).mean())
    return torch.stack(out).mean()


@pytest.mark.parametrize("name", ["pointwise", "pairwise", "contrastive"])
def test_reranker_losses_match_their_textbook_definitions_in_pytorch(name):
    s, y, v = _problem()
    tau = 0.7
    ours_fn = {"pointwise": rerank.pointwise, "pairwise": rerank.pairwise,
               "contrastive": lambda *a: rerank.contrastive(*a, temperature=tau)}[name]
    ref_fn = {"pointwise": _torch_pointwise, "pairwise": _torch_ranknet,
              "contrastive": lambda *a: _torch_supcon(*a, tau)}[name]
    from ffrag_jax.rerank.losses import batch_mean

    value, grad = jax.value_and_grad(lambda x: batch_mean(*ours_fn(x, y, v)))(jnp.asarray(s))
    ts = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    ref = ref_fn(ts, torch.tensor(y, dtype=torch.float64), torch.tensor(v))
    ref.backward()
    np.testing.assert_allclose(float(value), ref.item(), **TOL)
    np.testing.assert_allclose(np.asarray(grad), ts.grad.numpy(), **TOL)


def _exact_min_norm(g):
    """The min-norm point of the convex hull of the rows of g: every support's
    equality-constrained optimum (KKT), the best feasible one."""
    n = len(g)
    m = g @ g.T
    best = None
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            s = list(support)
            a = np.block([[m[np.ix_(s, s)], np.ones((size, 1))], [np.ones((1, size)), 0]])
            try:
                w = np.linalg.solve(a, np.r_[np.zeros(size), 1.0])[:size]
            except np.linalg.LinAlgError:
                continue
            if (w >= -1e-12).all():
                full = np.zeros(n)
                full[s] = w
                if best is None or np.linalg.norm(full @ g) < np.linalg.norm(best @ g):
                    best = full
    return best


def test_mgda_two_task_weights_equal_the_closed_form_and_three_tasks_the_exact_optimum():
    rng = np.random.default_rng(3)
    for _ in range(20):
        g = rng.normal(size=(2, 11))
        gamma = np.clip((g[1] - g[0]) @ g[1] / np.sum((g[0] - g[1]) ** 2), 0, 1)
        m = jnp.asarray(g @ g.T, jnp.float32)
        np.testing.assert_allclose(float(rerank.two_task_weight(m[0, 0], m[0, 1], m[1, 1])),
                                   gamma, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(rerank.frank_wolfe(m)), [gamma, 1 - gamma],
                                   rtol=1e-5, atol=1e-6)
    # one gradient inside the others' cone: the closed form clips to a vertex
    g = np.array([[1.0, 0.0], [2.0, 0.1]])
    m = jnp.asarray(g @ g.T, jnp.float32)
    np.testing.assert_allclose(np.asarray(rerank.frank_wolfe(m)), [1.0, 0.0], atol=1e-6)
    for _ in range(10):
        g = rng.normal(size=(3, 6))
        w = np.asarray(rerank.frank_wolfe(jnp.asarray(g @ g.T, jnp.float32)))
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-5
        exact = _exact_min_norm(g)
        np.testing.assert_allclose(np.linalg.norm(w @ g), np.linalg.norm(exact @ g),
                                   rtol=1e-4, atol=1e-5)
    # a task with nothing to learn from (zero gradient) is left out, not the min-norm point
    g = np.stack([rng.normal(size=5), np.zeros(5), rng.normal(size=5)])
    m = jnp.asarray(g @ g.T, jnp.float32)
    w = np.asarray(rerank.frank_wolfe(m, active=jnp.asarray([True, False, True])))
    gamma = np.clip((g[2] - g[0]) @ g[2] / np.sum((g[0] - g[2]) ** 2), 0, 1)
    np.testing.assert_allclose(w, [gamma, 0.0, 1 - gamma], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rerank.frank_wolfe(m, active=jnp.zeros(3, bool))),
                               0.0)
    # gram and combine over pytrees with a leading task axis
    tree = {"a": jnp.asarray(rng.normal(size=(3, 2, 2))), "b": jnp.asarray(rng.normal(size=(3, 5)))}
    flat = np.concatenate([np.asarray(tree["a"]).reshape(3, -1), np.asarray(tree["b"])], 1)
    np.testing.assert_allclose(np.asarray(rerank.gram(tree)), flat @ flat.T, rtol=1e-5)
    w = jnp.asarray([0.2, 0.3, 0.5])
    np.testing.assert_allclose(np.asarray(rerank.combine(tree, w)["b"]),
                               np.asarray(w) @ np.asarray(tree["b"]), rtol=1e-5)


QUERIES = ["Which drug was prescribed to patient Ab Cd?", "Who heard case Lo-12?"]
PASSAGES = ["Patient Ab Cd was prescribed Toxin. " * 3, "Case Lo-12 was heard by Judge Ra."]


def _reference_logits(model, tokenizer, max_len):
    enc = tokenizer(QUERIES, PASSAGES, truncation="only_second", max_length=max_len,
                    padding="max_length", return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[:, 0].numpy()


def test_cross_encoder_matches_bert_for_sequence_classification_and_saves_back(
        tiny_cross_encoder, tmp_path):
    from transformers import BertForSequenceClassification

    folder, model = tiny_cross_encoder
    reranker = rerank.Reranker.load(folder, max_len=24)
    ours = reranker.score_pairs(QUERIES, PASSAGES, batch_size=4)
    np.testing.assert_allclose(ours, _reference_logits(model, reranker.tokenizer, 24), **TOL)
    # an adapter on every projection, the head's included, then merged and saved
    adapter = lora_lib.init(jax.random.key(1), reranker.params, "query,value,pooler", 2,
                            4.0)
    adapter = jax.tree.map(lambda x: x + 0.05, adapter)  # b != 0: the adapter matters
    adapted = rerank.Reranker(reranker.cfg, reranker.params, reranker.tokenizer, adapter, 24)
    merged = lora_lib.merge(reranker.params, adapter)
    rerank.save(tmp_path / "saved", reranker.cfg, merged, folder)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    np.testing.assert_allclose(adapted.score_pairs(QUERIES, PASSAGES),
                               _reference_logits(reloaded, reranker.tokenizer, 24), **TOL)


def test_the_packaged_minilm_is_a_cross_encoder_with_a_fresh_head():
    reranker = rerank.Reranker.load(None, max_len=32)
    assert set(reranker.params) == {"encoder", "pooler", "score"}
    scores = reranker.score("Which drug?", ["Patient A was prescribed B.", "Nothing."])
    assert scores.shape == (2,) and np.isfinite(scores).all()


def test_reranker_bad_input_empty_candidates_and_long_passages(tiny_cross_encoder, caplog):
    folder, _ = tiny_cross_encoder
    reranker = rerank.Reranker.load(folder, max_len=16)
    assert reranker.score("a question", []).shape == (0,)
    assert reranker.rerank("a question", []) == []
    long = "word " * 100
    with caplog.at_level(logging.WARNING):
        enc = rerank.tokenize_pairs(reranker.tokenizer, ["Who heard case Lo-12?"], [long], 16)
    assert "1 of 1 query-passage pairs are longer" in caplog.text
    ids = enc["input_ids"][0]
    query = reranker.tokenizer("Who heard case Lo-12?")["input_ids"]
    assert ids.tolist()[: len(query)] == query  # the query intact, the passage cut at its end
    assert enc["token_type_ids"][0, len(query)] == 1
    with pytest.raises(Exception, match="2 queries for 1 passages"):
        rerank.tokenize_pairs(reranker.tokenizer, ["a", "b"], ["c"], 16)
    with pytest.raises(Exception, match="unknown reranker loss 'listwise'"):
        rerank.RerankLossConfig(weights=(("listwise", 1.0),))


def test_a_residual_reranker_adds_the_centred_retriever_prior():
    retrieved = np.asarray([[0.9, 0.8, 0.4, -np.inf], [0.2, 0.7, 0.1, 0.0]], np.float32)
    valid = np.isfinite(retrieved)
    prior = rerank.retriever_prior(retrieved, valid, 10.0)
    np.testing.assert_allclose(prior[0], [2.0, 1.0, -3.0, 0.0], atol=1e-5)  # mean 0.7
    np.testing.assert_allclose(prior[1], [-0.5, 4.5, -1.5, -2.5], atol=1e-5)
    plain = rerank.Reranker.load(None, max_len=24)
    residual = rerank.Reranker.load(None, max_len=24, prior_scale=10.0)
    logits = np.asarray([[0.1, 0.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(plain.with_prior(logits, None, valid), logits)
    np.testing.assert_allclose(residual.with_prior(logits, retrieved, valid), logits + prior)
    with pytest.raises(Exception, match="residual .* needs the retriever's scores"):
        residual.with_prior(logits, None, valid)
    # In the step, the losses see logit + prior: the same as the losses of those scores.
    enc = rerank.tokenize_pairs(plain.tokenizer, ["q"] * 8, [f"passage {i}" for i in range(8)],
                                24)
    batch = {k: jnp.asarray(v.reshape(2, 4, 24)) for k, v in enc.items()}
    batch.update(labels=jnp.asarray([[0, 1, 0, 0], [1, 0, 0, 1]], jnp.float32),
                 valid=jnp.asarray(valid), prior=jnp.asarray(prior))
    cfg = rerank.RerankLossConfig()
    ours, _, s = step_task_losses({}, {"params": plain.params}, batch, None, cfg=plain.cfg,
                                  loss_cfg=cfg)
    bare = rerank.scores(plain.params, plain.cfg, batch)
    np.testing.assert_allclose(np.asarray(s), np.asarray(bare) + prior, rtol=1e-6, atol=1e-6)
    expected, _ = rerank.task_losses(bare + prior, batch["labels"], batch["valid"],
                                     temperature=cfg.temperature)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("combine", ["mgda", "fixed"])
def test_reranker_step_learns_to_put_the_aligned_passage_first(combine):
    reranker = rerank.Reranker.load(None, max_len=24)  # the packaged MiniLM, a fresh head
    rng = np.random.default_rng(0)
    # aligned: the passage about the asked patient; the others about other patients
    names = ["Ab", "Cd", "Ef", "Gh"]
    qs, ps, labels = [], [], []
    for name in names:
        cands = [f"Patient {name} takes pills."] + [f"Patient {o} takes pills." for o in names
                                                    if o != name]
        order = rng.permutation(4)
        qs += [f"What does patient {name} take?"] * 4
        ps += [cands[j] for j in order]
        labels.append((order == 0).astype(np.float32))
    enc = rerank.tokenize_pairs(reranker.tokenizer, qs, ps, 24)
    batch = {k: jnp.asarray(v.reshape(4, 4, 24)) for k, v in enc.items()}
    batch.update(labels=jnp.asarray(np.stack(labels)), valid=jnp.ones((4, 4), bool))
    adapter = lora_lib.init(jax.random.key(0), reranker.params, "query,value,pooler", 4, 8.0)
    opt = train.make_optimizer(3e-3, 20, warmup_steps=0)
    state = train.init_train_state({"lora": adapter}, opt)
    loss_cfg = rerank.RerankLossConfig(combine=combine)
    history = []
    for step in range(20):
        state, m = rerank.rerank_step(state, {"params": reranker.params}, batch,
                                      jax.random.key(step), cfg=reranker.cfg,
                                      loss_cfg=loss_cfg, optimizer=opt)
        history.append({k: float(v) for k, v in m.items()})
        weights = [history[-1][f"weight_{t}"] for t in rerank.TASKS]
        assert min(weights) >= 0 and (combine == "fixed" or abs(sum(weights) - 1) < 1e-5)
    first, last = history[0], history[-1]
    assert first["top1_aligned"] < 1.0 and last["top1_aligned"] == 1.0
    for task in rerank.TASKS:
        assert last[task] < 0.5 * first[task], task
