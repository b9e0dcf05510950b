"""Knowledge bases: chunks + embeddings + a dense index + BM25, saved as one folder; dense,
BM25 and hybrid (reciprocal rank fusion) search. Several bases queried together with quotas:
:mod:`ffrag_jax.retrieval.multi_source`.

A knowledge base folder holds ``chunks.jsonl``, ``embeddings.npy``, ``index/`` (exact or
ScaNN), ``bm25/`` and ``manifest.json``: the encoder's identity (folder name and weight hash,
plus the LoRA's hash when one was applied), the chunking settings, a hash of the corpus and the
counts. Loading a base with an encoder whose identity differs is refused: its vectors would
not be comparable with the queries.

A hit is a dict ``{"id", "doc_id", "text", "source", "score", "kb"}``; ``kb`` names the base it
came from (the "source recorded on every hit" of multi-index search).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ffrag_jax import files
from ffrag_jax.errors import UserError
from ffrag_jax.retrieval import index as index_lib
from ffrag_jax.retrieval.documents import chunk_documents
from ffrag_jax.retrieval.encoder import TextEncoder

MODES = ("dense", "bm25", "hybrid")
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al., 2009)
FORMAT = 1


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    """BM25 terms of ``texts`` (lower case, English stopwords out), as every BM25 index here
    is built and queried."""
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


def _corpus_sha256(chunks: Sequence[dict]) -> str:
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(c["id"].encode())
        digest.update(b"\0")
        digest.update(c["text"].encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _describe(identity: dict) -> str:
    lora = f", LoRA {identity['lora_sha256'][:12]}" if "lora_sha256" in identity else ""
    return f"{identity['name']} (sha256 {identity['sha256'][:12]}{lora})"


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int, rrf_k: int = RRF_K
                           ) -> list[tuple[int, float]]:
    """``[(item, score)]`` best first: ``score = sum over rankings of 1 / (rrf_k + rank)``
    (rank from 1); ties keep the order of first appearance. Ids < 0 are ignored."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            if item >= 0:
                scores[int(item)] = scores.get(int(item), 0.0) + 1.0 / (rrf_k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])[:k]


def is_knowledge_base(folder: Path) -> bool:
    return (folder / "manifest.json").is_file() and (folder / "chunks.jsonl").is_file()


def check_output_folder(folder: Path, overwrite: bool) -> None:
    """A UserError unless ``folder`` is new, empty, or (with ``overwrite``) a knowledge base."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder")
    if folder.exists() and any(folder.iterdir()):
        if not is_knowledge_base(folder):
            raise UserError(f"{folder} is not empty and is not a knowledge base; choose a new "
                            "folder (--overwrite only replaces a knowledge base)")
        if not overwrite:
            raise UserError(f"{folder} is not empty; pass --overwrite to replace it")


def _read(folder: Path, name: str, read):
    """``read(folder / name)``; a missing, truncated or damaged file is one UserError."""
    try:
        return read(folder / name)
    except UserError:
        raise
    except (OSError, ValueError, EOFError, KeyError, UnicodeDecodeError) as e:
        raise UserError(f"{folder}/{name} is missing or damaged ({type(e).__name__}: "
                        f"{str(e)[:120]}); rebuild the knowledge base") from None


class KnowledgeBase:
    """Chunks of a corpus, their embeddings, a dense index and a BM25 index.

    ``encoder`` embedded the chunks; ``query_encoder`` embeds the questions and is the same
    encoder unless only the query side was trained (a query LoRA: the chunks' vectors, and so
    the base, stay valid).
    """

    def __init__(self, name: str, chunks: list[dict], embeddings: np.ndarray, dense, bm25,
                 manifest: dict, encoder: TextEncoder, query_encoder: TextEncoder | None = None):
        self.name, self.chunks, self.embeddings = name, chunks, embeddings
        self.dense, self.bm25, self.manifest, self.encoder = dense, bm25, manifest, encoder
        self.query_encoder = encoder if query_encoder is None else query_encoder

    def __len__(self) -> int:
        return len(self.chunks)

    @classmethod
    def build(cls, name: str, docs: Sequence[dict], encoder: TextEncoder, *,
              chunk_tokens: int = 200, overlap: int = 32, metric: str = "cosine",
              index_kind: str = "auto", batch_size: int = 64,
              progress: bool = False) -> KnowledgeBase:
        """Chunks ``docs`` (``{"id", "text", "source"}``), embeds and indexes them."""
        import bm25s

        chunk_tokens = min(chunk_tokens, encoder.cfg.max_seq_length - 2)  # room for CLS/SEP
        chunks = chunk_documents(docs, encoder.tokenizer, chunk_tokens=chunk_tokens,
                                 overlap=min(overlap, chunk_tokens - 1))
        embeddings = encoder.embed([c["text"] for c in chunks], batch_size=batch_size,
                                   progress=progress)
        dense = index_lib.build(embeddings, metric, index_kind)
        bm25 = bm25s.BM25()
        bm25.index(bm25_tokens([c["text"] for c in chunks]), show_progress=False)
        manifest = {
            "format": FORMAT,
            "name": name,
            "encoder": encoder.identity,
            "chunking": {"chunk_tokens": chunk_tokens, "overlap": overlap},
            "corpus_sha256": _corpus_sha256(chunks),
            "documents": len(docs),
            "chunks": len(chunks),
            "metric": metric,
            "index": dense.kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return cls(name, chunks, embeddings, dense, bm25, manifest, encoder)

    @classmethod
    def from_passages(cls, name: str, texts: Sequence[str], encoder: TextEncoder, *,
                      vectors: np.ndarray | None = None, metric: str = "dot",
                      index_kind: str = "auto") -> KnowledgeBase:
        """A base of whole passages, one chunk each (no chunking: short facts), embedded by
        ``encoder`` unless their ``vectors`` are given (a job's, so that an exported base
        searches exactly as the job did)."""
        import bm25s

        chunks = [{"id": f"{name}-{i}#0", "doc_id": f"{name}-{i}", "text": t, "source": name,
                   "start": 0, "end": len(t)} for i, t in enumerate(texts)]
        if not chunks:
            raise UserError(f"knowledge base {name!r} has no passages")
        embeddings = encoder.embed(list(texts)) if vectors is None else np.asarray(vectors)
        if len(embeddings) != len(chunks):
            raise UserError(f"{len(embeddings)} vectors for {len(chunks)} passages of "
                            f"knowledge base {name!r}")
        dense = index_lib.build(embeddings, metric, index_kind)
        bm25 = bm25s.BM25()
        bm25.index(bm25_tokens(texts), show_progress=False)
        manifest = {"format": FORMAT, "name": name, "encoder": encoder.identity,
                    "chunking": None, "corpus_sha256": _corpus_sha256(chunks),
                    "documents": len(chunks), "chunks": len(chunks), "metric": metric,
                    "index": dense.kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return cls(name, chunks, embeddings, dense, bm25, manifest, encoder)

    # ----------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Writes the base to ``folder`` whole or not at all: into a temporary folder beside
        it, then renamed into place. Only an existing knowledge base is replaced (with
        ``overwrite``); any other non-empty folder is refused."""
        folder = Path(folder)
        check_output_folder(folder, overwrite)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            with (tmp / "chunks.jsonl").open("w", encoding="utf-8") as f:
                for c in self.chunks:
                    f.write(json.dumps(c, ensure_ascii=False) + "\n")
            np.save(tmp / "embeddings.npy", self.embeddings)
            self.dense.save(tmp / "index")
            self.bm25.save(str(tmp / "bm25"), show_progress=False)
            files.atomic_write_json(tmp / "manifest.json", self.manifest)
            old = None
            if folder.exists():  # checked above: an empty folder or a knowledge base
                old = folder.parent / f"{tmp.name}.old"
                folder.rename(old)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old)
        files.fsync_dir(folder.parent)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, encoder: TextEncoder,
             query_encoder: TextEncoder | None = None) -> KnowledgeBase:
        """The base saved in ``folder``; refuses an ``encoder`` other than the one it was
        built with (``query_encoder``, if given, must share its dimension)."""
        import bm25s

        folder = Path(folder)
        manifest_file = folder / "manifest.json"
        if not manifest_file.exists():
            raise UserError(f"{folder}: no manifest.json (not a knowledge base)")
        manifest = _read(folder, "manifest.json", lambda f: json.loads(f.read_text()))
        if manifest.get("format") != FORMAT:
            raise UserError(f"{folder}: knowledge base format {manifest.get('format')!r}, "
                            f"this ffrag_jax reads {FORMAT}")
        built_with, given = manifest["encoder"], encoder.identity
        if built_with != given:
            raise UserError(f"knowledge base {folder} was built with encoder "
                            f"{_describe(built_with)}, not {_describe(given)}; rebuild it with "
                            "this encoder")
        if query_encoder is not None and query_encoder.cfg.embedding_dim != built_with["dim"]:
            raise UserError(f"query encoder {_describe(query_encoder.identity)} embeds in "
                            f"{query_encoder.cfg.embedding_dim} dimensions; knowledge base "
                            f"{folder} holds {built_with['dim']}-dimensional vectors")
        chunks = _read(folder, "chunks.jsonl", lambda f: [
            json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()])
        if _corpus_sha256(chunks) != manifest["corpus_sha256"]:
            raise UserError(f"{folder}/chunks.jsonl does not match its manifest (edited?); "
                            "rebuild the knowledge base")
        embeddings = _read(folder, "embeddings.npy", np.load)
        dense = _read(folder, "index", index_lib.load)
        bm25 = _read(folder, "bm25", lambda f: bm25s.BM25.load(str(f), show_progress=False))
        if len(embeddings) != len(chunks):
            raise UserError(f"{folder}/embeddings.npy holds {len(embeddings)} vectors for "
                            f"{len(chunks)} chunks (damaged); rebuild the knowledge base")
        return cls(manifest["name"], chunks, embeddings, dense, bm25, manifest, encoder,
                   query_encoder)

    # ----------------------------------------------------------------------------------------

    def _hit(self, i: int, score: float) -> dict:
        c = self.chunks[i]
        return {"id": c["id"], "doc_id": c["doc_id"], "text": c["text"], "source": c["source"],
                "score": float(score), "kb": self.name}

    def search_ids(self, queries: Sequence[str], k: int, mode: str = "hybrid", *,
                   query_embeddings: np.ndarray | None = None, candidates: int = 100
                   ) -> list[list[tuple[int, float]]]:
        """Per query ``[(chunk index, score)]`` best first, at most ``k`` (the corpus may be
        smaller). ``hybrid`` fuses the dense and BM25 top-``candidates`` by reciprocal rank."""
        if mode not in MODES:
            raise UserError(f"search mode {mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise UserError(f"k must be a positive integer, got {k!r}")
        queries = list(queries)
        depth = min(max(k, candidates) if mode == "hybrid" else k, len(self))
        dense = bm25 = None
        if mode in ("dense", "hybrid"):
            if query_embeddings is None:
                query_embeddings = self.query_encoder.embed(queries)
            scores, ids = self.dense.search(query_embeddings, depth)
            dense = [[(int(i), float(s)) for i, s in zip(row_i, row_s, strict=True) if i >= 0]
                     for row_i, row_s in zip(ids, scores, strict=True)]
        if mode in ("bm25", "hybrid"):
            ids, scores = self.bm25.retrieve(bm25_tokens(queries), k=depth,
                                             show_progress=False)
            # BM25 scores 0 for a chunk sharing no term with the query: not a hit.
            bm25 = [[(int(i), float(s)) for i, s in zip(row_i, row_s, strict=True) if s > 0]
                    for row_i, row_s in zip(ids, scores, strict=True)]
        if mode == "dense":
            return [row[:k] for row in dense]
        if mode == "bm25":
            return [row[:k] for row in bm25]
        return [reciprocal_rank_fusion([[i for i, _ in d], [i for i, _ in b]], k)
                for d, b in zip(dense, bm25, strict=True)]

    def search(self, queries: Sequence[str], k: int, mode: str = "hybrid", **kwargs
               ) -> list[list[dict]]:
        """Per query, up to ``k`` hits (dicts, see the module docstring), best first."""
        return [[self._hit(i, s) for i, s in row]
                for row in self.search_ids(queries, k, mode, **kwargs)]
