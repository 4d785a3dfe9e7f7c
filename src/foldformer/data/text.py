"""Text loading: files, directories, archives and datasets, as a stream of documents.

A *spec* names a corpus::

    books/pg84.txt                  one .txt or .md file: one document
    books/                          a directory: every .txt/.md/.jsonl/.parquet under it, sorted
    corpus.jsonl                    one document per line, text in the field "text"
    corpus.parquet                  one document per row (needs pyarrow)
    pg.tar.xz                       a tar archive (.tar, .tar.gz, .tgz, .tar.xz, .tar.bz2), read in
                                    place: members are streamed, never extracted
    hf:NAME[:SPLIT]                 a Hugging Face dataset by name (needs `datasets`)
    saved_dataset/                  a directory written by `datasets.save_to_disk`

Options may follow a path after ``?``, joined by ``&`` (the same keywords as `iter_documents`)::

    pg.tar.xz?split=train                       all authors but PG_VALIDATION_AUTHORS
    pg.tar.xz?split=validation                  only PG_VALIDATION_AUTHORS
    pg.tar.xz?exclude_authors=twain-mark,poe-edgar-allan
    notes/?strip_gutenberg=false&errors=replace

Every document is normalised the same way: a byte-order mark is dropped, CRLF/CR line ends
become LF, and a Project Gutenberg licence header and footer are cut off (automatically when
the ``*** START OF ... ***`` markers are present). The author of a file is the name of the
folder that holds it (``pg/<author>/<title>.txt``), compared in slug form (``Twain, Mark`` and
``twain-mark`` are the same author).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".parquet")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")

# The fixed author split of shared/data/pg.tar.xz (its README): these authors are held out.
PG_VALIDATION_AUTHORS = (
    "twain-mark",
    "poe-edgar-allan",
    "kipling-rudyard",
    "verne-jules",
    "conrad-joseph",
    "wharton-edith",
)


class DataError(ValueError):
    """Bad input data; the message names the offending file, line or value."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a name (where it came from) and its normalised text."""

    name: str
    text: str


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

# Project Gutenberg files come in two generations. Current ones enclose the book in
# "*** START OF ... ***" / "*** END OF ... ***" lines; older "Etext" files (before about 2004)
# have a free-form header, often ending with "*END*THE SMALL PRINT!...*END*", and a trailer that
# begins with "End of the Project Gutenberg Etext ..." or a repeat of the title line.
_PG_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*$", re.M | re.I)
_PG_OLD_HEADER_END = re.compile(
    r"^\*END\*? ?THE SMALL PRINT[^\n]*$|^[^\n]*This file should be named[^\n]*$", re.M | re.I
)
_PG_END = re.compile(
    r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|^End of (?:the |this )?Project Gutenberg"
    r"|^End Project Gutenberg"
    r"|^The Project Gutenberg Etext of"
    r"|^\*\*The Legal Small Print"
    r"|^\*\*\*START\*\*THE SMALL PRINT",
    re.M | re.I,
)
# A paragraph next to the body that talks about the distribution, not the book.
_PG_BOILERPLATE = re.compile(
    r"project gutenberg|gutenberg\.(?:org|net)|\be-?texts?\b|small print|donation"
    r"|\A\s*produced by|\A[^a-z]*\Z",
    re.I,
)


def has_gutenberg_markers(text: str) -> bool:
    """True if text looks like a raw Project Gutenberg file (current or old header)."""
    if _PG_START.search(text):
        return True
    head = text[:5000]
    return "project gutenberg" in head.lower() and _PG_OLD_HEADER_END.search(head) is not None


def strip_gutenberg_text(text: str) -> str:
    """The book inside a raw Project Gutenberg file (LF line ends expected).

    The body runs from the start marker (or the end of an old-style header) to the earliest
    end marker or trailer line after it; distribution notices adjacent to the body (producer
    credits that mention Project Gutenberg, donation requests) are dropped too. Text without
    a recognisable header is returned unchanged.
    """
    start = _PG_START.search(text)
    if start is None:
        header_ends = [m for m in _PG_OLD_HEADER_END.finditer(text) if m.start() < len(text) // 2]
        small_print = [m for m in header_ends if "small print" in m.group(0).lower()]
        start = (small_print or header_ends or [None])[-1 if small_print else 0]
        if start is None:
            return text
    end = _PG_END.search(text, start.end())
    body = text[start.end() : end.start() if end else len(text)]
    paragraphs = re.split(r"\n\s*\n", body.strip("\n"))
    first, last = 0, len(paragraphs)
    while first < min(last, 30) and _PG_BOILERPLATE.search(paragraphs[first]):
        first += 1
    while last > max(first, len(paragraphs) - 30) and _PG_BOILERPLATE.search(paragraphs[last - 1]):
        last -= 1
    if first >= last:  # everything looked like boilerplate: keep the raw body instead
        return body.strip("\n") + "\n"
    # Cut on the original text so the body's own blank-line layout survives.
    head = body.index(paragraphs[first])
    tail = body.rindex(paragraphs[last - 1]) + len(paragraphs[last - 1])
    return body[head:tail] + "\n"


def normalize_text(text: str, strip_gutenberg: bool | None = None) -> str:
    """Drop a byte-order mark, turn CRLF/CR into LF, and strip a Gutenberg header/footer.

    strip_gutenberg: True strips, False keeps, None strips when the markers are present.
    """
    text = text.lstrip("\ufeff")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if strip_gutenberg or (strip_gutenberg is None and has_gutenberg_markers(text)):
        text = strip_gutenberg_text(text)
    return text


def decode_bytes(data: bytes, name: str, errors: str = "strict") -> str:
    """UTF-8 decode; errors="strict" raises DataError naming the file, "replace" warns."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        where = f"byte 0x{data[error.start]:02x} at offset {error.start}"
        if errors == "replace":
            warnings.warn(
                f"{name}: not valid UTF-8 ({where}); decoded with replacement characters",
                stacklevel=3,
            )
            return data.decode("utf-8", errors="replace")
        raise DataError(
            f"{name} is not valid UTF-8 ({where}); convert it to UTF-8, or pass "
            "errors='replace' (spec option ?errors=replace) to decode it with replacement "
            "characters"
        ) from None


# ---------------------------------------------------------------------------------------------
# Authors
# ---------------------------------------------------------------------------------------------


def author_slug(author: str) -> str:
    """'Twain, Mark' -> 'twain-mark' (the folder names of pg.tar.xz)."""
    return re.sub(r"[^a-z0-9]+", "-", author.lower()).strip("-")


def author_of(name: str) -> str:
    """The author of a file named ``.../<author>/<title>.txt``: its folder's name, slugged."""
    parts = name.replace("\\", "/").split("/")
    return author_slug(parts[-2]) if len(parts) >= 2 else ""


class _AuthorFilter:
    """Keeps files by author; remembers which requested authors were seen, to catch typos."""

    def __init__(self, include: Iterable[str] | None, exclude: Iterable[str] | None):
        self.include = None if include is None else {author_slug(a) for a in include}
        self.exclude = set() if exclude is None else {author_slug(a) for a in exclude}
        self.seen: set[str] = set()

    @property
    def active(self) -> bool:
        return self.include is not None or bool(self.exclude)

    def __call__(self, name: str) -> bool:
        author = author_of(name)
        self.seen.add(author)
        if self.include is not None and author not in self.include:
            return False
        return author not in self.exclude

    def check(self, spec: str) -> None:
        requested = (self.include or set()) | self.exclude
        missing = sorted(requested - self.seen)
        if missing:
            known = ", ".join(sorted(a for a in self.seen if a)[:100])
            raise DataError(
                f"author(s) {missing} not found in {spec}; authors are the folder names of the "
                f"files, known: {known}"
            )


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_spec(spec: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Split ``path?key=value&...`` into the path and `iter_documents` keyword options."""
    spec = os.fspath(spec)
    if "?" not in spec or Path(spec).exists():
        return spec, {}
    path, _, query = spec.rpartition("?")
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"option {item!r} in data spec {spec!r} is not of the form key=value")
        if key in ("include_authors", "exclude_authors", "authors"):
            options["include_authors" if key == "authors" else key] = [
                a for a in value.split(",") if a
            ]
        elif key == "split":
            if value not in ("train", "validation"):
                raise DataError(
                    f"split={value!r} in data spec {spec!r}: expected 'train' or 'validation' "
                    "(the author split PG_VALIDATION_AUTHORS)"
                )
            options["split"] = value
        elif key == "strip_gutenberg":
            if value.lower() not in _BOOL and value.lower() not in ("auto", "none"):
                raise DataError(f"strip_gutenberg={value!r} in {spec!r}: use true, false or auto")
            options[key] = _BOOL.get(value.lower())
        elif key in ("text_field", "errors"):
            options[key] = value
        else:
            raise DataError(
                f"unknown option {key!r} in data spec {spec!r}; known: split, include_authors, "
                "exclude_authors, strip_gutenberg, text_field, errors"
            )
    return path, options


def split_by_author(
    spec: str | os.PathLike, validation_authors: Iterable[str] = PG_VALIDATION_AUTHORS
) -> tuple[str, str]:
    """Training and validation specs of a ``<author>/<title>.txt`` corpus, split by author."""
    authors = ",".join(author_slug(a) for a in validation_authors)
    path = os.fspath(spec)
    return f"{path}?exclude_authors={authors}", f"{path}?include_authors={authors}"


def is_tar(path: str | Path) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def iter_documents(
    spec: str | os.PathLike | Iterable[str | os.PathLike],
    strip_gutenberg: bool | None = None,
    text_field: str = "text",
    errors: str = "strict",
    include_authors: Iterable[str] | None = None,
    exclude_authors: Iterable[str] | None = None,
    split: str | None = None,
    filter: Callable[[str], bool] | None = None,
) -> Iterator[Document]:
    """Stream the documents of one spec or a list of specs (see the module docstring).

    strip_gutenberg: True/False forces Project Gutenberg header stripping; None detects it.
    text_field: the field holding the text in .jsonl/.parquet records and datasets.
    errors: "strict" raises on non-UTF-8 bytes naming the file; "replace" warns and decodes.
    include_authors / exclude_authors: keep or drop files by the folder that holds them.
    split: "train" / "validation" — shorthand for excluding / including PG_VALIDATION_AUTHORS.
    filter: keep a file only if filter(name) is true (name: path, or archive:member).

    Raises DataError if the specs yield no document at all, and FileNotFoundError naming a
    missing path. Empty files are skipped with a warning.
    """
    if errors not in ("strict", "replace"):
        raise DataError(f"errors must be 'strict' or 'replace', got {errors!r}")
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise DataError("no data spec given")
    defaults = dict(
        strip_gutenberg=strip_gutenberg,
        text_field=text_field,
        errors=errors,
        include_authors=include_authors,
        exclude_authors=exclude_authors,
        split=split,
    )
    count = 0
    for one in specs:
        path, options = parse_spec(one)
        kwargs = {**defaults, **options}
        for document in _iter_spec(path, filter=filter, **kwargs):
            count += 1
            yield document
    if count == 0:
        raise DataError(f"data spec(s) {[os.fspath(s) for s in specs]} yielded no documents")


def _iter_spec(
    path_str: str,
    strip_gutenberg: bool | None,
    text_field: str,
    errors: str,
    include_authors: Iterable[str] | None,
    exclude_authors: Iterable[str] | None,
    split: str | None,
    filter: Callable[[str], bool] | None,
) -> Iterator[Document]:
    if split == "train":
        exclude_authors = [*(exclude_authors or []), *PG_VALIDATION_AUTHORS]
    elif split == "validation":
        include_authors = [*(include_authors or []), *PG_VALIDATION_AUTHORS]
    elif split is not None:
        raise DataError(f"split must be 'train' or 'validation', got {split!r}")
    authors = _AuthorFilter(include_authors, exclude_authors)

    def keep(name: str) -> bool:
        if authors.active and not authors(name):
            return False
        return filter is None or filter(name)

    read = dict(strip_gutenberg=strip_gutenberg, text_field=text_field, errors=errors)

    if path_str.startswith("hf:"):
        yield from _iter_hf_dataset(path_str, text_field, strip_gutenberg)
        return
    path = Path(path_str)
    if not path.exists():
        raise FileNotFoundError(f"data path {path_str!r} does not exist")
    if _is_saved_dataset(path):
        yield from _iter_saved_dataset(path, text_field, strip_gutenberg)
    elif path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.name.lower().endswith(TEXT_SUFFIXES + RECORD_SUFFIXES)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(
                f"directory {path_str!r} holds no {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} "
                "files"
            )
        for file in files:
            if keep(str(file)):
                yield from _iter_file(file, **read)
    elif is_tar(path):
        yield from _iter_tar(path, keep, **read)
    elif path.name.lower().endswith(TEXT_SUFFIXES + RECORD_SUFFIXES):
        if keep(str(path)):
            yield from _iter_file(path, **read)
    else:
        raise DataError(
            f"cannot read {path_str!r}: expected a directory, a {'/'.join(TEXT_SUFFIXES)} or "
            f"{'/'.join(RECORD_SUFFIXES)} file, or a tar archive ({', '.join(TAR_SUFFIXES)})"
        )
    if authors.active:
        authors.check(path_str)


def _iter_file(
    path: Path, strip_gutenberg: bool | None, text_field: str, errors: str
) -> Iterator[Document]:
    if path.name.lower().endswith(".parquet"):
        yield from _iter_parquet(path, text_field, strip_gutenberg)
        return
    yield from _documents_from_bytes(
        str(path), path.read_bytes(), strip_gutenberg, text_field, errors
    )


def _documents_from_bytes(
    name: str, data: bytes, strip_gutenberg: bool | None, text_field: str, errors: str
) -> Iterator[Document]:
    if name.lower().endswith(".parquet"):
        yield from _iter_parquet(io.BytesIO(data), text_field, strip_gutenberg, name=name)
        return
    if not data.strip():
        warnings.warn(f"{name} is empty; skipped", stacklevel=4)
        return
    text = decode_bytes(data, name, errors)
    if name.lower().endswith(".jsonl"):
        yield from _iter_jsonl(name, text, strip_gutenberg, text_field)
        return
    text = normalize_text(text, strip_gutenberg)
    if not text.strip():
        warnings.warn(f"{name} has no text left after normalisation; skipped", stacklevel=4)
        return
    yield Document(name, text)


def _iter_jsonl(
    name: str, text: str, strip_gutenberg: bool | None, text_field: str
) -> Iterator[Document]:
    empty = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{name}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{name}:{number}: no field {text_field!r} (has {keys}); choose the field with "
                "text_field=... (spec option ?text_field=...)"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{name}:{number}: field {text_field!r} holds {type(value).__name__}, not text"
            )
        value = normalize_text(value, strip_gutenberg)
        if not value.strip():
            empty += 1
            continue
        yield Document(f"{name}:{number}", value)
    if empty:
        warnings.warn(f"{name}: {empty} record(s) with empty text skipped", stacklevel=4)


def _iter_records(
    name: str, texts: Iterable[Any], strip_gutenberg: bool | None, text_field: str
) -> Iterator[Document]:
    empty = 0
    for index, value in enumerate(texts):
        if not isinstance(value, str):
            raise DataError(
                f"{name} row {index}: field {text_field!r} holds {type(value).__name__}, not text"
            )
        value = normalize_text(value, strip_gutenberg)
        if not value.strip():
            empty += 1
            continue
        yield Document(f"{name}#{index}", value)
    if empty:
        warnings.warn(f"{name}: {empty} row(s) with empty text skipped", stacklevel=4)


def _iter_parquet(
    source: Path | io.BytesIO,
    text_field: str,
    strip_gutenberg: bool | None,
    name: str | None = None,
) -> Iterator[Document]:
    name = name or str(source)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {name} needs pyarrow: pip install pyarrow (or convert it to .jsonl)"
        ) from None
    table = pq.ParquetFile(source)
    if text_field not in table.schema_arrow.names:
        raise DataError(
            f"{name}: no column {text_field!r} (has {table.schema_arrow.names}); choose it with "
            "text_field=..."
        )

    def texts() -> Iterator[Any]:
        for batch in table.iter_batches(columns=[text_field]):
            yield from batch.column(0).to_pylist()

    yield from _iter_records(name, texts(), strip_gutenberg, text_field)


def _iter_tar(
    path: Path,
    keep: Callable[[str], bool],
    strip_gutenberg: bool | None,
    text_field: str,
    errors: str,
) -> Iterator[Document]:
    # "r|*" reads the archive as a stream: members in archive order, nothing extracted.
    try:
        archive = tarfile.open(path, mode="r|*")
    except tarfile.TarError as error:
        raise DataError(f"cannot read tar archive {path}: {error}") from None
    with archive:
        for member in archive:
            if not member.isfile():
                continue
            if not member.name.lower().endswith(TEXT_SUFFIXES + RECORD_SUFFIXES):
                continue
            name = f"{path}:{member.name}"
            if not keep(member.name):
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            yield from _documents_from_bytes(
                name, handle.read(), strip_gutenberg, text_field, errors
            )


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{what} needs the Hugging Face `datasets` package: pip install datasets "
            "(or pip install 'foldformer[hf]')"
        ) from None
    return datasets


def _iter_hf_dataset(
    spec: str, text_field: str, strip_gutenberg: bool | None
) -> Iterator[Document]:
    _, name, *rest = spec.split(":")
    split = rest[0] if rest else "train"
    if not name:
        raise DataError(f"data spec {spec!r}: expected hf:NAME[:SPLIT]")
    datasets = _import_datasets(f"data spec {spec!r}")
    dataset = datasets.load_dataset(name, split=split)
    yield from _iter_dataset(f"hf:{name}:{split}", dataset, text_field, strip_gutenberg)


def _iter_saved_dataset(
    path: Path, text_field: str, strip_gutenberg: bool | None
) -> Iterator[Document]:
    datasets = _import_datasets(f"the saved dataset {path}")
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        for split in sorted(dataset):
            yield from _iter_dataset(f"{path}:{split}", dataset[split], text_field, strip_gutenberg)
    else:
        yield from _iter_dataset(str(path), dataset, text_field, strip_gutenberg)


def _iter_dataset(
    name: str, dataset: Any, text_field: str, strip_gutenberg: bool | None
) -> Iterator[Document]:
    if text_field not in dataset.column_names:
        raise DataError(
            f"{name}: no column {text_field!r} (has {dataset.column_names}); choose it with "
            "text_field=..."
        )
    texts = (row[text_field] for row in dataset.select_columns([text_field]))
    yield from _iter_records(name, texts, strip_gutenberg, text_field)
