"""Data: text loading, tokenizers, token caches, training streams, synthetic tasks, BABILong.

See docs/data.md. Synthetic tasks and BABILong live in `foldformer.data.synthetic` and
`foldformer.data.babilong`; `parse_data_spec` / `build_batch_source` turn --data strings into
batch sources.
"""

from foldformer.data.cache import TokenCorpus, tokenize_corpus
from foldformer.data.sources import DataSpec, build_batch_source, parse_data_spec
from foldformer.data.streams import Batch, BatchSource, TextStreams
from foldformer.data.text import (
    PG_VALIDATION_AUTHORS,
    DataError,
    Document,
    iter_documents,
    split_by_author,
)
from foldformer.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "PG_VALIDATION_AUTHORS",
    "Batch",
    "BatchSource",
    "ByteTokenizer",
    "DataError",
    "DataSpec",
    "Document",
    "HFTokenizer",
    "TextStreams",
    "TokenCorpus",
    "Tokenizer",
    "build_batch_source",
    "iter_documents",
    "load_tokenizer",
    "parse_data_spec",
    "split_by_author",
    "tokenize_corpus",
    "train_bpe",
]
