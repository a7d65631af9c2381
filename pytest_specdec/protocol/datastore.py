"""A token datastore for retrieval drafters (REST): a suffix array over token ids.

Documents are concatenated, each followed by a separator (-1), into one int32 array;
the suffix array lists the positions of every real token in the lexicographic order of
the suffixes starting there. All suffixes that begin with a pattern then form one
contiguous range of the suffix array, found by two binary searches: a lookup costs
O(m log n) token comparisons for a pattern of m tokens, whatever the corpus size. A
pattern never matches across a separator (its ids are >= 0), and because -1 sorts
first, the matches inside a range are ordered by the token that follows them.

Saved as safetensors (``tokens``, ``doc_starts``, ``suffix_array`` and string
metadata: format marker, tokenizer name, vocab size), never as a pickle; written to a
temporary file and moved into place, so a reader never sees half a datastore.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pytest_specdec.atomic import write_with

SEPARATOR = -1
FORMAT = "pytest-specdec-datastore"
VERSION = "1"
#: Positions are int32: a datastore holds fewer tokens than this (split bigger corpora).
MAX_TOKENS = 2**31 - 1


class DatastoreError(ValueError):
    """A datastore or corpus cannot be used; the message names the file and the fix."""


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Start positions of all suffixes of `tokens` in lexicographic order (a proper
    prefix sorts first). Prefix doubling: after round h every suffix is ranked by its
    first 2h tokens, so O(n log n) per round and log2(longest repeat) rounds."""
    n = len(tokens)
    rank = np.unique(np.asarray(tokens), return_inverse=True)[1].reshape(-1).astype(np.int64)
    order = np.argsort(rank)
    h = 1
    while n and rank[order[-1]] < n - 1:  # some suffixes still share a rank
        following = np.zeros(n, dtype=np.int64)  # 0: past the end, sorts first
        following[:n - h] = rank[h:] + 1
        key = rank * (n + 1) + following  # < n**2 + n: fits int64 for n < 2**31
        order = np.argsort(key)
        ordered = key[order]
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.concatenate(([0], np.cumsum(ordered[1:] != ordered[:-1])))
        h *= 2
    return order


@dataclass
class Datastore:
    """Documents of token ids with their suffix array; see the module docstring."""

    tokens: np.ndarray  # int32: each document followed by SEPARATOR
    doc_starts: np.ndarray  # int64: where each document starts in `tokens`
    suffix_array: np.ndarray  # int32: positions of the real tokens, suffixes sorted
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def documents(self) -> int:
        return len(self.doc_starts)

    def __len__(self) -> int:
        """Real tokens (separators excluded)."""
        return len(self.suffix_array)

    def lookup(self, pattern: Sequence[int]) -> range:
        """The suffix-array indices of every occurrence of `pattern` (maybe empty)."""
        pattern = list(pattern)
        tokens, order, m = self.tokens, self.suffix_array, len(pattern)

        def prefix(i: int) -> list[int]:
            start = int(order[i])
            return tokens[start:start + m].tolist()

        lo, hi = 0, len(order)
        while lo < hi:  # first suffix whose m-token prefix is >= pattern
            mid = (lo + hi) // 2
            if prefix(mid) < pattern:
                lo = mid + 1
            else:
                hi = mid
        first, hi = lo, len(order)
        while lo < hi:  # first suffix whose m-token prefix is > pattern
            mid = (lo + hi) // 2
            if prefix(mid) <= pattern:
                lo = mid + 1
            else:
                hi = mid
        return range(first, lo)

    def continues(self, matches: range, length: int) -> bool:
        """Whether some match of a `length`-token pattern has a token after it in its
        document: the last match in the range has the largest next token."""
        return bool(matches) and self.tokens[self.suffix_array[matches[-1]] + length] >= 0

    def continuations(self, matches: range, length: int, depth: int, limit: int) -> np.ndarray:
        """[min(len(matches), limit), depth] tokens following the matches of a
        `length`-token pattern; SEPARATOR from a document's end on.

        Over `limit` matches, evenly spaced ones are taken: the range is sorted by
        continuation, so they keep its frequencies (the first `limit` would not).
        """
        count = len(matches)
        picked = np.arange(count) if count <= limit else np.arange(limit) * count // limit
        starts = self.suffix_array[matches.start + picked].astype(np.int64) + length
        # the array ends with a separator: clipping reads separators past the end
        rows = self.tokens[np.minimum(starts[:, None] + np.arange(depth), len(self.tokens) - 1)]
        rows[np.maximum.accumulate(rows < 0, axis=1)] = SEPARATOR
        return rows

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically (temporary file, then rename); refuse to replace a file
        unless `overwrite`."""
        from safetensors.numpy import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise DatastoreError(f"{path} already exists; pass --force (overwrite=True) "
                                 "to replace it")
        meta = {**self.metadata, "format": FORMAT, "version": VERSION,
                "documents": str(self.documents), "tokens": str(len(self))}
        write_with(path, lambda temp: save_file(
            {"tokens": self.tokens, "doc_starts": self.doc_starts,
             "suffix_array": self.suffix_array}, str(temp), metadata=meta), suffix=".tmp")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Datastore":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DatastoreError(f"no datastore file at {str(path)!r} (build one with "
                                 "`pytest-specdec datastore build`)")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = dict(f.metadata() or {})
                arrays = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise DatastoreError(f"{path} is not a datastore: not a safetensors file "
                                 f"({exc})") from None
        if meta.get("format") != FORMAT:
            raise DatastoreError(f"{path} is not a datastore: its metadata has no "
                                 f"format={FORMAT!r}")
        if meta.get("version") != VERSION:
            raise DatastoreError(f"{path}: datastore version {meta.get('version')!r}, "
                                 f"this pytest-specdec reads version {VERSION}; rebuild it")
        expected = {"tokens": np.int32, "doc_starts": np.int64, "suffix_array": np.int32}
        for name, dtype in expected.items():
            array = arrays.get(name)
            if array is None or array.dtype != dtype or array.ndim != 1:
                raise DatastoreError(f"{path} is not a datastore: needs a 1-D {np.dtype(dtype)} "
                                     f"tensor {name!r}")
        store = cls(arrays["tokens"], arrays["doc_starts"], arrays["suffix_array"], meta)
        separators = int(np.count_nonzero(store.tokens == SEPARATOR))
        if (separators != store.documents or len(store) + separators != len(store.tokens)
                or (len(store.tokens) and store.tokens[-1] != SEPARATOR)):
            raise DatastoreError(f"{path} is damaged: {len(store.tokens)} tokens, "
                                 f"{separators} separators, {store.documents} documents, "
                                 f"{len(store)} suffixes do not add up")
        return store


def build_datastore(token_docs: Iterable[Sequence[int]], **metadata: str) -> Datastore:
    """A datastore over documents of token ids (empty documents are dropped)."""
    docs = [np.asarray(doc, dtype=np.int64) for doc in token_docs]
    docs = [doc for doc in docs if len(doc)]
    total = sum(len(doc) + 1 for doc in docs)
    if total > MAX_TOKENS:
        raise DatastoreError(f"{total} tokens is more than one datastore holds "
                             f"({MAX_TOKENS}); split the corpus")
    if any(doc.min() < 0 or doc.max() > MAX_TOKENS for doc in docs):
        raise DatastoreError("token ids must lie in [0, 2**31)")
    tokens = np.full(total, SEPARATOR, dtype=np.int32)
    doc_starts = np.zeros(len(docs), dtype=np.int64)
    at = 0
    for i, doc in enumerate(docs):
        doc_starts[i] = at
        tokens[at:at + len(doc)] = doc
        at += len(doc) + 1
    order = suffix_array(tokens)
    order = order[tokens[order] != SEPARATOR].astype(np.int32)
    return Datastore(tokens, doc_starts, order, {k: str(v) for k, v in metadata.items()})


# --------------------------------------------------------------------------- corpora


#: A Hugging Face dataset id, "owner/name" or "owner/name:config" (as --specdec-dataset).
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?::[\w.-]+)?$")
_FILE_KINDS = (".txt", ".jsonl")
_SOURCES = ("a .txt or .jsonl file, a local dataset folder, or a Hugging Face dataset id "
            "owner/name[:config]")


def read_documents(source: str | os.PathLike, text_field: str = "text", *,
                   split: str = "train") -> Iterator[str]:
    """The documents of a corpus; the corpus is checked (and a dataset loaded) now, its
    documents are read lazily.

    ``.txt``: one document per paragraph (paragraphs are separated by blank lines; the
    line breaks inside a paragraph are kept). ``.jsonl``: one JSON object per line, the
    document is its `text_field` string (blank lines are skipped). A folder or a
    Hugging Face dataset id ``owner/name[:config]``: loaded with
    ``datasets.load_dataset`` (a folder of .json/.jsonl/.parquet/.csv files needs no
    network), `split` of it, one document per row's `text_field` column.
    """
    path = Path(source)
    if path.is_file():
        if path.suffix == ".txt":
            return _paragraphs(path)
        if path.suffix == ".jsonl":
            return _jsonl_texts(path, text_field)
        raise DatastoreError(f"corpus {str(path)!r}: expected {_SOURCES}")
    if path.is_dir():
        return _dataset_texts(str(path), None, text_field, split)
    if path.suffix not in _FILE_KINDS and _HF_ID.match(str(source)):
        name, _, config = str(source).partition(":")
        return _dataset_texts(name, config or None, text_field, split)
    raise DatastoreError(f"corpus {str(source)!r} does not exist (expected {_SOURCES})")


def _dataset_texts(name: str, config: str | None, text_field: str,
                   split: str) -> Iterator[str]:
    source = f"{name}:{config}" if config else name
    try:
        import datasets
    except ImportError:
        raise DatastoreError(f"corpus {source!r} is a dataset: reading it needs the "
                             "'datasets' package (pip install datasets)") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, not found, bad split, ...: reported the same way
        raise DatastoreError(
            f"could not load the dataset {source!r} (split {split!r}): "
            f"{type(exc).__name__}: {exc}. Without network access, pass a local dataset "
            "folder or .txt/.jsonl files") from None
    columns = list(getattr(dataset, "column_names", None) or ())
    if columns and text_field not in columns:
        raise DatastoreError(f"dataset {source!r} (split {split!r}) has no column "
                             f"{text_field!r} (has: {', '.join(columns)}); choose one with "
                             "--column")
    return _column_texts(dataset, source, text_field)


def _column_texts(dataset: Iterable[dict], source: str, text_field: str) -> Iterator[str]:
    for number, row in enumerate(dataset):
        yield _text_of(row, text_field, f"dataset {source!r} row {number}", "column", "--column")


def _text_of(record: Any, text_field: str, where: str, kind: str, option: str) -> str:
    """The text of one row (a dataset's or a JSONL line's): a clear error naming
    `where`, the missing or non-string `kind` (column, field) and the option to pick it."""
    if not isinstance(record, dict) or text_field not in record:
        has = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DatastoreError(f"{where}: no {kind} {text_field!r} (has: {has}); "
                             f"choose one with {option}")
    text = record[text_field]
    if not isinstance(text, str):
        raise DatastoreError(f"{where}: {kind} {text_field!r} is {type(text).__name__}, "
                             "expected a string")
    return text


def _paragraphs(path: Path) -> Iterator[str]:
    paragraph: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\n")
                paragraph = []
    if paragraph:
        yield "".join(paragraph).rstrip("\n")


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatastoreError(f"{path}:{number}: not valid JSON ({exc})") from None
            yield _text_of(record, text_field, f"{path}:{number}", "field", "--text-field")
