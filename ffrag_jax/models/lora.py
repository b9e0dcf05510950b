"""Functional LoRA: adapters are their own pytree, never mixed into the frozen params.

A :class:`LoRA` holds ``weights``, a nested dict with the same paths as the projections it
adapts (``layers/self_attn/q_proj``) and leaves ``a`` ``[L, in, r]`` and ``b`` ``[L, r, out]``
(``[in, r]`` / ``[r, out]`` for unstacked modules), plus static metadata (``scale``,
``dropout``, ``use_rslora``) that jit treats as constants. It is the unit that clients train,
send and the server aggregates; gradients and optimizer state are taken over it alone.

:func:`forward <ffrag_jax.models.llama.forward>` applies it as
``y = x W + scale * dropout(x) a b`` (as PEFT does), :func:`merge` folds it into the params,
and :func:`load_peft_adapter` / :func:`save_peft_adapter` move adapters to and from PEFT's
``adapter_config.json`` + ``adapter_model.safetensors`` format.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from ffrag_jax import files
from ffrag_jax.errors import UserError
from ffrag_jax.models import hf
from ffrag_jax.models.llama import LINEAR_MODULES, LlamaConfig


@struct.dataclass
class LoRA:
    """LoRA weights (a pytree) and their static hyper-parameters."""

    weights: dict
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    use_rslora: bool = struct.field(pytree_node=False, default=False)

    @property
    def targets(self) -> tuple[str, ...]:
        """Module names that carry an adapter (``('q_proj', 'v_proj')``)."""
        return tuple(sorted({path[-1] for path in module_weights(self.weights)}))

    @property
    def ranks(self) -> dict[str, int]:
        modules = module_weights(self.weights)
        return {"/".join(p): int(ab["a"].shape[-1]) for p, ab in modules.items()}

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.weights))


def module_weights(weights: dict) -> dict[tuple[str, ...], dict]:
    """``{module path: {'a': ..., 'b': ...}}`` of a LoRA weights tree."""
    flat = traverse_util.flatten_dict(weights)
    out: dict[tuple[str, ...], dict] = {}
    for path, leaf in flat.items():
        out.setdefault(path[:-1], {})[path[-1]] = leaf
    return out


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Module names from ``'all-linear'``, a comma-separated string or a sequence."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return LINEAR_MODULES
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return tuple(targets)


def init(
    rng: jax.Array,
    params: dict,
    targets: str | Sequence[str],
    rank: int,
    alpha: float,
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
    dtype=jnp.float32,
) -> LoRA:
    """A fresh LoRA for the kernels of ``params`` whose module name is in ``targets``.

    As in PEFT: ``a`` is kaiming-uniform with ``a=sqrt(5)`` (uniform in ``+-1/sqrt(in)``), ``b``
    is zero, so the adapted model starts equal to the base model. ``targets`` is module names
    (``['q_proj', 'v_proj']``) or ``'all-linear'`` (every attention and MLP projection).
    """
    names = resolve_targets(targets)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")
    kernels = {
        path[:-1]: leaf
        for path, leaf in traverse_util.flatten_dict(params).items()
        if path[-1] == "kernel"
    }
    available = sorted({path[-1] for path in kernels})
    for name in names:
        if not any(path[-1] == name for path in kernels):
            raise UserError(
                f"LoRA target {name!r} matches no module; modules: {', '.join(available)}"
            )
    flat = {}
    chosen = [path for path in sorted(kernels) if path[-1] in names]
    for key, path in zip(jax.random.split(rng, len(chosen)), chosen, strict=True):
        kernel = kernels[path]
        *lead, fan_in, fan_out = kernel.shape
        if rank > min(fan_in, fan_out):
            raise UserError(
                f"LoRA rank {rank} is larger than layer {'/'.join(path)} ({fan_in}x{fan_out})"
            )
        bound = 1.0 / math.sqrt(fan_in)
        flat[path + ("a",)] = jax.random.uniform(
            key, (*lead, fan_in, rank), dtype, minval=-bound, maxval=bound
        )
        flat[path + ("b",)] = jnp.zeros((*lead, rank, fan_out), dtype)
    return LoRA(
        traverse_util.unflatten_dict(flat),
        scale=lora_scale(rank, alpha, use_rslora),
        dropout=dropout,
        use_rslora=use_rslora,
    )


def delta(lora: LoRA) -> dict:
    """``{module path: scale * a @ b}`` with the kernels' shapes ``[L, in, out]``."""
    return {
        path: lora.scale * jnp.einsum("...ir,...ro->...io", ab["a"], ab["b"])
        for path, ab in module_weights(lora.weights).items()
    }


def merge(params: dict, lora: LoRA) -> dict:
    """Params with every adapted kernel replaced by ``kernel + scale * a @ b``."""
    return add_deltas(params, delta(lora))


def add_deltas(params: dict, deltas: dict) -> dict:
    """Params with ``deltas[path]`` (``{module path: [L, in, out]}``, as :func:`delta` gives)
    added to each module's kernel (in float32, stored in the kernel's dtype)."""
    flat = traverse_util.flatten_dict(params)
    for path, d in deltas.items():
        kernel = flat[path + ("kernel",)]
        flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + d).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------
# PEFT format

_PEFT_PREFIX = "base_model.model."


def check_square(lo: LoRA) -> None:
    """Raises unless every adapted module maps ``d`` to ``d`` features (needed by :func:`chain`;
    shapes only, so it also runs on abstract adapters before any training)."""
    for path, ab in module_weights(lo.weights).items():
        d_in, d_out = ab["a"].shape[-2], ab["b"].shape[-1]
        if d_in != d_out:
            raise UserError(f"fusion='chain' needs square targets; {'/'.join(path)} maps "
                            f"{d_in} -> {d_out} (use fusion='add', or targets such as "
                            "q_proj,o_proj whose widths are equal)")


def chain(outer: LoRA, inner: LoRA) -> LoRA:
    """The adapter of ``inner`` followed by ``outer``: ``delta = s_i s_o (a_i b_i)(a_o b_o)``,
    with ``inner``'s rank (``a = a_i``, ``b = s_o b_i a_o b_o``). FF-LoRA's chain fusion (in
    PyTorch's layout ``delta = s D C B A``). Needs equal input and output widths per module."""
    check_square(inner)
    flat_outer = module_weights(outer.weights)
    out = {}
    for path, ab in module_weights(inner.weights).items():
        o = flat_outer[path]
        out[path + ("a",)] = ab["a"]
        out[path + ("b",)] = ab["b"] @ o["a"] @ o["b"] * outer.scale
    return inner.replace(weights=traverse_util.unflatten_dict(out))


def module_rows(key_map: Sequence[tuple[str, str, bool]]) -> dict[tuple[str, ...], str]:
    """Flax module path -> HF module name template (``model.layers.{layer}.self_attn.q_proj``)
    of the projections in a declarative key map (HF name, Flax path, transpose)."""
    return {
        tuple(flax_path.split("/")[:-1]): hf_name.removesuffix(".weight")
        for hf_name, flax_path, _ in key_map
        if flax_path.endswith("/kernel")
    }


def _module_rows(cfg: LlamaConfig) -> dict[tuple[str, ...], str]:
    return module_rows(hf.key_map(cfg))


def _layer_names(template: str, num_layers: int) -> list[str]:
    return [template.format(layer=i) for i in range(num_layers)] if "{layer}" in template else [
        template
    ]


def save_peft_adapter(
    path: str | os.PathLike,
    lora: LoRA,
    cfg: LlamaConfig | None,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    key_map: Sequence[tuple[str, str, bool]] | None = None,
    num_layers: int | None = None,
    task_type: str = "CAUSAL_LM",
) -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
    ``peft.PeftModel.from_pretrained`` loads onto the matching HF model: the Llama of ``cfg``,
    or any model given by its declarative ``key_map`` and ``num_layers`` (the BERT retriever:
    :func:`ffrag_jax.retrieval.encoder.save_peft_adapter`)."""
    ranks = set(lora.ranks.values())
    if len(ranks) != 1:
        raise UserError(f"PEFT export needs one rank for all modules, got {lora.ranks}")
    (rank,) = ranks
    folder = hf.prepare_output_dir(path, overwrite)
    rows = module_rows(key_map) if key_map is not None else _module_rows(cfg)
    layers = num_layers if num_layers is not None else cfg.num_layers
    tensors = {}
    for mpath, ab in module_weights(lora.weights).items():
        a = np.asarray(jax.device_get(ab["a"]), np.float32)
        b = np.asarray(jax.device_get(ab["b"]), np.float32)
        names = _layer_names(rows[mpath], layers)
        if len(names) == 1:
            a, b = a[None], b[None]
        for name, a_i, b_i in zip(names, a, b, strict=True):
            # PEFT's lora_A is nn.Linear(in, r): weight [r, in]; lora_B weight [out, r].
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_i.T)
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_i.T)
    hf.write_safetensors(folder, tensors, stem="adapter_model")
    alpha = lora.scale * (math.sqrt(rank) if lora.use_rslora else rank)
    if base_model_name_or_path and Path(base_model_name_or_path).exists():
        # A local base is named relative to the adapter folder: an absolute path would point
        # into the original run after the export is copied or moved. Load such an adapter with
        # PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).
        base_model_name_or_path = os.path.relpath(Path(base_model_name_or_path).resolve(),
                                                  folder.resolve())
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": lora.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    files.atomic_write_json(folder / "adapter_config.json", adapter_config)


_UNSUPPORTED_PEFT = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "bias": ("none", None),
}
_PEFT_KEY_RE = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight$"
)


def load_peft_adapter(path: str | os.PathLike, cfg: LlamaConfig) -> LoRA:
    """Reads a PEFT LoRA adapter folder for a Llama with ``cfg``."""
    folder = hf.check_model_dir(path)
    config_path = folder / "adapter_config.json"
    if not config_path.exists():
        raise UserError(f"{folder}: adapter_config.json is missing (not a PEFT adapter folder)")
    conf = hf.read_json(config_path, "the adapter's PEFT config")
    if conf.get("peft_type") != "LORA":
        raise UserError(f"{config_path}: peft_type is {conf.get('peft_type')!r}, expected 'LORA'")
    for key, allowed in _UNSUPPORTED_PEFT.items():
        if key in conf and conf[key] not in allowed:
            raise UserError(f"{config_path}: {key}={conf[key]!r} is not supported")
    weights_path = folder / "adapter_model.safetensors"
    if not weights_path.exists():
        raise UserError(f"{folder}: adapter_model.safetensors is missing")
    with hf.open_safetensors(weights_path) as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)

    by_module: dict[str, dict[str, np.ndarray]] = {}
    for key, t in raw.items():
        m = _PEFT_KEY_RE.match(key)
        if not m:
            raise UserError(f"{weights_path}: unexpected tensor {key!r}")
        by_module.setdefault(m["module"], {})[m["ab"]] = t
    flat = {}
    seen = set()
    for mpath, template in _module_rows(cfg).items():
        names = _layer_names(template, cfg.num_layers)
        present = [n for n in names if n in by_module]
        if not present:
            continue
        if len(present) != len(names):
            missing = sorted(set(names) - set(present))[0]
            raise UserError(f"{weights_path}: adapter for {missing!r} is missing (partial layers)")
        a = np.stack([by_module[n]["A"].T for n in names]).astype(np.float32)
        b = np.stack([by_module[n]["B"].T for n in names]).astype(np.float32)
        if "{layer}" not in template:
            a, b = a[0], b[0]
        flat[mpath + ("a",)] = jnp.asarray(a)
        flat[mpath + ("b",)] = jnp.asarray(b)
        seen.update(names)
    unknown = sorted(set(by_module) - seen)
    if unknown:
        raise UserError(f"{weights_path}: adapter for {unknown[0]!r} has no module in the model")
    if not flat:
        raise UserError(f"{weights_path}: holds no LoRA tensors")
    rank = int(conf["r"])
    lora_ranks = {int(v.shape[-1]) for k, v in flat.items() if k[-1] == "a"}
    if lora_ranks != {rank}:
        raise UserError(f"{weights_path}: tensor ranks {sorted(lora_ranks)} differ from r={rank}")
    return LoRA(
        traverse_util.unflatten_dict(flat),
        scale=lora_scale(rank, float(conf["lora_alpha"]), bool(conf.get("use_rslora", False))),
        dropout=float(conf.get("lora_dropout", 0.0)),
        use_rslora=bool(conf.get("use_rslora", False)),
    )


# --------------------------------------------------------------------------------------------
# Native format: any LoRA tree (the retriever's too, which has no PEFT mapping here)


def save_weights(path: str | os.PathLike, lora: LoRA) -> None:
    """One safetensors file: the weights under their '/'-joined tree paths, the scale,
    dropout and rsLoRA flag in its metadata (:func:`load_weights` reads it back)."""
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(jax.device_get(lora.weights), sep="/")
    meta = {"scale": repr(float(lora.scale)), "dropout": repr(float(lora.dropout)),
            "use_rslora": str(bool(lora.use_rslora))}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path), metadata=meta)


def load_weights(path: str | os.PathLike) -> LoRA:
    """The LoRA that :func:`save_weights` wrote to ``path``."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such LoRA weights file")
    with hf.open_safetensors(path) as f:
        meta = f.metadata() or {}
        flat = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118
    if "scale" not in meta:
        raise UserError(f"{path}: not a ffrag_jax LoRA file (no scale in its metadata)")
    return LoRA(traverse_util.unflatten_dict(flat, sep="/"), scale=float(meta["scale"]),
                dropout=float(meta.get("dropout", 0.0)),
                use_rslora=meta.get("use_rslora") == "True")
