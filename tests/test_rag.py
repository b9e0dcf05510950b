"""The end-to-end RAG step: generator batch layout (left-padded prompts, aligned answers,
truncation from the passage), gradient flow into the retriever LoRA checked by finite
differences, and one joint update of both LoRAs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffrag_jax import rag
from ffrag_jax.data import synthetic, text
from ffrag_jax.errors import UserError
from ffrag_jax.models import llama, lora
from ffrag_jax.rag import prompts
from ffrag_jax.retrieval.encoder import EncoderConfig
from ffrag_jax.retrieval.encoder import init_params as init_encoder
from ffrag_jax.training import train


@pytest.fixture(scope="module")
def setup():
    examples = synthetic.make_examples("clinic", 60, seed=0, distractors=1)
    tok = text.train_bpe_tokenizer([prompts.prompt(e) + prompts.response(e)
                                    for e in examples], 300)
    gen_cfg = llama.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=128)
    enc_cfg = EncoderConfig(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
    gen_params = llama.init_params(jax.random.key(0), gen_cfg)
    enc_params = init_encoder(jax.random.key(1), enc_cfg)
    questions = [e["question"] for e in examples[:3]]
    answers = [e["answer"] for e in examples[:3]]
    passages = [[examples[(i + j) % 6]["context"] for j in range(4)] for i in range(3)]
    batch = rag.encode_generator_batch(tok, questions, answers, passages, prompt_len=48,
                                       answer_len=16)
    q = tok(questions, padding="max_length", max_length=24, truncation=True,
            return_tensors="np")
    p = tok([x for ps in passages for x in ps], padding="max_length", max_length=40,
            truncation=True, return_tensors="np")
    batch.update(query_ids=q["input_ids"], query_mask=q["attention_mask"],
                 passage_ids=p["input_ids"].reshape(3, 4, 40),
                 passage_mask=p["attention_mask"].reshape(3, 4, 40))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return tok, gen_cfg, enc_cfg, gen_params, enc_params, batch


def test_answer_logits_equal_a_plain_forward_of_the_unpadded_sequence(setup):
    tok, gen_cfg, _, gen_params, _, batch = setup
    logits = rag.answer_logits(gen_params, gen_cfg, batch)  # [B, K, T, V]
    for b, k in [(0, 0), (2, 3)]:
        real = np.asarray(batch["gen_ids"][b, k])[np.asarray(batch["gen_mask"][b, k]) == 1]
        plain = llama.forward(gen_params, gen_cfg, jnp.asarray(real)[None])[0]
        n_answer = int(batch["answer_mask"][b].sum())
        want = plain[len(real) - n_answer - 1 : len(real) - 1]
        np.testing.assert_allclose(logits[b, k, :n_answer], want, atol=1e-4)
        assert (np.asarray(batch["gen_ids"][b, k, 48 : 48 + n_answer])
                == np.asarray(batch["targets"][b, :n_answer])).all()


def test_truncation_comes_from_the_passage_and_bad_answers_are_refused(setup):
    tok = setup[0]
    long_passage = "Patient Ab was seen. " * 80
    out = rag.encode_generator_batch(tok, ["Which ward?"], ["B4"], [[long_passage]],
                                     prompt_len=40, answer_len=6)
    prompt = tok.decode(out["gen_ids"][0, 0, :40][out["gen_mask"][0, 0, :40] == 1])
    assert prompt.endswith("Question: Which ward?\nAnswer:") and "Patient Ab" in prompt
    assert tok.decode(out["targets"][0][out["answer_mask"][0] == 1]).strip() == "B4</s>"
    with pytest.raises(UserError, match="answer 0 has .* tokens .* budget is 2"):
        rag.encode_generator_batch(tok, ["q"], ["a much longer answer"], [["p"]], 40, 2)
    # A job leaves questions whose answer does not fit out of training (never cuts them).
    questions = [{"answer": "B4"}, {"answer": "a much longer answer"}, {"answer": "B4."}]
    assert rag.drop_long_answers(tok, questions, 4, "test") == [questions[0], questions[2]]
    with pytest.raises(UserError, match="test: no answer fits rag.answer_len=1"):
        rag.drop_long_answers(tok, questions, 1, "test")
    padded, valid = rag.pad_passages([["a", "b", "c"], [], ["d"]], 2)
    assert padded == [["a", "b"], ["", ""], ["d", ""]]
    assert valid.tolist() == [[True, True], [True, False], [True, False]]


def test_retriever_lora_gradient_matches_finite_differences(setup):
    _, gen_cfg, enc_cfg, gen_params, enc_params, batch = setup
    ret = lora.init(jax.random.key(2), enc_params, ["query", "value"], 2, 4.0)
    ret = ret.replace(weights=jax.tree.map(
        lambda x: x + jax.random.normal(jax.random.key(3), x.shape), ret.weights))
    frozen = {"generator": gen_params, "retriever": enc_params}
    # A sharp retriever (scale 100) so the random models' small score differences matter.
    cfg = rag.RagLossConfig(weights=(("rag_sequence", 1.0),), score_scale=100.0)

    def loss(r):
        return rag.rag_loss({"generator": None, "retriever": r}, frozen, batch, None,
                            gen_cfg=gen_cfg, enc_cfg=enc_cfg, loss_cfg=cfg)[0]

    grad = jax.grad(loss)(ret)
    flat_grad = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad.weights)])
    assert float(jnp.abs(flat_grad).max()) > 1e-4  # the generator's loss reaches the retriever
    # Probe along the gradient (scaled to a random direction's norm): a random direction's
    # derivative here is ~1e-3, at the float32 resolution of the loss difference, while this
    # one is ~4e-2, so the comparison measures the gradient, not rounding.
    size = sum(x.size for x in jax.tree.leaves(grad.weights))
    norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grad.weights)))
    direction = jax.tree.map(lambda g: g / norm * np.sqrt(size), grad)
    h = 1e-2
    plus = loss(jax.tree.map(lambda x, d: x + h * d, ret, direction))
    minus = loss(jax.tree.map(lambda x, d: x - h * d, ret, direction))
    numeric = (plus - minus) / (2 * h)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad.weights),
                                                   jax.tree.leaves(direction.weights),
                                                   strict=True))
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2)


@pytest.mark.parametrize("losses", [(("rag_sequence", 1.0),), (("rag_token", 1.0),),
                                    (("ralt", 1.0), ("lsr", 0.5))])
def test_rag_step_updates_both_loras_and_keeps_the_base(setup, losses):
    _, gen_cfg, enc_cfg, gen_params, enc_params, batch = setup
    gen_lora = lora.init(jax.random.key(5), gen_params, ["q_proj", "v_proj"], 4, 8.0)
    ret_lora = lora.init(jax.random.key(6), enc_params, ["query", "value"], 2, 4.0)
    opt_g, opt_r = train.make_optimizer(1e-2, 10), train.make_optimizer(1e-2, 10)
    states = {"generator": train.init_train_state(gen_lora, opt_g),
              "retriever": train.init_train_state(ret_lora, opt_r)}
    before = jax.tree.map(np.asarray, gen_params)
    cfg = rag.RagLossConfig(weights=losses)
    frozen = {"generator": gen_params, "retriever": enc_params}
    first = None
    for step in range(6):
        states, metrics = rag.rag_step(states, frozen, batch, jax.random.key(step),
                                       gen_cfg=gen_cfg, enc_cfg=enc_cfg, loss_cfg=cfg,
                                       optimizers=(opt_g, opt_r))
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first
    assert float(metrics["grad_norm_retriever"]) > 0 and float(metrics["grad_norm_generator"]) > 0
    assert np.abs(np.asarray(states["retriever"].trainable.weights["layers"]["query"]["b"])
                  ).max() > 0
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, gen_params))


def test_vmapped_client_updates_equal_sequential_steps(setup):
    """``rag.update_clients`` (vmapped clients, scanned steps, ranks 4 and 2 zero-padded to 4)
    equals each client's own loop of ``rag_step`` at its real rank; the padding stays zero.
    Weights to 1e-5 absolute (they move by up to 2e-2 in these two steps): float32 sums run
    in another order when batched and padded, and Adam's normalisation turns a relative
    difference in a near-zero gradient into a visible one in the update."""
    from ffrag_jax import federated

    _, gen_cfg, enc_cfg, gen_params, enc_params, batch = setup
    opt_g, opt_r = train.make_optimizer(1e-2, 10), train.make_optimizer(1e-2, 10)
    static = dict(gen_cfg=gen_cfg, enc_cfg=enc_cfg,
                  loss_cfg=rag.RagLossConfig(weights=(("rag_sequence", 1.0), ("lsr", 0.5))),
                  optimizers=(opt_g, opt_r))
    frozen = {"generator": gen_params, "retriever": enc_params}
    ranks, steps = (4, 2), 2
    gens = [lora.init(jax.random.key(10 + c), gen_params, ["q_proj", "v_proj"], r, 2.0 * r)
            for c, r in enumerate(ranks)]
    rets = [lora.init(jax.random.key(20 + c), enc_params, ["query"], 2, 4.0) for c in range(2)]
    # Each client sees other batches: client c's step s rolls the questions by c + s.
    batches = [[jax.tree.map(lambda x, n=c + s: jnp.roll(x, n, axis=0), batch)
                for s in range(steps)] for c in range(2)]
    rngs = jax.random.split(jax.random.key(3), (2, steps))

    def start(gen, ret):
        return {"generator": train.init_train_state(gen, opt_g),
                "retriever": train.init_train_state(ret, opt_r)}

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[
        start(federated.pad_rank(g, max(ranks)), r) for g, r in zip(gens, rets, strict=True)])
    all_batches = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[jax.tree.map(lambda *xs: jnp.stack(xs), *b) for b in batches])
    together, metrics = rag.update_clients(stacked, frozen, all_batches, rngs, **static)
    assert metrics["loss"].shape == (2, steps)
    for c, rank in enumerate(ranks):
        states = start(gens[c], rets[c])
        for s in range(steps):
            states, out = rag.rag_step(states, frozen, batches[c][s], rngs[c, s], **static)
            np.testing.assert_allclose(metrics["loss"][c, s], out["loss"], rtol=1e-5)
        mine = jax.tree.map(lambda x, c=c: x[c], together)
        got = federated.unpad_rank(mine["generator"].trainable, rank)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                     got.weights, states["generator"].trainable.weights)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                     mine["retriever"].trainable.weights, states["retriever"].trainable.weights)
        for ab in lora.module_weights(mine["generator"].trainable.weights).values():
            assert not np.asarray(ab["a"][..., rank:]).any()
            assert not np.asarray(ab["b"][..., rank:, :]).any()


def test_rag_job_end_to_end(tmp_path):
    """The rag task, shrunk: pretraining, knowledge base, evaluation before/after, LSR steps
    through the launcher's library entry point; K beyond the knowledge base is refused."""
    import json

    from ffrag_jax.launch import load_config
    from ffrag_jax.training import run as run_lib

    small = {"pretrain.steps": 4, "pretrain.num_examples": 64, "pretrain.batch_size": 8,
             "data.num_entities": 10, "data.num_test": 10, "train.steps": 2,
             "train.batch_size": 4, "model.hidden_size": 32, "model.intermediate_size": 64,
             "model.num_layers": 2, "tokenizer.vocab_size": 400, "log_every": 1,
             "checkpoint_every": 1}
    summary = run_lib.run(load_config("rag_e2e", small), tmp_path / "run")
    assert summary["test_questions"] == 10 and summary["train_questions"] == 30
    assert set(summary["before"]) == {"recall@1", "recall@4", "answer_in_context",
                                      "closed_book_em", "closed_book_f1", "rag_em", "rag_f1"}
    assert (tmp_path / "run/export/system.json").exists()
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("phase") == "rag"] == [1, 2]
    side = run_lib.run(load_config("rag_e2e", {**small, "train.passage_side": True,
                                                "rag.refresh_every": 1}), tmp_path / "side")
    records = [json.loads(x) for x in (tmp_path / "side/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "index_refresh"] == [1, 2]
    assert set(side["after"]) == set(summary["after"])
    with pytest.raises(UserError, match="rag.k=50 is larger than the knowledge base"):
        run_lib.run(load_config("rag_e2e", {**small, "rag.k": 50}), tmp_path / "k")


def test_fit_prompt_cuts_what_costs_the_least_evidence():
    """A long question loses its start and the passage stays whole; a long passage loses its
    end and the question stays whole; a question too long even alone keeps its last
    MIN_QUESTION_TOKENS tokens and the passage is cut too."""
    from ffrag_jax.data import text
    from ffrag_jax.rag import MIN_QUESTION_TOKENS, fit_prompt

    corpus = ("patient ward drug doctor case court judge team coach stadium price aisle "
              "which who what is the in of to was for")
    tok = text.train_bpe_tokenizer([corpus] * 20, 300)
    passage, question = "Patient Ab Cd stays in ward G8.", "Which ward is patient Ab Cd in?"
    budget = len(fit_prompt(tok, passage, question, 10_000).ids)

    def length(s):
        return len(tok(s, add_special_tokens=False)["input_ids"])

    long_question = "I would like to know, for my report on the clinic, " + question
    p = fit_prompt(tok, passage, long_question, budget + 6)
    assert p.passage == passage and long_question.endswith(p.question)
    assert p.question != long_question and len(p.ids) <= budget + 6

    long_passage = passage + " The ward is on the second floor of the east wing." * 3
    p = fit_prompt(tok, long_passage, question, budget + 6)
    assert p.question == question and long_passage.startswith(p.passage)
    assert p.passage != long_passage and len(p.ids) <= budget + 6

    huge = "who is the judge " * 100 + question
    p = fit_prompt(tok, long_passage, huge, budget)
    assert length(p.question) == MIN_QUESTION_TOKENS and huge.endswith(p.question)
    assert len(p.ids) <= budget and p.ids == fit_prompt(tok, p.passage, p.question, budget).ids
    assert prompts.prompt({"context": p.passage, "question": p.question}).startswith(
        "Context:")
