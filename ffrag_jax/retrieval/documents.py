"""Documents in, chunks out: reading local files and a token-aware splitter with overlap.

Readers (all local; one record per document ``{"id", "text", "source"}``):

* ``.txt`` / ``.md``: one document per file (a folder is walked, sorted);
* ``.jsonl``: one document per line, text in ``text_field`` (``title`` is prepended when the
  record has one, as BEIR does), id in ``id_field`` or the line number;
* ``.csv``: one document per row, the same fields (read with the ``csv`` module);
* ``.pdf``: through ``pypdf`` when it is installed (text per page, joined).

Chunks are windows of ``chunk_tokens`` tokens of the encoder's tokenizer that overlap by
``overlap`` tokens; each chunk's text is the exact character span of the original text that
its tokens cover (from the tokenizer's offsets), so nothing is re-decoded or normalised.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

from absl import logging

from ffrag_jax import files
from ffrag_jax.errors import UserError

SUFFIXES = (".txt", ".md", ".jsonl", ".csv", ".pdf")


def read_documents(path: str | Path, *, text_field: str = "text", id_field: str = "_id",
                   title_field: str | None = "title") -> list[dict]:
    """Documents of a file or folder (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"document path {path} does not exist")
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES) \
        if path.is_dir() else [path]
    if not found:
        raise UserError(f"{path}: no documents ({', '.join(SUFFIXES)})")
    docs: list[dict] = []
    for f in found:
        suffix = f.suffix.lower()
        if suffix in (".txt", ".md"):
            docs.append({"id": str(f.relative_to(path) if path.is_dir() else f.name),
                         "text": files.read_text(f, "document"), "source": str(f)})
        elif suffix == ".jsonl":
            docs.extend(_records(f, files.jsonl_records(f, "document"), text_field, id_field,
                                 title_field))
        elif suffix == ".csv":
            rows = csv.DictReader(files.read_text(f, "document").splitlines(keepends=True))
            docs.extend(_records(f, enumerate(rows, 2), text_field, id_field, title_field))
        elif suffix == ".pdf":
            docs.append({"id": f.name, "text": _pdf_text(f), "source": str(f)})
        else:
            raise UserError(f"{f}: unsupported document type {suffix!r}; "
                            f"supported: {', '.join(SUFFIXES)}")
    return docs


def _records(f: Path, rows: Iterable[tuple[int, dict]], text_field: str, id_field: str,
             title_field: str | None) -> list[dict]:
    out = []
    for number, row in rows:
        if text_field not in row:
            raise UserError(f"{f}:{number}: no {text_field!r} field (fields: {sorted(row)}); "
                            "set the text field")
        text = str(row[text_field] or "")
        title = str(row.get(title_field) or "") if title_field else ""
        out.append({"id": str(row.get(id_field, f"{f.name}:{number}")),
                    "text": f"{title}\n{text}" if title else text, "source": str(f)})
    return out


def _pdf_text(f: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise UserError(f"{f}: reading PDF needs pypdf (pip install pypdf)") from None
    return "\n".join(page.extract_text() or "" for page in PdfReader(str(f)).pages)


def chunk_documents(docs: Sequence[dict], tokenizer, *, chunk_tokens: int = 200,
                    overlap: int = 32) -> list[dict]:
    """Chunks ``{"id": "<doc id>#<n>", "doc_id", "text", "source", "start", "end"}`` of
    ``docs``. Empty or whitespace-only documents are skipped (counted in a warning); a corpus
    with no text at all is an error."""
    if chunk_tokens <= 0 or not 0 <= overlap < chunk_tokens:
        raise UserError(f"chunking needs chunk_tokens > 0 and 0 <= overlap < chunk_tokens, got "
                        f"{chunk_tokens} and {overlap}")
    if not docs:
        raise UserError("the corpus is empty (no documents)")
    stride = chunk_tokens - overlap
    chunks, empty = [], 0
    texts = [d["text"] for d in docs]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)  # long documents are the point: no length warning
    for doc, offsets in zip(docs, encoded["offset_mapping"], strict=True):
        text = doc["text"]
        if not text.strip() or not offsets:
            empty += 1
            continue
        for n, first in enumerate(range(0, max(len(offsets) - overlap, 1), stride)):
            window = offsets[first : first + chunk_tokens]
            start, end = window[0][0], window[-1][1]
            piece = text[start:end]
            if not piece.strip():
                continue
            chunks.append({"id": f"{doc['id']}#{n}", "doc_id": doc["id"], "text": piece,
                           "source": doc.get("source", ""), "start": start, "end": end})
    if empty:
        logging.warning("%d of %d documents are empty or whitespace; skipped", empty, len(docs))
    if not chunks:
        raise UserError("the corpus has no text (every document is empty or whitespace)")
    return chunks
