"""The reranker: a BERT-family cross-encoder (query and passage in one sequence,
``[CLS] query [SEP] passage [SEP]`` with token types 0/1) and a scoring head on the ``[CLS]``
state, as transformers' ``BertForSequenceClassification`` with one label:
``score = classifier(tanh(pooler(h_cls)))``.

Weights: the encoder from a sentence-transformers or transformers BERT folder through
:data:`ffrag_jax.retrieval.encoder.BERT_KEY_MAP`, the head through :data:`HEAD_KEY_MAP` (the
pooler is in MiniLM's safetensors; a folder without a classifier gets a fresh one, initialised
as transformers does: normal(0.02), zero bias). :func:`save` writes a
``BertForSequenceClassification`` folder (``AutoModelForSequenceClassification`` and
sentence-transformers' ``CrossEncoder`` load it).

Every projection, the head's included, is a ``LoRALinear``: the reranker's adapter is one LoRA
pytree (targets e.g. ``query,value,pooler``: the score layer has one output, too narrow
for a rank above 1, and learns through the pooler), trained per client and aggregated by the
federated strategies exactly like the generator's and the retriever's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from ffrag_jax.errors import UserError
from ffrag_jax.models import hf
from ffrag_jax.models.bert import AdaptedModule, Encoder, EncoderConfig, apply_adapted
from ffrag_jax.retrieval import encoder as encoder_lib

# HF name (without the model's "bert." prefix where it has one) -> Flax path, transposed.
HEAD_KEY_MAP: tuple[tuple[str, str, bool], ...] = (
    ("pooler.dense.weight", "pooler/kernel", True),
    ("pooler.dense.bias", "pooler/bias", False),
)
CLASSIFIER_KEY_MAP: tuple[tuple[str, str, bool], ...] = (
    ("classifier.weight", "score/kernel", True),
    ("classifier.bias", "score/bias", False),
)


class CrossEncoder(AdaptedModule):
    """Relevance logits ``[B]`` of ``[B, T]`` query-passage pairs."""

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids):
        states = Encoder(self.cfg, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                         deterministic=self.deterministic, name="encoder")(
            input_ids, attention_mask, token_type_ids)
        pooled = jnp.tanh(self.linear(self.cfg.hidden_size, "pooler")(states[:, 0]))
        return self.linear(1, "score")(pooled)[:, 0].astype(jnp.float32)


def scores(params: dict, cfg: EncoderConfig, batch: dict, lora=None, *,
           dropout_rng: jax.Array | None = None) -> jax.Array:
    """Logits ``[...]`` of ``batch`` ``{input_ids, attention_mask, token_type_ids}`` (each
    ``[..., T]``: any leading shape, e.g. ``[B, K, T]`` for K passages per question)."""
    lead, length = batch["input_ids"].shape[:-1], batch["input_ids"].shape[-1]
    flat = [batch[k].reshape(-1, length) for k in ("input_ids", "attention_mask",
                                                    "token_type_ids")]
    return apply_adapted(CrossEncoder, params, cfg, lora, dropout_rng, *flat).reshape(lead)


def init_params(rng: jax.Array, cfg: EncoderConfig) -> dict:
    dummy = jnp.zeros((1, 1), jnp.int32)
    return CrossEncoder(cfg).init(rng, dummy, jnp.ones_like(dummy), dummy)["params"]


def load(path: str | os.PathLike | None = None, *, seed: int = 0, dtype: str = "float32"
         ) -> tuple[EncoderConfig, dict, Any]:
    """``(cfg, params, tokenizer)`` of a local BERT-family folder (default: the packaged
    all-MiniLM-L6-v2): a sentence-transformers encoder (a fresh classifier, from ``seed``) or
    a transformers ``BertForSequenceClassification`` with one label (a trained reranker)."""
    from transformers import AutoTokenizer

    folder = hf.check_model_dir(encoder_lib.default_encoder_path() if path is None else path)
    hf_config = hf.read_json(folder / "config.json", "the transformers config")
    labels = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 1))
    if labels != 1 and any("classifier" in n for n in hf.safetensors_files(folder)):
        raise UserError(f"{folder}: a classifier with {labels} labels; a reranker scores "
                        "with one")
    cfg = encoder_lib.config_from_hf(folder, dtype=dtype)
    fresh = traverse_util.flatten_dict(init_params(jax.random.key(seed), cfg), sep="/")
    expected = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in fresh.items()}
    prefix = encoder_lib._prefix(folder)
    np_dtype = hf.numpy_dtype(cfg.param_dtype)
    encoder = hf.read_mapped(folder, list(encoder_lib.BERT_KEY_MAP), cfg.num_layers,
                             {k.removeprefix("encoder/"): v for k, v in expected.items()
                              if k.startswith("encoder/")}, np_dtype, prefix=prefix)
    names = hf.safetensors_files(folder)
    params = {"encoder": encoder}
    for rows, row_prefix in ((HEAD_KEY_MAP, prefix), (CLASSIFIER_KEY_MAP, "")):
        if all(row_prefix + name in names for name, _, _ in rows):
            params.update(hf.read_mapped(folder, list(rows), 0, expected, np_dtype,
                                         prefix=row_prefix))
        else:
            for _, path, _ in rows:
                module, leaf = path.split("/")
                params.setdefault(module, {})[leaf] = fresh[path]
    return cfg, params, AutoTokenizer.from_pretrained(str(folder))


def save(path: str | os.PathLike, cfg: EncoderConfig, params: dict, source: str | os.PathLike,
         *, overwrite: bool = False) -> Path:
    """``params`` as a transformers ``BertForSequenceClassification`` folder with one label
    (weights in HF names, the ``source`` folder's config and tokenizer files)."""
    source = hf.check_model_dir(source)
    folder = hf.prepare_output_dir(path, overwrite)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    config = hf.read_json(source / "config.json", "the transformers config")
    config.update(architectures=["BertForSequenceClassification"], num_labels=1,
                  id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    params = jax.device_get(params)
    tensors = dict(hf.mapped_tensors(list(encoder_lib.BERT_KEY_MAP), params["encoder"],
                                     prefix="bert."))
    tensors.update(hf.mapped_tensors(list(HEAD_KEY_MAP), params, prefix="bert."))
    tensors.update(hf.mapped_tensors(list(CLASSIFIER_KEY_MAP), params))
    hf.write_safetensors(folder, tensors)
    return folder


def tokenize_pairs(tokenizer, queries: Sequence[str], passages: Sequence[str], max_len: int,
                   *, where: str = "reranker") -> dict[str, np.ndarray]:
    """``{input_ids, attention_mask, token_type_ids}`` ``[N, max_len]`` of query-passage
    pairs. A pair longer than ``max_len`` loses the end of its passage (and of its query too
    when the query alone fills three quarters of the window), with one warning saying how
    many pairs were cut."""
    if len(queries) != len(passages):
        raise UserError(f"{where}: {len(queries)} queries for {len(passages)} passages")
    if not queries:
        return {k: np.zeros((0, max_len), np.int32)
                for k in ("input_ids", "attention_mask", "token_type_ids")}
    q_len = [len(x) for x in tokenizer(list(queries), add_special_tokens=False)["input_ids"]]
    p_len = [len(x) for x in tokenizer(list(passages), add_special_tokens=False)["input_ids"]]
    cut = sum(q + p + 3 > max_len for q, p in zip(q_len, p_len, strict=True))  # [CLS] [SEP] [SEP]
    if cut:
        logging.warning("%s: %d of %d query-passage pairs are longer than the cross-encoder's "
                        "%d tokens; the passages are cut from their end", where, cut,
                        len(q_len), max_len)
    # The passage loses tokens from its end; a query too long to leave room for a quarter of
    # the window is cut too (longest side first).
    out = {k: np.zeros((len(queries), max_len), np.int32)
           for k in ("input_ids", "attention_mask", "token_type_ids")}
    for strategy, rows in (("only_second", [i for i, n in enumerate(q_len)
                                            if n + 3 <= max_len - max_len // 4]),
                           ("longest_first", [i for i, n in enumerate(q_len)
                                              if n + 3 > max_len - max_len // 4])):
        if not rows:
            continue
        enc = tokenizer([queries[i] for i in rows], [passages[i] for i in rows],
                        truncation=strategy, max_length=max_len, padding="max_length",
                        return_tensors="np")
        for k in out:
            out[k][rows] = enc[k]
    return out


def retriever_prior(retriever_scores: np.ndarray, valid: np.ndarray, scale: float
                    ) -> np.ndarray:
    """The residual reranker's prior ``[..., K]``: ``scale`` x the retriever's scores of a
    question's candidates, centred on their mean over the valid ones (0 where not valid).

    The reranker's score of a candidate is this prior plus the cross-encoder's logit, in
    training and at inference: a fresh head (logits ~ 0) keeps the retriever's order, and the
    cross-encoder learns only where the generator's preferences differ from it. Centring keeps
    the point-wise loss's sigmoid off saturation (the ranking losses ignore a row's shift)."""
    valid = np.asarray(valid, bool)
    s = np.where(valid, np.asarray(retriever_scores, np.float32), 0.0)
    mean = s.sum(-1, keepdims=True) / np.maximum(valid.sum(-1, keepdims=True), 1)
    return np.where(valid, scale * (s - mean), 0.0).astype(np.float32)


@dataclasses.dataclass
class Reranker:
    """A cross-encoder ready to score: config, weights, tokenizer, its adapter and window;
    ``prior_scale`` > 0: a residual reranker over the retriever's scores
    (:func:`retriever_prior`)."""

    cfg: EncoderConfig
    params: dict
    tokenizer: Any
    lora: Any = None
    max_len: int = 128
    prior_scale: float = 0.0

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, max_len: int = 128,
             seed: int = 0, prior_scale: float = 0.0) -> Reranker:
        cfg, params, tokenizer = load(path, seed=seed)
        return cls(cfg, params, tokenizer, None, min(max_len, cfg.max_position_embeddings),
                   prior_scale)

    def with_prior(self, logits: np.ndarray, retriever_scores: np.ndarray | None,
                   valid: np.ndarray) -> np.ndarray:
        """The reranking scores ``[..., K]``: ``logits`` plus the :func:`retriever_prior` of
        ``retriever_scores`` (needed when ``prior_scale`` > 0)."""
        if self.prior_scale <= 0:
            return logits
        if retriever_scores is None:
            raise UserError("this reranker is residual (prior_scale "
                            f"{self.prior_scale:g}): it needs the retriever's scores")
        return logits + retriever_prior(retriever_scores, valid, self.prior_scale)

    def score(self, query: str, passages: Sequence[str], *, batch_size: int = 64
              ) -> np.ndarray:
        """Logits ``[len(passages)]`` of ``passages`` for ``query`` (an empty list: empty)."""
        return self.score_pairs([query] * len(passages), passages, batch_size=batch_size)

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], *,
                    batch_size: int = 64) -> np.ndarray:
        """Logits ``[N]`` of ``N`` query-passage pairs, in batches of ``batch_size`` (the
        last one padded) and as wide as the longest pair (rounded up to 16 tokens): a few
        compiled shapes, little padding."""
        enc = tokenize_pairs(self.tokenizer, queries, passages, self.max_len)
        if len(queries):  # padding columns cut: the longest pair, up to a multiple of 16
            width = int(enc["attention_mask"].sum(1).max())
            width = min(-(-width // 16) * 16, self.max_len)
            enc = {k: v[:, :width] for k, v in enc.items()}
        n = len(queries)
        out = np.zeros((n,), np.float32)
        for start in range(0, n, batch_size):
            rows = {k: v[start : start + batch_size] for k, v in enc.items()}
            real = len(rows["input_ids"])
            if real < batch_size:
                rows = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - real, 0)])
                        for k, v in rows.items()}
            out[start : start + real] = np.asarray(
                _scores_jit(self.params, self.cfg, rows, self.lora))[:real]
        return out

    def rerank(self, query: str, passages: Sequence[str]) -> list[int]:
        """The indices of ``passages`` best first (stable for ties; empty: empty)."""
        return [int(i) for i in np.argsort(-self.score(query, passages), kind="stable")]


_scores_jit = jax.jit(scores, static_argnames="cfg")
