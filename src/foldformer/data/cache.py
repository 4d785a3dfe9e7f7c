"""Token caches: a corpus tokenized once, memory-mapped, reused while nothing changed.

`tokenize_corpus(specs, tokenizer, cache_dir)` concatenates the token ids of every document,
each followed by the end-of-document token, into one flat array on disk::

    cache_dir/<key>/tokens.bin     uint16 (vocab <= 65536) or uint32 token ids
    cache_dir/<key>/doc_starts.npy int64 offset of each document's first token
    cache_dir/<key>/meta.json      names, dtype, counts, the specs and tokenizer name

The key hashes the specs (resolved paths with the size and mtime of every file they cover),
the document options and the tokenizer's serialized content, so editing a file or changing the
tokenizer builds a new cache while an unchanged corpus is opened instantly. A cache is built in
a temporary folder and renamed into place, so an interrupted build never leaves a half cache;
the folder is named after its host and process, and the next build removes those of processes
that are gone (killed mid-build).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from foldformer.data.text import DataError, iter_documents, parse_spec
from foldformer.data.tokenizers import Tokenizer

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path(os.environ.get("FOLDFORMER_CACHE", Path.home() / ".cache" / "foldformer"))


@dataclass
class TokenCorpus:
    """A tokenized corpus: one memory-mapped token array and where each document starts.

    Document i occupies tokens[doc_starts[i] : doc_starts[i+1]] (or to the end), its last
    token being eod_id. len(corpus) is the number of documents.
    """

    tokens: np.ndarray  # np.memmap, read-only
    doc_starts: np.ndarray  # int64, (n_documents,)
    names: list[str]
    eod_id: int
    vocab_size: int
    path: Path | None = None
    reused: bool = False  # True when opened from an existing cache
    doc_ends: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.doc_ends = np.append(self.doc_starts[1:], len(self.tokens)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.doc_starts)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i, without its end-of-document token."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for a corpus of {len(self)} documents")
        i %= len(self)
        return self.tokens[self.doc_starts[i] : self.doc_ends[i] - 1]

    def __repr__(self) -> str:
        return (
            f"TokenCorpus({len(self)} documents, {self.num_tokens} tokens, "
            f"vocab_size={self.vocab_size}, path={str(self.path)!r})"
        )

    @classmethod
    def open(cls, directory: str | os.PathLike) -> TokenCorpus:
        """Open a cache folder written by tokenize_corpus."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a token cache: no meta.json")
        meta = json.loads(meta_path.read_text())
        n_tokens = meta["n_tokens"]
        tokens = np.memmap(
            directory / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(n_tokens,)
        )
        return cls(
            tokens=tokens,
            doc_starts=np.load(directory / "doc_starts.npy"),
            names=meta["names"],
            eod_id=meta["eod_id"],
            vocab_size=meta["vocab_size"],
            path=directory,
        )


def _spec_fingerprint(spec: str) -> dict:
    """Resolved path, and size + mtime of every file it covers (hf: names as given)."""
    path_str, options = parse_spec(spec)
    if path_str.startswith("hf:"):
        return {"spec": spec}
    path = Path(path_str)
    if not path.exists():
        raise FileNotFoundError(f"data path {path_str!r} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = []
    for file in files:
        stat = file.stat()
        stats.append(
            [str(file.relative_to(path)) if file != path else "", stat.st_size, stat.st_mtime_ns]
        )
    return {"path": str(path.resolve()), "options": options, "files": stats}


# .KEY.tmp-HOST-PID-RANDOM: a build in progress, or one whose process was killed
BUILD_NAME = re.compile(r"\.[0-9a-f]+\.tmp-(?P<host>.+)-(?P<pid>\d+)-\w+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_builds(cache_dir: Path) -> None:
    """The temporary folders of builds on this host whose process is gone. (Another host's,
    on a shared disk, cannot be told from a live one and stay.)"""
    host = socket.gethostname()
    for path in cache_dir.glob(".*.tmp-*"):
        match = BUILD_NAME.fullmatch(path.name)
        if match and match["host"] == host and not _alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def cache_key(specs: list[str], tokenizer: Tokenizer, document_options: dict) -> str:
    """The hash under which this corpus + tokenizer is cached."""
    fingerprint = getattr(tokenizer, "fingerprint", None)
    content = {
        "version": CACHE_VERSION,
        "specs": [_spec_fingerprint(os.fspath(s)) for s in specs],
        "options": {
            k: v if not isinstance(v, (set, tuple)) else sorted(v)
            for k, v in sorted(document_options.items())
        },
        "tokenizer": fingerprint() if fingerprint else repr(tokenizer),
        "eod_id": tokenizer.eod_id,
        "vocab_size": tokenizer.vocab_size,
    }
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def tokenize_corpus(
    specs: str | os.PathLike | list[str | os.PathLike],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **document_options,
) -> TokenCorpus:
    """Tokenize every document of the specs (see `iter_documents`), or open the cache.

    Documents are concatenated in order, each followed by tokenizer.eod_id. document_options
    (strip_gutenberg, text_field, errors, include_authors, ...) go to `iter_documents`.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    specs = [os.fspath(s) for s in specs]
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    key = cache_key(specs, tokenizer, document_options)
    final = cache_dir / key
    if (final / "meta.json").is_file():
        corpus = TokenCorpus.open(final)
        corpus.reused = True
        return corpus

    if tokenizer.vocab_size > 2**32:
        raise DataError(f"vocab_size {tokenizer.vocab_size} does not fit uint32 token ids")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(cache_dir)
    prefix = f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=cache_dir))
    try:
        names, starts, offset = [], [], 0
        encode_array = getattr(tokenizer, "encode_array", None)
        eod = np.array([tokenizer.eod_id], dtype=dtype)
        bar = tqdm(
            desc=f"tokenizing {', '.join(specs)[:60]}",
            unit=" docs",
            disable=not progress,
            dynamic_ncols=True,
        )
        encode_batch = getattr(tokenizer, "encode_batch", None)

        def encode_group(texts: list[str]) -> list[np.ndarray]:
            if encode_array is not None:
                return [encode_array(text).astype(dtype) for text in texts]
            if encode_batch is not None:  # HF tokenizers encode a batch on all cores
                return [np.asarray(ids, dtype=dtype) for ids in encode_batch(texts)]
            return [np.asarray(tokenizer.encode(text), dtype=dtype) for text in texts]

        with open(tmp / "tokens.bin", "wb") as out:
            group: list = []
            documents = iter_documents(specs, **document_options)
            for document in itertools.chain(documents, [None]):  # None flushes the last group
                if document is not None:
                    group.append(document)
                if group and (document is None or len(group) == 32):
                    for doc, ids in zip(group, encode_group([d.text for d in group]), strict=True):
                        names.append(doc.name)
                        starts.append(offset)
                        ids.tofile(out)
                        eod.tofile(out)
                        offset += len(ids) + 1
                        bar.update(1)
                    bar.set_postfix(tokens=offset, refresh=False)
                    group = []
        bar.close()
        np.save(tmp / "doc_starts.npy", np.asarray(starts, dtype=np.int64))
        meta = {
            "version": CACHE_VERSION,
            "n_tokens": offset,
            "dtype": np.dtype(dtype).name,
            "eod_id": tokenizer.eod_id,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
            "specs": specs,
            "names": names,
        }
        # meta.json last: its presence marks a complete cache.
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process (e.g. another DDP rank) finished the same cache first.
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenCorpus.open(final)
