"""Build and query knowledge bases from the command line.

    python -m ffrag_jax.kb build DOCS OUT [--encoder DIR] [--chunk-tokens 200]
    python -m ffrag_jax.kb search KB "a question" [--k 5] [--mode hybrid]

``DOCS`` is a file or folder (.txt, .md, .jsonl, .csv, .pdf); ``OUT`` a new folder (an
existing knowledge base is only replaced with ``--overwrite``). ``--encoder`` is a local
sentence-transformers folder (default: the packaged all-MiniLM-L6-v2); ``search`` must use the
encoder the base was built with. Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from ffrag_jax.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ffrag_jax.kb",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="chunk, embed and index documents into a folder")
    b.add_argument("docs", help="a document file or folder")
    b.add_argument("out", help="the knowledge base folder to write")
    b.add_argument("--name", default=None, help="the base's name (default: OUT's name)")
    b.add_argument("--encoder", default=None, help="sentence-transformers folder")
    b.add_argument("--text-field", default="text", help=".jsonl/.csv field with the text")
    b.add_argument("--chunk-tokens", type=int, default=200)
    b.add_argument("--overlap", type=int, default=32)
    b.add_argument("--index", default="auto", choices=("auto", "exact", "scann"))
    b.add_argument("--overwrite", action="store_true")
    s = sub.add_parser("search", help="query a knowledge base")
    s.add_argument("kb", help="a knowledge base folder")
    s.add_argument("queries", nargs="+")
    s.add_argument("--encoder", default=None)
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--mode", default="hybrid", choices=("dense", "bm25", "hybrid"))
    return p.parse_args(argv)


def check_build_paths(docs, out) -> None:
    """The output folder may not be, contain or lie inside the documents: a build never
    writes into or over its input."""
    if not docs.exists():
        raise UserError(f"document path {docs} does not exist")
    d, o = docs.resolve(), out.resolve()
    if o == d or d in o.parents or o in d.parents:
        relation = ("is" if o == d else "lies inside" if d in o.parents else "contains")
        raise UserError(f"output folder {out} {relation} the documents {docs}; choose a "
                        "folder outside them")


def main(argv=None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from ffrag_jax.retrieval.documents import read_documents
    from ffrag_jax.retrieval.encoder import TextEncoder
    from ffrag_jax.retrieval.knowledge_base import KnowledgeBase, check_output_folder

    try:
        if args.command == "build":  # every check before the encoder is loaded
            out = Path(args.out)
            check_build_paths(Path(args.docs), out)
            check_output_folder(out, args.overwrite)
        encoder = TextEncoder.load(args.encoder)
        if args.command == "build":
            docs = read_documents(args.docs, text_field=args.text_field)
            kb = KnowledgeBase.build(args.name or out.name, docs, encoder,
                                     chunk_tokens=args.chunk_tokens, overlap=args.overlap,
                                     index_kind=args.index, progress=sys.stderr.isatty())
            kb.save(out, overwrite=args.overwrite)
            print(json.dumps({k: kb.manifest[k] for k in ("name", "documents", "chunks",
                                                          "index")}))
        else:
            kb = KnowledgeBase.load(args.kb, encoder)
            for query, hits in zip(args.queries, kb.search(args.queries, args.k, args.mode),
                                   strict=True):
                print(json.dumps({"query": query, "hits": hits}, ensure_ascii=False))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
