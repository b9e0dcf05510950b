"""Decoding and the MMLU harness: sampling filters and greedy decoding against transformers,
the reference's answer matching and macro average, and the harness end to end."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ffrag_jax.data import text
from ffrag_jax.errors import UserError
from ffrag_jax.evaluation import mmlu
from ffrag_jax.models import hf, lora
from ffrag_jax.models.generate import filter_logits, generate
from ffrag_jax.models.llama import forward, forward_cached, init_cache

MMLU_FILE = Path(__file__).parents[2] / "shared/data/mmlu-1444/mmlu_test_1444.jsonl"


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.2, 30, 0.6), (1.0, 5, 1.0),
                                                     (0.7, 0, 0.9), (1.3, 50, 0.3)])
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(0).normal(0, 3, (6, 200)).astype(np.float32)
    ref = torch.as_tensor(logits)
    ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ref = ref.numpy()
    ours = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    assert np.isinf(ours).any() == (top_k > 0 or top_p < 1)
    keep = ~np.isinf(ref)
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-6)


def test_greedy_generate_matches_transformers(hf_llama_dir):
    from transformers import LlamaForCausalLM

    folder = hf_llama_dir("gqa_untied_llama3")
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    cfg, params = hf.load_llama(folder)
    prompts = np.random.default_rng(1).integers(3, 128, (3, 10))
    lens = np.array([10, 7, 4])
    ids = np.where(np.arange(10) < lens[:, None], prompts, 0).astype(np.int32)
    ours = np.asarray(generate(params, cfg, ids, lens, 12))
    for row, n in enumerate(lens):
        with torch.no_grad():
            ref = model.generate(torch.as_tensor(prompts[row : row + 1, :n]), do_sample=False,
                                 max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
        np.testing.assert_array_equal(ours[row], ref[0, n:].numpy())


def test_cached_decoding_gives_the_logits_of_a_full_forward(hf_llama_dir):
    """Prefill of right-padded prompts, then one token at a time at ``prompt_len + t``: every
    step's logits equal those of the uncached forward over the sequence so far (GQA, a LoRA
    on all projections), so the padding slots never leak into the real rows."""
    cfg, params = hf.load_llama(hf_llama_dir("gqa_untied_llama3"))
    adapter = lora.init(jax.random.key(0), params, "q_proj,k_proj,v_proj,o_proj,gate_proj", 4, 8.0)
    adapter = adapter.replace(weights=jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter.weights))
    rng = np.random.default_rng(2)
    lens, width, steps = np.array([9, 3, 6]), 9, 5
    seqs = rng.integers(3, 128, (3, width + steps)).astype(np.int32)
    prompts = np.where(np.arange(width) < lens[:, None], seqs[:, :width], 0)
    cache = init_cache(cfg, 3, width + steps)
    positions = np.broadcast_to(np.arange(width), (3, width))
    logits, cache = forward_cached(params, cfg, prompts, positions, cache, adapter)
    rows = np.arange(3)
    got = [np.asarray(logits[rows, lens - 1])]
    for t in range(steps):  # teacher-forced: token t of the continuation at prompt_len + t
        token = seqs[rows, lens + t][:, None]
        logits, cache = forward_cached(params, cfg, token, (lens + t)[:, None], cache, adapter)
        got.append(np.asarray(logits[:, 0]))
    for b, n in enumerate(lens):
        full = np.asarray(forward(params, cfg, seqs[b : b + 1, : n + steps], lora=adapter))[0]
        want = full[n - 1 : n + steps]
        np.testing.assert_allclose(np.stack([g[b] for g in got]), want, atol=2e-5, rtol=1e-5)


def test_sampling_is_seeded_and_top_k_1_is_greedy(hf_llama_dir):
    cfg, params = hf.load_llama(hf_llama_dir("mha_tied"))
    ids = np.random.default_rng(2).integers(3, 128, (4, 8)).astype(np.int32)
    lens = np.full(4, 8)
    key = jax.random.key(0)
    sample = lambda k, **kw: np.asarray(generate(params, cfg, ids, lens, 10, None, k, **kw))
    a = sample(key, temperature=1.5)
    np.testing.assert_array_equal(a, sample(key, temperature=1.5))
    assert (a != sample(jax.random.key(1), temperature=1.5)).any()
    np.testing.assert_array_equal(sample(key, temperature=1.5, top_k=1),
                                  np.asarray(generate(params, cfg, ids, lens, 10)))


def test_the_abstain_gate_decides_the_first_token_on_the_abstentions_probability(hf_llama_dir):
    """``abstain=(token, threshold)``: the first token is the abstention exactly when its
    probability (from a full forward) reaches the threshold, else the best other token; the
    tokens after it follow greedily from there."""
    cfg, params = hf.load_llama(hf_llama_dir("mha_tied"))
    rng = np.random.default_rng(3)
    lens = np.array([8, 5, 7, 6])
    ids = np.where(np.arange(8) < lens[:, None], rng.integers(3, 128, (4, 8)), 0).astype(np.int32)
    # One causal forward over the right-padded batch: position n - 1 sees no padding.
    last = np.asarray(forward(params, cfg, ids))[np.arange(4), lens - 1]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(last), -1))
    token = int(np.argsort(probs[0])[-2])  # second likeliest for row 0
    threshold = float(np.median(probs[:, token]))  # some rows above, some below
    out = np.asarray(generate(params, cfg, ids, lens, 4, abstain=(token, threshold)))
    masked = last.copy()
    masked[:, token] = -np.inf
    want = np.where(probs[:, token] >= threshold, token, masked.argmax(-1))
    assert 0 < (want == token).sum() < 4
    np.testing.assert_array_equal(out[:, 0], want)
    plain = np.asarray(generate(params, cfg, ids, lens, 4))
    same_start = out[:, 0] == plain[:, 0]
    np.testing.assert_array_equal(out[same_start], plain[same_start])
    with pytest.raises(UserError, match="needs 'insufficient evidence' as one token"):
        from ffrag_jax.evaluation.boundary import abstain_gate
        from ffrag_jax.rerank.cross_encoder import load as load_ce

        abstain_gate(load_ce(None)[2], 0.5)
    with pytest.raises(UserError, match=r"abstain_threshold must be in \(0, 1\], got 1.5"):
        abstain_gate(load_ce(None)[2], 1.5)


def _items():
    return [
        {"instruction": "q", "input": "Qusetion: x? Options: A. red, B. blue", "class": "art",
         "output": "The answer is: B. blue"},
        {"instruction": "q", "input": "Qusetion: y? Options: A. one, B. two", "class": "art",
         "output": "The answer is: A. one"},
        {"instruction": "q", "input": "Qusetion: z? Options: A. up, B. down", "class": "law",
         "output": "The answer is: B. down. It falls"},
    ]


def test_mmlu_matching_and_macro_average():
    items = _items()
    # letter with a dot, or the option text, anywhere in the response; a bare letter is not
    # enough (the reference's rule).
    assert mmlu.is_correct("The answer is: B. something", items[0]["output"])
    assert mmlu.is_correct("The answer is: it is blue", items[0]["output"])
    assert not mmlu.is_correct("The answer is: B", items[0]["output"])
    assert mmlu.target(items[2]["output"]) == ("B", "down")
    assert mmlu.prompt(items[0]).endswith("### Response:\nThe answer is: ")
    result = mmlu.score(items, ["B. blue", "B. two", "down"])
    assert result["per_subject"] == {"art": 0.5, "law": 1.0}
    assert result["macro"] == pytest.approx(0.75) and result["micro"] == pytest.approx(2 / 3)


@pytest.mark.skipif(not MMLU_FILE.is_file(), reason="shared MMLU-1444 file not present")
def test_mmlu_file_loads_and_gold_answers_score_one():
    items = mmlu.load(MMLU_FILE)
    assert len(items) == 1444 and len({i["class"] for i in items}) == 57
    gold = [i["output"].replace(mmlu.RESPONSE_PREFIX, "") for i in items]
    assert mmlu.score(items, gold)["macro"] == 1.0
    assert mmlu.score(items, ["no idea"] * len(items))["macro"] == 0.0
    assert len(mmlu.load(MMLU_FILE, limit=2)) == 57 * 2


def test_mmlu_bad_files_name_the_culprit(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text('[{"instruction": "q", "input": "i", "output": "A", "class": "c"}]')
    with pytest.raises(UserError, match=r"m.json: item 0: output 'A'"):
        mmlu.load(bad)
    bad.write_text('[{"instruction": "q"}]')
    with pytest.raises(UserError, match=r"item 0 lacks \['input', 'output', 'class'\]"):
        mmlu.load(bad)
    with pytest.raises(UserError, match="MMLU file not found"):
        mmlu.load(tmp_path / "missing.json")


def test_mmlu_harness_runs_on_a_tiny_model(hf_llama_dir):
    items = _items() * 3
    tokenizer = text.train_bpe_tokenizer([mmlu.prompt(i) + i["output"] for i in items], 128)
    cfg, params = hf.load_llama(hf_llama_dir("mha_tied"))
    run = lambda seed: mmlu.evaluate(params, cfg, tokenizer, items, jax.random.key(seed),
                                     batch_size=4)
    result = run(0)
    assert result["count"] == 9 and set(result["per_subject"]) == {"art", "law"}
    assert 0.0 <= result["macro"] <= 1.0
    assert result == run(0)
