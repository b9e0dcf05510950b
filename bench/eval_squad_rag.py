"""RAG evaluation on SQuAD v1.1 dev with the packaged all-MiniLM-L6-v2 retriever: retrieval
recall@k over the 2,067 dev paragraphs, the answer-in-context rate of the top passage(s), and,
with a reader (``--model``, a local HF Llama folder with its tokenizer), exact match and F1
(SQuAD normalisation) of RAG (top passage in the prompt) and closed-book answers.

    python bench/eval_squad_rag.py                          # retrieval + answer-in-context
    python bench/eval_squad_rag.py --model /models/llama-3-8b-instruct --limit 1000

Results go to ``bench/results/squad_rag_cpu.{json,md}``. The prompt is the framework's
``Context: ...\\nQuestion: ...\\nAnswer:``; answers are greedy, cut at EOS or a newline.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import report  # bench/report.py (the script's folder is on sys.path)

from ffrag_jax import evaluation
from ffrag_jax.models import hf
from ffrag_jax.rag import evaluate as rag_eval
from ffrag_jax.retrieval import beir
from ffrag_jax.retrieval.encoder import TextEncoder
from ffrag_jax.retrieval.knowledge_base import KnowledgeBase

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--model", default=None, help="a local HF Llama folder (the reader)")
    p.add_argument("--limit", type=int, default=0, help="first N questions (0: all 10,570)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    paragraphs, questions = beir.load_squad(args.data / "squad" / "dev-v1.1.json")
    if args.limit:
        questions = questions[: args.limit]
    encoder = TextEncoder.load()
    started = time.perf_counter()
    kb = KnowledgeBase.build("squad-dev", paragraphs, encoder, progress=True)
    build_s = time.perf_counter() - started
    texts = [q["text"] for q in questions]
    hits = kb.search_ids(texts, 10 * args.k, "dense")
    by_id = {x["id"]: x["text"] for x in paragraphs}
    ranked = [beir.dedupe_docs([kb.chunks[i]["doc_id"] for i, _ in row], args.k) for row in hits]
    index = {x["id"]: i for i, x in enumerate(paragraphs)}
    ids = np.array([[index[d] for d in row] + [-1] * (args.k - len(row)) for row in ranked])
    gold = np.array([index[q["paragraph"]] for q in questions])
    answers = [q["answers"] for q in questions]
    top = [by_id[row[0]] for row in ranked]
    result = {**rag_eval.retrieval_metrics(ids, gold),
              "answer_in_context@1": evaluation.answer_in_context_rate(top, answers),
              f"answer_in_context@{args.k}": evaluation.answer_in_context_rate(
                  [" ".join(by_id[d] for d in row) for row in ranked], answers),
              "questions": len(questions), "paragraphs": len(paragraphs), "build_s": build_s}
    if args.model:
        cfg, params = hf.load_llama(args.model)
        tokenizer = hf.load_tokenizer(args.model, pad_to_eos=True)
        common = dict(prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size)
        for name, contexts in (("rag", top), ("closed_book", [""] * len(texts))):
            predictions = [a.split("\n")[0] for a in rag_eval.answer(
                params, cfg, tokenizer, texts, contexts, **common)]
            result.update(rag_eval.answer_metrics(predictions, answers, name))
        result["model"] = args.model
    print(result)
    lines = ["# RAG on SQuAD v1.1 dev: all-MiniLM-L6-v2 (Flax) retriever", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in result.items()]
    report.save("squad_rag_cpu", {"machine": report.machine(), "encoder": encoder.identity,
                                  "result": result, "command": report.command()}, lines)


if __name__ == "__main__":
    main()
