"""Tokenizers: bytes (the default, no files) and any Hugging Face `tokenizers` tokenizer.json.

Both follow one small protocol (`Tokenizer`): ``vocab_size``, ``eod_id`` (the end-of-document
token every document ends with), ``encode``, ``decode``, ``name`` and ``save(directory)``.
`save` writes a Hugging Face tokenizer folder (tokenizer.json and tokenizer_config.json), so
``transformers.AutoTokenizer.from_pretrained(directory)`` loads it: the byte tokenizer as a
byte-level tokenizer.json with the same ids. `load_tokenizer` reads those folders, and the
folders written before (a byte tokenizer's tokenizer_config.json {"type": "bytes"}).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from foldformer.data.text import DataError, Document, iter_documents

EOD_TOKEN = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, the trainer and the evaluations need from a tokenizer."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...

    def fingerprint(self) -> str:
        """A string that changes whenever the token ids of some text would (cache keys)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus the end-of-document token 256."""

    name = "bytes"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """encode() as a uint8 array, without a Python list (fast path for the token cache)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        # Special tokens have no bytes; a cut multi-byte character becomes U+FFFD.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        save_hf_folder(byte_level_tokenizer(), directory)

    def fingerprint(self) -> str:
        return "bytes-v1"

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def byte_level_tokenizer():
    """`ByteTokenizer` as a Hugging Face `tokenizers.Tokenizer`: byte b is token b (spelled by
    GPT-2's byte-to-character table), "<|endoftext|>" is token 256, no merges."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _HF
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = _HF(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
    return tokenizer


def save_hf_folder(tokenizer, directory: str | os.PathLike) -> None:
    """tokenizer.json and the tokenizer_config.json `transformers.AutoTokenizer` reads (a fast
    tokenizer whose end-of-sequence token is "<|endoftext|>")."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOD_TOKEN).save_pretrained(
        directory
    )
    # transformers' copy of tokenizer.json adds an empty post-processor: the file stays
    # foldformer's, so the tokenizer's fingerprint (token caches, saved states) is unchanged.
    tokenizer.save(str(directory / "tokenizer.json"))


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` behind the `Tokenizer` protocol.

    The end-of-document token "<|endoftext|>" is added as a special token if missing.
    """

    def __init__(self, tokenizer, name: str = "tokenizer.json"):
        self.tokenizer = tokenizer
        self.name = name
        eod = tokenizer.token_to_id(EOD_TOKEN)
        if eod is None:
            from tokenizers import AddedToken

            tokenizer.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
            eod = tokenizer.token_to_id(EOD_TOKEN)
        self._eod_id = int(eod)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        try:
            tokenizer = _HF.from_file(str(path))
        except Exception as error:  # the Rust error does not name the file
            raise DataError(f"{path} is not a valid tokenizer.json: {error}") from None
        return cls(tokenizer, name=str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int:
        return self._eod_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        save_hf_folder(self.tokenizer, directory)

    def fingerprint(self) -> str:
        return self.tokenizer.to_str()

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _from_file(path: Path) -> Tokenizer:
    """A tokenizer.json: the byte tokenizer's (as `ByteTokenizer.save` writes it) or any other."""
    tokenizer = HFTokenizer.from_file(path)
    if (
        tokenizer.vocab_size == ByteTokenizer.vocab_size
        and tokenizer.fingerprint() == byte_level_tokenizer().to_str()
    ):
        return ByteTokenizer()
    return tokenizer


def load_tokenizer(spec: str | os.PathLike | Tokenizer | None = "bytes") -> Tokenizer:
    """A tokenizer from "bytes", a tokenizer.json path, or a directory holding tokenizer.json
    or (written before tokenizer.json was) a byte tokenizer's tokenizer_config.json. A
    Tokenizer is returned as is."""
    if spec is None:
        return ByteTokenizer()
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    text = os.fspath(spec)
    if text in ("bytes", "byte"):
        return ByteTokenizer()
    path = Path(text)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_file(path / "tokenizer.json")
        config = path / "tokenizer_config.json"
        if config.is_file():  # a byte tokenizer saved before it wrote tokenizer.json
            values = json.loads(config.read_text())
            if values.get("type") == "bytes":
                return ByteTokenizer()
            raise DataError(f"{config}: unknown tokenizer type {values.get('type')!r}")
        raise FileNotFoundError(f"no tokenizer.json or tokenizer_config.json in {text!r}")
    if path.is_file():
        return _from_file(path)
    raise FileNotFoundError(
        f"tokenizer {text!r} is neither 'bytes' nor an existing tokenizer.json or directory"
    )


def _texts(
    inputs: Iterable[Document | str] | str | os.PathLike, document_options: dict
) -> Iterator[str]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs) if not isinstance(inputs, Iterator) else inputs
    if isinstance(inputs, list) and all(isinstance(i, (str, os.PathLike)) for i in inputs):
        for document in iter_documents(inputs, **document_options):
            yield document.text
        return
    for item in inputs:
        yield item.text if isinstance(item, Document) else str(item)


def train_bpe(
    inputs: Iterable[Document | str] | str | os.PathLike,
    vocab_size: int,
    output_path: str | os.PathLike | None = None,
    progress: bool = True,
    min_frequency: int = 2,
    **document_options,
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) with Hugging Face `tokenizers`.

    inputs: data specs (paths, see `iter_documents`) or Documents. vocab_size counts the 256
    byte tokens and "<|endoftext|>". Writes tokenizer.json to output_path if given.
    """
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise DataError(
            f"vocab_size must be an integer >= 257 (256 bytes + {EOD_TOKEN}), got {vocab_size!r}"
        )
    tokenizer = _HF(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in _texts(inputs, document_options):
            count += 1
            yield text

    tokenizer.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise DataError("train_bpe got no text to train on")
    result = HFTokenizer(tokenizer, name=str(output_path) if output_path else "bpe")
    if output_path is not None:
        output_path = Path(output_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(output_path))
    return result
