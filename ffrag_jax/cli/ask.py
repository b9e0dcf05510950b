"""Ask a trained RAG system questions.

    python -m ffrag_jax.ask --workdir RUN "Which drug was prescribed to patient Ab Cd?"
    python -m ffrag_jax.ask --workdir RUN --client 0 --questions q.jsonl --output a.jsonl

``RUN`` is the workdir of a RAG job (``--config ffrag`` or ``rag_e2e``), or its ``export``
folder. Without ``--client`` the global model answers from the shared knowledge; with it, that
client's personalised model answers from its private case base and the shared base. Each
question is retrieved for, the best passage goes into the prompt, and the answer is generated
with a KV cache (greedy, or top-p sampling with ``--temperature``); the answer is printed with
its sources. ``--questions`` reads a JSONL file of ``{"question": ...}`` lines (a batch) and
writes one JSON line per answer. Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ffrag_jax import files
from ffrag_jax.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ffrag_jax.ask",
                                description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("questions_text", nargs="*", metavar="QUESTION", help="questions to ask")
    p.add_argument("--workdir", required=True, help="a RAG run's workdir or export folder")
    p.add_argument("--client", type=int, default=None,
                   help="answer with this client's personalised model and case base")
    p.add_argument("--questions", default=None, help="JSONL file of {\"question\": ...} lines")
    p.add_argument("--output", default=None, help="write JSONL answers here (default stdout)")
    p.add_argument("--mode", default="dense", choices=("dense", "bm25", "hybrid"),
                   help="retrieval mode (default dense: what the retriever was trained for)")
    p.add_argument("--rerank", action="store_true",
                   help="reorder the hits with the system's preference-aligned reranker (a "
                        "run with rerank.enabled), as its evaluation did")
    p.add_argument("--expand", action="store_true",
                   help="query expansion: retrieve also with the reader's closed-book draft "
                        "answer appended to the question")
    p.add_argument("--compress", type=int, default=0, metavar="TOKENS",
                   help="keep only the passages' best sentences by the reranker within TOKENS "
                        "(0: off)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p.parse_args(argv)


def read_questions(path: str) -> list[str]:
    """The ``question`` field of every line of a JSONL file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--questions {path}: no such file")
    out = []
    for n, record in files.jsonl_records(file, "--questions file"):
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise UserError(f"{path}:{n}: expected an object with a \"question\" string")
        out.append(record["question"])
    return out


def check_sampling(args: argparse.Namespace) -> None:
    """One line for the first sampling option that makes no sense."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature >= 0 expected (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p in (0, 1] expected, got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k >= 0 expected (0: off), got {args.top_k}")
    if args.compress < 0:
        raise UserError(f"--compress >= 0 expected (0: off), got {args.compress}")
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens > 0 expected, got {args.max_new_tokens}")
    if args.temperature == 0 and (args.top_p != 1.0 or args.top_k != 0):
        raise UserError("--top-p and --top-k only apply when sampling: pass --temperature > 0")


def check_output(path: str) -> Path:
    """``--output``, checked before any answer is computed: a new file in a writable folder."""
    out = Path(path)
    if out.exists():
        raise UserError(f"--output {path} exists; not overwriting it")
    if not out.parent.is_dir():
        raise UserError(f"--output {path}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--output {path}: folder {out.parent} is not writable")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        questions = list(args.questions_text)
        if args.questions:
            questions += read_questions(args.questions)
        if not questions:
            raise UserError("no question: pass one as an argument or --questions FILE")
        check_sampling(args)
        output = check_output(args.output) if args.output else None
        from ffrag_jax.rag.system import load_system

        system = load_system(args.workdir, args.client)
        results = system.ask(questions, mode=args.mode, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed, rerank=args.rerank,
                             expand=args.expand, compress=args.compress)
        if output:
            files.atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                    for r in results))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or args.output}", file=sys.stderr)
        return 2
    if output:
        print(f"wrote {len(results)} answers to {output}", file=sys.stderr)
    elif args.questions:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
    else:
        for r in results:
            note = "  (abstained: the knowledge bases do not support an answer)" if r.get(
                "abstained") else ""
            print(f"Q: {r['question']}\nA: {r['answer']}{note}")
            for h in r["sources"]:
                rerank = f"  rerank {h['rerank_score']:.3f}" if "rerank_score" in h else ""
                print(f"   [{h['kb']}] {h['score']:.3f}{rerank}  {h['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
