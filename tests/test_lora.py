"""LoRA: PEFT parity both ways, merge equivalence, PEFT-style init, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from ffrag_jax.errors import UserError
from ffrag_jax.models import hf, llama, lora

TOL = 1e-4
forward = jax.jit(llama.forward, static_argnums=1)
TARGETS = {"q_v": ["q_proj", "v_proj"], "all_linear": "all-linear"}


def _ids(seed=0):
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


@pytest.mark.parametrize("targets", sorted(TARGETS))
def test_peft_adapter_gives_same_logits(hf_llama_dir, tmp_path, targets):
    folder = hf_llama_dir("gqa_untied_llama3")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[targets],
                        init_lora_weights=False)  # random A and B: the adapter matters
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(folder), config).eval()
    peft_model.save_pretrained(tmp_path)
    ids = _ids()
    ref = _logits(peft_model, ids)
    base = _logits(LlamaForCausalLM.from_pretrained(folder).eval(), ids)
    assert np.abs(ref - base).max() > 0.1  # the adapter changes the logits

    cfg, params = hf.load_llama(folder)
    adapter = lora.load_peft_adapter(tmp_path, cfg)
    expected = set(lora.resolve_targets(TARGETS[targets]))
    assert set(adapter.targets) == expected
    assert adapter.scale == 2.0
    out = np.asarray(forward(params, cfg, jnp.asarray(ids.numpy()), None, adapter))
    assert np.abs(out - ref).max() <= TOL


@pytest.mark.parametrize("targets", sorted(TARGETS))
def test_saved_adapter_loads_in_peft_with_same_logits(hf_llama_dir, tmp_path, targets):
    folder = hf_llama_dir("gqa_untied_llama3")
    cfg, params = hf.load_llama(folder)
    adapter = lora.init(jax.random.key(0), params, TARGETS[targets], rank=4, alpha=16.0)
    noise = jax.random.split(jax.random.key(1), len(jax.tree.leaves(adapter.weights)))
    leaves, treedef = jax.tree.flatten(adapter.weights)
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise, strict=True)]
    adapter = adapter.replace(weights=jax.tree.unflatten(treedef, leaves))
    lora.save_peft_adapter(tmp_path, adapter, cfg)

    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder), tmp_path)
    ids = _ids(1)
    ref = _logits(peft_model.eval(), ids)
    out = np.asarray(forward(params, cfg, jnp.asarray(ids.numpy()), None, adapter))
    assert np.abs(out - ref).max() <= TOL
    assert np.abs(ref - _logits(LlamaForCausalLM.from_pretrained(folder).eval(), ids)).max() > 0.1
    # and back: the same adapter
    again = lora.load_peft_adapter(tmp_path, cfg)
    assert again.scale == adapter.scale
    jax.tree.map(np.testing.assert_allclose, again.weights, adapter.weights)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_equals_forward_with_adapter(hf_llama_dir, use_rslora):
    cfg, params = hf.load_llama(hf_llama_dir("mha_tied"))
    adapter = lora.init(jax.random.key(0), params, "all-linear", rank=8, alpha=4.0,
                        use_rslora=use_rslora)
    adapter = adapter.replace(weights=jax.tree.map(lambda x: x + 0.1, adapter.weights))
    ids = jnp.asarray(_ids().numpy())
    with_adapter = forward(params, cfg, ids, None, adapter)
    merged = forward(lora.merge(params, adapter), cfg, ids)
    assert float(jnp.abs(with_adapter - forward(params, cfg, ids)).max()) > 0.1
    np.testing.assert_allclose(merged, with_adapter, atol=TOL)


def test_init_follows_peft(hf_llama_dir):
    cfg, params = hf.load_llama(hf_llama_dir("gqa_untied_llama3"))
    adapter = lora.init(jax.random.key(0), params, ["q_proj", "v_proj"], rank=8, alpha=16.0,
                        dropout=0.05)
    assert adapter.targets == ("q_proj", "v_proj")
    assert adapter.scale == 2.0 and adapter.dropout == 0.05
    q = adapter.weights["layers"]["self_attn"]["q_proj"]
    assert q["a"].shape == (cfg.num_layers, cfg.hidden_size, 8)
    assert q["b"].shape == (cfg.num_layers, 8, cfg.num_heads * cfg.head_dim)
    bound = 1 / np.sqrt(cfg.hidden_size)  # kaiming_uniform(a=sqrt(5)) on fan_in
    assert float(jnp.abs(q["a"]).max()) <= bound and float(jnp.abs(q["a"]).max()) > 0.8 * bound
    assert not np.any(np.asarray(q["b"]))
    # LoRA lives apart from params; B=0 means the adapted model starts as the base model.
    from flax import traverse_util

    assert not {k[-1] for k in traverse_util.flatten_dict(params)} & {"a", "b"}
    ids = jnp.asarray(_ids().numpy())
    np.testing.assert_array_equal(forward(params, cfg, ids, None, adapter),
                                  forward(params, cfg, ids))


def test_dropout_only_with_rng(hf_llama_dir):
    cfg, params = hf.load_llama(hf_llama_dir("mha_tied"))
    adapter = lora.init(jax.random.key(0), params, "all-linear", rank=4, alpha=8.0, dropout=0.5)
    adapter = adapter.replace(weights=jax.tree.map(lambda x: x + 0.1, adapter.weights))
    ids = jnp.asarray(_ids().numpy())
    a = llama.forward(params, cfg, ids, None, adapter)
    b = llama.forward(params, cfg, ids, None, adapter, dropout_rng=jax.random.key(3))
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(a, llama.forward(params, cfg, ids, None, adapter))


@pytest.mark.parametrize("rate", [0.05, 0.3])
def test_dropout_drops_at_its_rate_and_keeps_the_mean(rate):
    """Inverted dropout on the LoRA input: a fraction ``rate`` of the entries zeroed, the rest
    scaled so that the expectation is unchanged."""
    layer = llama.LoRALinear(features=3, lora_dropout=rate, deterministic=False)
    x = jnp.full((400, 500), 2.0)
    out = layer.apply({}, x, method=lambda module, x: module.dropout(x),
                      rngs={"dropout": jax.random.key(0)})
    dropped = float(jnp.mean(out == 0))
    assert abs(dropped - rate) < 4 * np.sqrt(rate * (1 - rate) / x.size)  # 4 sigma
    kept = np.unique(np.asarray(out[out != 0]))
    np.testing.assert_allclose(kept, [2.0 / (1 - rate)], rtol=1e-6)
    assert abs(float(jnp.mean(out)) - 2.0) < 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=["qkv_proj"]), "LoRA target 'qkv_proj' matches no module"),
        (dict(rank=0), "LoRA rank must be a positive integer"),
        (dict(rank=-3), "LoRA rank must be a positive integer"),
        (dict(rank=65), "LoRA rank 65 is larger than layer"),
        (dict(dropout=1.0), "LoRA dropout must be in"),
    ],
)
def test_bad_lora_settings_name_the_culprit(hf_llama_dir, kwargs, message):
    _, params = hf.load_llama(hf_llama_dir("mha_tied"))
    args = dict(targets=["q_proj"], rank=4, alpha=8.0) | kwargs
    dropout = args.pop("dropout", 0.0)
    with pytest.raises(UserError, match=message):
        lora.init(jax.random.key(0), params, args["targets"], args["rank"], args["alpha"],
                  dropout=dropout)


def test_non_lora_peft_folder_is_refused(tmp_path, hf_llama_dir):
    cfg, _ = hf.load_llama(hf_llama_dir("mha_tied"))
    with pytest.raises(UserError, match="adapter_config.json is missing"):
        lora.load_peft_adapter(tmp_path, cfg)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(UserError, match="peft_type is 'IA3'"):
        lora.load_peft_adapter(tmp_path, cfg)
