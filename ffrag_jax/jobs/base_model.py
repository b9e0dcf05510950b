"""The base model of a job: its tokenizer, its config and (for the tiny model) pretraining.

A job either names a local HF checkpoint (``model.path``: its tokenizer and weights are used
as they are) or describes a tiny Llama in ``config.model`` that is trained from scratch on a
synthetic base domain (``config.pretrain``) with a BPE tokenizer trained on the job's text.
"""

from __future__ import annotations

from pathlib import Path

import jax
from ml_collections import ConfigDict

from ffrag_jax.data import text
from ffrag_jax.errors import UserError
from ffrag_jax.models import hf
from ffrag_jax.models.llama import LlamaConfig, init_params
from ffrag_jax.rag import prompts
from ffrag_jax.training import checkpoint, workdir
from ffrag_jax.training.loop import train_phase
from ffrag_jax.training.metrics import MetricsLog

PACKAGED = "packaged:"  # tokenizer.path = "packaged:demo": a tokenizer shipped in the package


def tokenizer_path(config: ConfigDict) -> str | None:
    """``tokenizer.path``, or None to train one; ``--config.tokenizer.path=None`` arrives as
    the string "None" (a flag's value is text), and means None too."""
    path = config.tokenizer.get("path")
    return None if path in (None, "", "None", "none") else path


def tokenizer_folder(path: str) -> Path:
    """A tokenizer folder: ``packaged:NAME`` (``ffrag_jax/tokenizers/NAME``), or a path; a
    UserError unless it holds a ``tokenizer.json``."""
    if path.startswith(PACKAGED):
        folder = Path(__file__).parents[1] / "tokenizers" / path[len(PACKAGED):]
        if not folder.is_dir():
            shipped = sorted(p.name for p in folder.parent.iterdir() if p.is_dir())
            raise UserError(f"tokenizer.path={path!r}: no such packaged tokenizer; packaged: "
                            f"{', '.join(PACKAGED + n for n in shipped)}")
    else:
        folder = Path(path).expanduser()
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"tokenizer.path={path}: no tokenizer.json in {folder}")
    return folder


def run_tokenizer(config: ConfigDict, workdir: Path, texts):
    """The tokenizer of ``model.path``; else the one at ``tokenizer.path`` (the demo ships
    its own, so a fresh install reads the same tokens whatever ``tokenizers`` version pip
    picks); else a BPE trained on ``texts`` (an iterable, consumed only when training). The
    tiny model's tokenizer is kept in ``workdir/tokenizer`` so that a resumed run reuses it."""
    if config.model.path:
        return hf.load_tokenizer(config.model.path, pad_to_eos=config.model.pad_to_eos)
    folder = workdir / "tokenizer"
    if tokenizer_path(config):
        tokenizer = _with_added(config, hf.load_tokenizer(
            tokenizer_folder(tokenizer_path(config))))
        if not (folder / "tokenizer.json").exists():
            tokenizer.save_pretrained(str(folder))
        return tokenizer
    if (folder / "tokenizer.json").exists():  # resuming: the exact tokenizer of the first run
        return hf.load_tokenizer(folder)
    tokenizer = _with_added(config, text.train_bpe_tokenizer(texts, config.tokenizer.vocab_size))
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _with_added(config: ConfigDict, tokenizer):
    """The tiny model's tokenizer with ``tokenizer.added_tokens`` (comma-separated) as whole
    tokens: the knowledge boundary's tags and abstention are then one token each to learn,
    not a spelling (each absorbs the space before it)."""
    from tokenizers import AddedToken

    added = [t.strip() for t in (config.tokenizer.get("added_tokens") or "").split(",")
             if t.strip()]
    if added:
        tokenizer.add_tokens([AddedToken(t, lstrip=True, normalized=False) for t in added])
    return tokenizer


def _tiny_config(m: ConfigDict, vocab_size: int, tokenizer=None) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat=m.remat,
        attention=m.attention,
        **({} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id,
                                             pad_token_id=tokenizer.pad_token_id)),
    )


def model_config(config: ConfigDict, tokenizer) -> tuple[LlamaConfig, dict | None]:
    """``(cfg, params)`` of the local checkpoint at ``model.path``, or ``(cfg, None)`` for the
    tiny Llama that ``config.model`` describes (the caller initialises or pretrains it)."""
    m = config.model
    if m.path:
        cfg, params = hf.load_llama(m.path, dtype=m.dtype, param_dtype=m.param_dtype)
        check_vocab(tokenizer, cfg, m.path)
        return cfg.replace(remat=m.remat, attention=m.attention), params
    return _tiny_config(m, len(tokenizer), tokenizer), None


def abstract_model(config: ConfigDict) -> tuple[LlamaConfig, dict]:
    """The base model's config and parameter shapes (no weights read, nothing trained): of the
    checkpoint's ``config.json`` at ``model.path``, or of the tiny model at the tokenizer's
    target vocabulary. Jobs check adapter settings against these before writing anything."""
    m = config.model
    if m.path:
        folder = hf.check_model_dir(m.path)
        cfg = hf.config_from_hf(hf.read_json(folder / "config.json", "the model's config"))
        check_vocab(hf.load_tokenizer(folder, pad_to_eos=m.pad_to_eos), cfg, folder)
    else:
        if tokenizer_path(config):
            tokenizer_folder(tokenizer_path(config))  # checked before any work
        if config.pretrain.steps > 0:
            pretrained_run(config)  # checked before any work
        added = [t for t in (config.tokenizer.get("added_tokens") or "").split(",") if t.strip()]
        cfg = _tiny_config(m, config.tokenizer.vocab_size + len(added))
    return cfg, jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))


def check_vocab(tokenizer, cfg: LlamaConfig, where) -> None:
    """Token ids past the embedding table read garbage (NaN losses on CPU, silent on GPU)."""
    if len(tokenizer) > cfg.vocab_size:
        raise UserError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's "
                        f"vocab_size is {cfg.vocab_size}; use the tokenizer the model was "
                        "trained with")


def check_lengths(cfg: LlamaConfig, lengths: dict[str, int]) -> None:
    """A UserError naming the first config length (``{"data.max_len": 512}``) that the model's
    positions cannot hold."""
    for name, value in lengths.items():
        if value > cfg.max_position_embeddings:
            raise UserError(f"{name}={value} exceeds the model's "
                            f"max_position_embeddings={cfg.max_position_embeddings}")


def check_rag_models(config: ConfigDict) -> dict:
    """The checks every RAG job shares, on shapes only: the reader's positions hold
    ``rag.prompt_len + rag.answer_len``, and ``retriever.path`` (if given) is a model folder.
    Returns the reader's abstract params (for adapter checks)."""
    cfg, shapes = abstract_model(config)
    r = config.rag
    check_lengths(cfg, {"rag.prompt_len + rag.answer_len": r.prompt_len + r.answer_len})
    if config.retriever.path:
        hf.check_model_dir(config.retriever.path)
    return shapes


# The settings a pretrained base depends on (pretrain.from_run must agree on all of them):
# what is pretrained (task, model, tokenizer), on what (data, boundary: the reading examples)
# and how (pretrain, seed: the initial weights and the batches).
PRETRAIN_INPUTS = ("task", "seed", "model", "tokenizer", "data", "boundary", "pretrain")


def pretrained_run(config: ConfigDict) -> Path | None:
    """The checkpoint folder of ``pretrain.from_run`` (a finished run whose pretrained base
    this run reuses), checked to hold this run's base; None when the option is unset. A run
    that itself reused a base leads to the run that pretrained it."""
    source = config.pretrain.get("from_run")
    if not source:
        return None
    ours = workdir.resolved_config(config)

    def inputs(c: dict) -> dict:
        return {k: {**c.get(k, {}), "from_run": None} if k == "pretrain"
                else c.get(k, "<absent>") for k in PRETRAIN_INPUTS}

    seen = []
    while True:
        folder = Path(source).expanduser()
        where = " <- ".join(f"pretrain.from_run={s}" for s in [*seen, source])
        try:
            theirs = hf.read_json(folder / "config.json", "the run's config")
        except UserError:
            raise UserError(f"{where}: not an ffrag_jax run folder (no readable config.json)"
                            ) from None
        diff = workdir.first_difference(inputs(theirs), inputs(ours))
        if diff:
            raise UserError(f"{where}: that run pretrained another base ({diff}); its base "
                            "would not be this run's")
        done = checkpoint.latest_steps(folder / "checkpoints").get("pretrain")
        if done == config.pretrain.steps:
            return folder / "checkpoints"
        earlier = theirs.get("pretrain", {}).get("from_run")
        if done is None and earlier and earlier not in seen and len(seen) < 8:
            seen.append(source)  # that run reused a base too: follow it to its pretraining
            source = earlier
            continue
        raise UserError(f"{where}: its pretraining has not finished (step {done or 0} of "
                        f"{config.pretrain.steps}); finish that run first")


def encode_synthetic(tokenizer, examples: list[dict], max_len: int, response_only: bool):
    """Synthetic examples as training arrays ``[N, max_len]`` (:func:`text.encode_pairs`)."""
    return text.encode_pairs(tokenizer, [prompts.prompt(e) for e in examples],
                             [prompts.response(e) for e in examples], max_len,
                             response_only=response_only)


def pretrain(config: ConfigDict, cfg: LlamaConfig, tokenizer, examples: list[dict], *,
             init_rng: jax.Array, rng: jax.Array, max_len: int, mesh: jax.sharding.Mesh,
             ckpt_dir: Path, metrics: MetricsLog) -> dict:
    """A tiny Llama initialised from ``init_rng`` and trained on the synthetic ``examples``
    for ``config.pretrain.steps`` steps (the resumable ``pretrain`` phase, full-parameter).
    With ``pretrain.from_run``, that run's final pretrain checkpoint, restored: the phase
    resumes at its last step and writes nothing there."""
    ckpt_dir = pretrained_run(config) or ckpt_dir
    params = init_params(init_rng, cfg)
    (data,) = text.trim_padding(
        [encode_synthetic(tokenizer, examples, max_len, config.pretrain.response_only)], max_len)
    return train_phase(
        "pretrain", cfg=cfg, trainable=params, frozen=None, mode="full", data=data,
        phase=config.pretrain, rng=rng, mesh=mesh, ckpt_dir=ckpt_dir, metrics=metrics,
        log_every=config.log_every, checkpoint_every=config.checkpoint_every)
