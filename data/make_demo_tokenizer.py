"""Trains the FF-RAG demo's byte-level BPE and writes it into the package
(ffrag_jax/tokenizers/demo/), where ``--config demo`` reads it (``tokenizer.path =
"packaged:demo"``).

Why it is shipped rather than trained at run time: BPE training is deterministic for one
``tokenizers`` release, not across releases, and the demo's tiny reader is sensitive to how
its text is split. A shipped tokenizer makes every input of the demo independent of the
library versions pip resolves, so a fresh install reproduces the README's numbers.

It is trained on what the demo's job would train it on (``ffrag_job.tokenizer_texts``: the
pretraining examples, every fact, the training questions and answers) for config seeds 0-4
together, so that the runs with ``--config.seed`` 1, 2, ... read their invented names as
well as seed 0 does.

    python data/make_demo_tokenizer.py [--seeds 5]
"""

import argparse
from pathlib import Path

from ffrag_jax.data import text
from ffrag_jax.jobs import ffrag as ffrag_job
from ffrag_jax.launch import load_config

OUT = Path(__file__).parents[1] / "ffrag_jax" / "tokenizers" / "demo"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    texts = []
    for seed in range(args.seeds):
        config = load_config("demo", {"seed": seed})
        shared, clients = ffrag_job.client_knowledge(config)
        texts += ffrag_job.tokenizer_texts(ffrag_job.reading_examples(config), shared, clients)
    tokenizer = text.train_bpe_tokenizer(texts, config.tokenizer.vocab_size)
    tokenizer.save_pretrained(str(OUT))
    print(f"wrote {OUT} ({len(tokenizer)} tokens, trained on {len(texts)} texts)")


if __name__ == "__main__":
    main()
