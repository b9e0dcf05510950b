"""Writes small samples of the synthetic demo domains to data/synthetic/*.jsonl, and of the
FF-RAG demo's knowledge (facts and their questions) to data/synthetic/knowledge_*.jsonl.

The demo generates its data at run time with the same function (ffrag_jax.data.synthetic), so
these files are for reading, not needed to run anything:

    python data/make_synthetic.py [--n 20] [--seed 0] [--distractors 0]
"""

import argparse
from pathlib import Path

from ffrag_jax.data import synthetic


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distractors", type=int, default=0)
    args = parser.parse_args()
    out = Path(__file__).parent / "synthetic"
    for domain in synthetic.DOMAINS:
        path = out / f"{domain}.jsonl"
        synthetic.write_jsonl(
            path, synthetic.make_examples(domain, args.n, args.seed, args.distractors)
        )
        print(f"wrote {path}")
        facts, questions = synthetic.make_knowledge(domain, max(args.n // 4, 1), args.seed)
        path = out / f"knowledge_{domain}.jsonl"
        synthetic.write_jsonl(path, [{**q, "fact_text": facts[q["fact"]]} for q in questions])
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
