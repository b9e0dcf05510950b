"""Bad model folders and tokenizers give one-line errors that name the culprit."""

import json
import shutil

import pytest

from ffrag_jax.errors import UserError
from ffrag_jax.models import hf


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match=f"model folder {tmp_path / 'nope'} does not exist"):
        hf.load_llama(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        hf.load_llama(tmp_path / "f")


def test_missing_config(tmp_path):
    with pytest.raises(UserError, match="config.json is missing"):
        hf.load_llama(tmp_path)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        hf.load_llama(tmp_path)


def test_wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type is 'bert', expected 'llama'"):
        hf.load_llama(tmp_path)


def test_missing_weights_and_missing_tensor(hf_llama_dir, tmp_path):
    shutil.copy(hf_llama_dir("mha_tied") / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match="no model.safetensors"):
        hf.load_llama(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["num_hidden_layers"] = 3  # the file has only 2 layers
    (tmp_path / "config.json").write_text(json.dumps(conf))
    shutil.copy(hf_llama_dir("mha_tied") / "model.safetensors", tmp_path)
    missing = "tensor 'model.layers.2.input_layernorm.weight' is missing"
    with pytest.raises(UserError, match=missing):
        hf.load_llama(tmp_path)


def test_shape_mismatch(hf_llama_dir, tmp_path):
    shutil.copytree(hf_llama_dir("mha_tied"), tmp_path / "m")
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    conf["intermediate_size"] = 96
    (tmp_path / "m" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="gate_proj.weight' has shape"):
        hf.load_llama(tmp_path / "m")


def test_unsupported_rope_type(hf_llama_dir, tmp_path):
    shutil.copytree(hf_llama_dir("mha_tied"), tmp_path / "m")
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    conf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="rope_scaling type 'yarn' is not supported"):
        hf.load_llama(tmp_path / "m")


def test_save_refuses_non_empty_folder(hf_llama_dir, tmp_path):
    cfg, params = hf.load_llama(hf_llama_dir("mha_tied"))
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="is not empty; pass overwrite=True"):
        hf.save_llama(tmp_path, cfg, params)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_tokenizer_without_pad_token(tmp_path):
    from ffrag_jax.data import text

    tok = text.train_bpe_tokenizer(["hello world"] * 10, 300)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="has no pad token"):
        hf.load_tokenizer(tmp_path)
    assert hf.load_tokenizer(tmp_path, pad_to_eos=True).pad_token == "</s>"


def test_missing_tokenizer(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        hf.load_tokenizer(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.001])  # cut in the tensors; cut in the header
def test_truncated_safetensors_is_one_line(hf_llama_dir, tmp_path, keep):
    folder = tmp_path / "m"
    shutil.copytree(hf_llama_dir("mha_tied"), folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(int(len(data) * keep), 8)])
    with pytest.raises(UserError, match=r"model.safetensors: damaged safetensors file"):
        hf.load_llama(folder)


def test_non_utf8_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"model_type": "ll\xe9ma"}')
    with pytest.raises(UserError, match="config.json: not UTF-8 text"):
        hf.load_llama(tmp_path)
