"""Test setup: 8 fake CPU devices (set before JAX starts), no hub access, tiny HF models.

The reference models are random ``transformers`` Llamas built and saved locally per session;
nothing is downloaded.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# CPU unless asked (JAX_PLATFORMS=cuda pytest ... runs the suite on a GPU). On an accelerator,
# float32 matmuls default to TF32 (GPU) or bf16 passes (TPU): the parity tests compare float32
# against references at fixed tolerances, so they get full float32 precision there.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] != "cpu":
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
elif "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    # The tests' models are tiny: XLA's compilation, not their arithmetic, is most of a job's
    # time (a small FF-RAG run: 72 of 99 s, 315 programs). LLVM without optimisation halves
    # it; every result is still checked at the same tolerances. Runs and benches keep -O2.
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the whole session, shared by the xdist workers and
# the launcher subprocesses they start (set here, in the controller, before any of them):
# a job launched five times recompiles nothing. It changes no result (same executables).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="ffrag-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "eight_devices: needs 8 devices (faked on CPU)")
    config.addinivalue_line("markers", "long: minutes of work; scheduled first")


def pytest_collection_modifyitems(config, items):
    # The longest tests first: xdist hands out tests in this order, and a long one picked up
    # last would leave the other worker idle at the end of the run.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_runtest_setup(item):
    if item.get_closest_marker("eight_devices"):
        import jax

        if jax.device_count() < 8:
            pytest.skip(f"needs 8 devices: the CPU fakes them, {jax.default_backend()} has "
                        f"{jax.device_count()}")

# Tiny Llama variants covering the architecture switches that matter for parity.
LLAMA_VARIANTS = {
    # GQA (8 query heads, 2 kv heads), untied lm_head, Llama-3 rope scaling.
    "gqa_untied_llama3": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # Multi-head attention, tied embeddings, plain rope.
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    # Linear rope scaling with attention biases.
    "linear_rope_bias": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        attention_bias=True,
    ),
}


def make_hf_llama(variant: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        max_position_embeddings=64,
        **LLAMA_VARIANTS[variant],
    )
    model = LlamaForCausalLM(config).eval()
    if config.attention_bias:  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    """Factory: variant name -> folder with a saved random HF Llama (cached per session)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            folder = tmp_path_factory.mktemp(f"hf_{variant}")
            make_hf_llama(variant).save_pretrained(folder)
            cache[variant] = folder
        return cache[variant]

    return get



@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory):
    """A random transformers BertForSequenceClassification (one label, 2 layers of 32) saved
    locally with the packaged MiniLM's tokenizer: a fast reranker for the tests."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from ffrag_jax.retrieval.encoder import default_encoder_path

    folder = tmp_path_factory.mktemp("cross") / "tiny"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, num_labels=1)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    src = default_encoder_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy2(src / name, folder / name)
    return folder, model
