"""Logit parity of the Flax Llama with transformers' LlamaForCausalLM, and HF round trips."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LLAMA_VARIANTS
from transformers import LlamaForCausalLM

from ffrag_jax.models import hf, llama

TOL = 1e-4  # float32, max abs logit difference
forward = jax.jit(llama.forward, static_argnums=1)


def _inputs(seed=0, batch=3, length=40, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0  # right padding
    mask[2, 7:] = 0
    return ids, mask


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.numpy()


def _jax_logits(params, cfg, ids, mask, lora=None):
    return np.asarray(forward(params, cfg, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()),
                              lora))


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_logits_match_transformers(hf_llama_dir, variant):
    folder = hf_llama_dir(variant)
    ref_model = LlamaForCausalLM.from_pretrained(folder).eval()
    cfg, params = hf.load_llama(folder)
    ids, mask = _inputs()
    ref = _torch_logits(ref_model, ids, mask)
    out = _jax_logits(params, cfg, ids, mask)
    valid = mask.numpy().astype(bool)
    assert np.abs(out - ref)[valid].max() <= TOL


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_save_llama_round_trips_through_transformers(hf_llama_dir, variant, tmp_path):
    folder = hf_llama_dir(variant)
    cfg, params = hf.load_llama(folder)
    hf.save_llama(tmp_path / "out", cfg, params)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    original = LlamaForCausalLM.from_pretrained(folder).eval()
    ids, mask = _inputs(seed=1)
    valid = mask.numpy().astype(bool)
    diff = np.abs(_torch_logits(reloaded, ids, mask) - _torch_logits(original, ids, mask))
    assert diff[valid].max() <= TOL
    # and back into JAX: the same params exactly
    cfg2, params2 = hf.load_llama(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_transformers_4x_config_fields_are_read(hf_llama_dir, tmp_path):
    """A config.json written by transformers 4.x (rope_theta + rope_scaling, no
    rope_parameters) gives the same model as the 5.x form."""
    folder = hf_llama_dir("gqa_untied_llama3")
    shutil.copytree(folder, tmp_path / "v4")
    conf = json.loads((tmp_path / "v4" / "config.json").read_text())
    rope = conf.pop("rope_parameters")
    conf["rope_theta"] = rope.pop("rope_theta")
    conf["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
    (tmp_path / "v4" / "config.json").write_text(json.dumps(conf))
    cfg4, params = hf.load_llama(tmp_path / "v4")
    cfg5, _ = hf.load_llama(folder)
    assert cfg4 == cfg5
    assert cfg4.rope_type == "llama3" and cfg4.rope_theta == 500000.0
    ids, mask = _inputs()
    ref = _torch_logits(LlamaForCausalLM.from_pretrained(folder).eval(), ids, mask)
    valid = mask.numpy().astype(bool)
    assert np.abs(_jax_logits(params, cfg4, ids, mask) - ref)[valid].max() <= TOL


def test_sharded_safetensors_index_is_read(tmp_path):
    from conftest import make_hf_llama

    model = make_hf_llama("mha_tied")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg, params = hf.load_llama(tmp_path)
    ids, mask = _inputs()
    valid = mask.numpy().astype(bool)
    assert np.abs(_jax_logits(params, cfg, ids, mask) - _torch_logits(model, ids, mask))[
        valid
    ].max() <= TOL


def test_bfloat16_params_and_compute_stay_close(hf_llama_dir):
    folder = hf_llama_dir("gqa_untied_llama3")
    cfg32, p32 = hf.load_llama(folder)
    cfg16, p16 = hf.load_llama(folder, param_dtype="bfloat16")
    assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16 and cfg16.dtype == "bfloat16"
    ids, mask = _inputs()
    valid = mask.numpy().astype(bool)
    diff = np.abs(_jax_logits(p16, cfg16, ids, mask) - _jax_logits(p32, cfg32, ids, mask))
    # bf16 has 8 mantissa bits; random logits here are O(1).
    assert diff[valid].max() < 0.1


def test_sequence_longer_than_max_positions_is_refused(hf_llama_dir):
    cfg, params = hf.load_llama(hf_llama_dir("mha_tied"))
    ids = jnp.zeros((1, cfg.max_position_embeddings + 1), jnp.int32)
    with pytest.raises(hf.UserError, match="longer than the model's max_position_embeddings"):
        llama.forward(params, cfg, ids)
