"""Hugging Face interop: local Llama folders <-> (LlamaConfig, Flax params), without torch.

The weights are read straight from safetensors (sharded index included) and mapped through
one declarative table, :data:`LLAMA_KEY_MAP`: HF tensor name -> Flax param path, plus whether
the tensor is transposed (HF ``nn.Linear`` stores ``[out, in]``, Flax kernels are
``[in, out]``). ``{layer}`` rows are stacked along the leading ``[L]`` axis of the scanned
layers. :func:`save_llama` uses the same table backwards.

Nothing is downloaded: every path must be a local folder, and problems with it raise
:class:`~ffrag_jax.errors.UserError` naming the path and what is wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ffrag_jax import files
from ffrag_jax.errors import UserError
from ffrag_jax.models.llama import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, LlamaConfig, init_params

# HF name -> (Flax path, transposed). Rows whose Flax path the model does not have (lm_head when
# embeddings are tied, biases when the config has none) are skipped.
LLAMA_KEY_MAP: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    ("model.norm.weight", "norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
    ("model.layers.{layer}.input_layernorm.weight", "layers/input_layernorm/scale", False),
    (
        "model.layers.{layer}.post_attention_layernorm.weight",
        "layers/post_attention_layernorm/scale",
        False,
    ),
    *(
        (f"model.layers.{{layer}}.self_attn.{p}.{kind}", f"layers/self_attn/{p}/{leaf}", t)
        for p in ATTENTION_PROJECTIONS
        for kind, leaf, t in (("weight", "kernel", True), ("bias", "bias", False))
    ),
    *(
        (f"model.layers.{{layer}}.mlp.{p}.{kind}", f"layers/mlp/{p}/{leaf}", t)
        for p in MLP_PROJECTIONS
        for kind, leaf, t in (("weight", "kernel", True), ("bias", "bias", False))
    ),
)

_DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}
MAX_SHARD_BYTES = 4 << 30


def numpy_dtype(name: str):
    if name not in _DTYPES:
        raise UserError(f"unsupported dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def expected_param_shapes(cfg: LlamaConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat ``{'a/b/c': ShapeDtypeStruct}`` of the params a model with ``cfg`` has."""
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    return traverse_util.flatten_dict(shapes, sep="/")


def key_map(cfg: LlamaConfig) -> list[tuple[str, str, bool]]:
    """The rows of :data:`LLAMA_KEY_MAP` that apply to a model with ``cfg``."""
    present = expected_param_shapes(cfg)
    return [row for row in LLAMA_KEY_MAP if row[1] in present]


# --------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: dict, *, dtype: str | None = None, param_dtype: str | None = None):
    """LlamaConfig from a transformers ``config.json`` dict (4.x or 5.x rope fields)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"hidden_act {act!r} is not supported (Llama uses 'silu')")
    rope_parameters = hf.get("rope_parameters")  # transformers 5.x
    if rope_parameters:
        scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        theta = rope_parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
    else:  # transformers 4.x
        scaling = dict(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", 10000.0)
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    stored = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    param_dtype = param_dtype or stored
    eos = hf.get("eos_token_id")
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or 0,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        dtype=dtype or param_dtype,
        param_dtype=param_dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(cfg: LlamaConfig) -> dict:
    """A transformers ``config.json`` dict. Rope is written in the 4.x form (``rope_theta``,
    ``rope_scaling``), which transformers 4.x reads and 5.x converts on load."""
    eos = cfg.eos_token_id
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling_dict or None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": cfg.param_dtype,
        "dtype": cfg.param_dtype,
    }


# --------------------------------------------------------------------------------------------
# Reading


def read_json(path: Path, what: str) -> dict:
    """The JSON at ``path``; a missing or malformed file is a one-line UserError."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path.parent}: {path.name} is missing ({what})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def check_model_dir(path: str | os.PathLike) -> Path:
    """The folder as a Path, or a UserError if it is not an existing local folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"model folder {folder} does not exist (only local folders are read)")
    if not folder.is_dir():
        raise UserError(f"model path {folder} is a file, not a folder")
    return folder


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike):
    """``safe_open(path)`` whose damage (a truncated or corrupt file, an unreadable one) is
    one UserError naming the file, also when a tensor is read inside the block."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: damaged safetensors file ({e}); re-save or re-export it"
                        ) from None


def safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (sharded index or single file)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "sharded safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: has no 'weight_map'")
        where = {name: folder / fname for name, fname in weight_map.items()}
        for f in set(where.values()):
            if not f.exists():
                raise UserError(f"{folder}: shard {f.name} named in {index.name} is missing")
        return where
    single = folder / "model.safetensors"
    if not single.exists():
        others = sorted(p.name for p in folder.glob("*.bin")) or ["nothing"]
        raise UserError(
            f"{folder}: no model.safetensors or model.safetensors.index.json "
            f"(found {', '.join(others)}; re-save with save_pretrained(safe_serialization=True))"
        )
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)


class _TensorReader:
    """Reads named tensors from a set of safetensors files, keeping each file open once."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._open = {}
        self._stack = contextlib.ExitStack()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(open_safetensors(path))
        try:
            return self._open[path].get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"{path}: damaged safetensors file ({e}); re-save or re-export "
                            "it") from None

    def close(self):
        self._open.clear()
        self._stack.close()


def load_llama(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
) -> tuple[LlamaConfig, dict]:
    """Reads a local HF Llama folder. Returns ``(cfg, params)``.

    ``param_dtype`` defaults to the dtype in config.json; ``dtype`` (compute) to ``param_dtype``.
    """
    folder = check_model_dir(path)
    hf = read_json(folder / "config.json", "the model's transformers config")
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise UserError(f"{folder}/config.json: model_type is {model_type!r}, expected 'llama'")
    try:
        cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)
    except KeyError as e:
        raise UserError(f"{folder}/config.json: required field {e.args[0]!r} is missing") from None
    params = read_mapped(folder, key_map(cfg), cfg.num_layers, expected_param_shapes(cfg),
                         numpy_dtype(cfg.param_dtype))
    return cfg, params


def read_mapped(
    folder: Path,
    rows: list[tuple[str, str, bool]],
    num_layers: int,
    expected: dict[str, jax.ShapeDtypeStruct],
    np_dtype,
    *,
    prefix: str = "",
) -> dict:
    """Nested params read from the safetensors of ``folder`` through key-map ``rows`` (HF name
    -> Flax path + transpose; ``{layer}`` names stacked over ``num_layers``), checked against
    the ``expected`` flat shapes. ``prefix`` is put before every HF name (``"bert."``)."""
    reader = _TensorReader(safetensors_files(folder))
    flat = {}
    try:
        for hf_name, flax_path, transpose in rows:
            stacked = "{layer}" in hf_name
            names = [prefix + hf_name.format(layer=i)
                     for i in (range(num_layers) if stacked else [None])]
            tensors = []
            for name in names:
                if name not in reader:
                    raise UserError(f"{folder}: tensor {name!r} is missing from the safetensors")
                t = reader.get(name)
                tensors.append(t.T if transpose else t)
            value = np.stack(tensors) if stacked else tensors[0]
            want = expected[flax_path].shape
            if value.shape != want:
                raise UserError(
                    f"{folder}: tensor {names[0]!r} has shape {value.shape} after mapping, "
                    f"config.json implies {want}"
                )
            flat[flax_path] = jnp.asarray(value.astype(np_dtype))
    finally:
        reader.close()
    return traverse_util.unflatten_dict(flat, sep="/")


# --------------------------------------------------------------------------------------------
# Writing


def prepare_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Creates ``path``; refuses a non-empty folder unless ``overwrite``."""
    folder = Path(path).expanduser()
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"{folder} is not empty; pass overwrite=True to replace its files")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def hf_tensors(cfg: LlamaConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy tensor) pairs for ``params``, via :data:`LLAMA_KEY_MAP` reversed."""
    return mapped_tensors(key_map(cfg), params)


def mapped_tensors(rows: list[tuple[str, str, bool]], params: dict, *, prefix: str = ""
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy tensor) pairs for ``params`` through key-map ``rows`` backwards."""
    flat = traverse_util.flatten_dict(params, sep="/")
    for hf_name, flax_path, transpose in rows:
        value = np.asarray(jax.device_get(flat[flax_path]))
        layers = enumerate(value) if "{layer}" in hf_name else [(None, value)]
        for i, t in layers:
            yield prefix + hf_name.format(layer=i), np.ascontiguousarray(t.T if transpose else t)


def write_safetensors(folder: Path, tensors: dict[str, np.ndarray], stem: str = "model") -> None:
    """``stem.safetensors``, or shards plus ``stem.safetensors.index.json`` past 4 GiB."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    metadata = {"format": "pt"}  # transformers refuses safetensors without a format tag
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{stem}.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files.atomic_write_json(folder / f"{stem}.safetensors.index.json", index)


def save_llama(
    path: str | os.PathLike,
    cfg: LlamaConfig,
    params: dict,
    *,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Writes an HF folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    folder = prepare_output_dir(path, overwrite)
    tensors = dict(hf_tensors(cfg, params))
    write_safetensors(folder, tensors)
    files.atomic_write_json(folder / "config.json", config_to_hf(cfg))
    files.atomic_write_json(folder / "generation_config.json", {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "do_sample": False})
    if tokenizer is not None:
        # Unset, transformers reports 1e30 and never truncates; the positions end here.
        tokenizer.model_max_length = cfg.max_position_embeddings
        tokenizer.save_pretrained(str(folder))
    return folder


# --------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(path: str | os.PathLike, *, pad_to_eos: bool = False):
    """``transformers.AutoTokenizer`` from a local folder; it must have a pad token.

    With ``pad_to_eos=True`` a tokenizer without one pads with its EOS token (a common choice
    for Llama tokenizers, which ship without a pad token).
    """
    from transformers import AutoTokenizer

    folder = check_model_dir(path)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"{folder}: no tokenizer.json or tokenizer_config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token is None:
        if pad_to_eos and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise UserError(
                f"tokenizer in {folder} has no pad token; set one in its tokenizer_config.json "
                "or pass pad_to_eos=True (config: model.pad_to_eos=True)"
            )
    return tokenizer

