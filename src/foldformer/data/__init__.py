"""Data: text loading, tokenizers, token caches, training streams, synthetic tasks, BABILong.

See docs/data.md. Submodules are imported lazily by name so that `import foldformer.data`
stays cheap.
"""

from foldformer.data.text import PG_VALIDATION_AUTHORS, DataError, Document, iter_documents
from foldformer.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "PG_VALIDATION_AUTHORS",
    "ByteTokenizer",
    "DataError",
    "Document",
    "HFTokenizer",
    "Tokenizer",
    "iter_documents",
    "load_tokenizer",
]
