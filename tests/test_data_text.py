"""Text loading and tokenizers: real Gutenberg files, archives, records, bad inputs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from foldformer.data.text import (
    PG_VALIDATION_AUTHORS,
    DataError,
    iter_documents,
    normalize_text,
    parse_spec,
    split_by_author,
)
from foldformer.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOOKS = Path(__file__).resolve().parent / "fixtures" / "books"  # excerpts, headers kept


def test_gutenberg_books_are_normalised():
    raw = (BOOKS / "pg84.txt").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw and b"*** START OF" in raw
    docs = list(iter_documents(BOOKS))
    assert [Path(d.name).name for d in docs] == sorted(p.name for p in BOOKS.glob("*.txt"))
    for doc in docs:
        assert "\ufeff" not in doc.text and "\r" not in doc.text
        assert "PROJECT GUTENBERG" not in doc.text.upper()[:2000]
        assert "*** END OF" not in doc.text and "FULL LICENSE" not in doc.text
    frankenstein = next(d for d in docs if d.name.endswith("pg84.txt")).text
    assert "You will rejoice to hear that no disaster" in frankenstein
    assert frankenstein.rstrip().endswith("lost in darkness and distance.")
    # The option turns stripping off: the header stays.
    (kept,) = iter_documents(BOOKS / "pg84.txt", strip_gutenberg=False)
    assert "*** START OF THIS PROJECT GUTENBERG EBOOK FRANKENSTEIN ***" in kept.text


def test_normalize_plain_text_untouched_but_line_ends():
    assert normalize_text("\ufeffa\r\nb\rc\n") == "a\nb\nc\n"
    assert normalize_text("no markers *** here") == "no markers *** here"


def _write_tar(path: Path, members: dict[str, bytes], mode: str = "w:xz") -> None:
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


GUTENBERG = (
    "\ufeffheader line\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n"
    "Body of {}.\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicence\r\n"
)


def test_tar_xz_read_in_place_with_author_split(tmp_path):
    members = {
        "pg/manifest.tsv": b"path\tauthor\n",
        "pg/twain-mark/a.txt": GUTENBERG.format("twain").encode(),
        "pg/austen-jane/b.txt": GUTENBERG.format("austen").encode(),
        "pg/poe-edgar-allan/c.md": b"poe's text",
    }
    archive = tmp_path / "pg.tar.xz"
    _write_tar(archive, members)
    docs = list(iter_documents(archive))
    assert [d.name.split(":")[-1] for d in docs] == [
        "pg/twain-mark/a.txt",
        "pg/austen-jane/b.txt",
        "pg/poe-edgar-allan/c.md",
    ]
    assert docs[0].text == "Body of twain.\n"
    assert list(tmp_path.iterdir()) == [archive]  # nothing extracted
    train, validation = split_by_author(archive, ["Twain, Mark", "poe-edgar-allan"])
    assert [d.text for d in iter_documents(train)] == ["Body of austen.\n"]
    assert [d.text for d in iter_documents(validation)] == ["Body of twain.\n", "poe's text"]
    # split=train names all six PG validation authors; four are absent here, so it is an error.
    with pytest.raises(DataError, match="kipling-rudyard"):
        list(iter_documents(f"{archive}?split=train"))
    # Authors may be given as in the manifest; a typo is an error, never a silent no-op.
    (doc,) = iter_documents(archive, include_authors=["Austen, Jane"])
    assert doc.text == "Body of austen.\n"
    with pytest.raises(DataError, match="austin-jane"):
        list(iter_documents(archive, exclude_authors=["Austin, Jane"]))
    assert parse_spec(f"{archive}?split=train") == (str(archive), {"split": "train"})


@pytest.mark.skipif(not (DATA / "pg.tar.xz").is_file(), reason="shared/data/pg.tar.xz absent")
def test_pg_validation_authors_exist_in_archive():
    with tarfile.open(DATA / "pg.tar.xz", "r|xz") as archive:
        authors = {m.name.split("/")[1] for m in archive if m.name.count("/") == 2}
    assert set(PG_VALIDATION_AUTHORS) <= authors


def test_jsonl_and_gz_tar(tmp_path):
    lines = [{"text": "first doc"}, {"text": ""}, {"text": "third\r\ndoc", "id": 3}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    with pytest.warns(UserWarning, match="1 record"):
        docs = list(iter_documents(path))
    assert [(d.name, d.text) for d in docs] == [
        (f"{path}:1", "first doc"),
        (f"{path}:3", "third\ndoc"),
    ]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no field 'text'"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (doc,) = iter_documents(f"{tmp_path / 'bad.jsonl'}?text_field=body")
    assert doc.text == "x"
    _write_tar(tmp_path / "d.tar.gz", {"x/c.jsonl": path.read_bytes()}, mode="w:gz")
    with pytest.warns(UserWarning):
        assert len(list(iter_documents(tmp_path / "d.tar.gz"))) == 2


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        list(iter_documents(tmp_path / "nowhere.txt"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.warns(UserWarning, match="empty.txt is empty"):
        assert [d.text for d in iter_documents(tmp_path)] == ["fine"]
    # A corpus that yields nothing at all is an error, not an empty stream.
    with pytest.warns(UserWarning), pytest.raises(DataError, match="yielded no documents"):
        list(iter_documents(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not valid UTF-8 \(byte 0xe9 at offset 3"):
        list(iter_documents(tmp_path / "latin1.txt"))
    with pytest.warns(UserWarning, match="latin1.txt"):
        (doc,) = iter_documents(f"{tmp_path / 'latin1.txt'}?errors=replace")
    assert doc.text == "caf\ufffd"
    with pytest.raises(DataError, match="unknown option 'colour'"):
        list(iter_documents(f"{tmp_path}?colour=red"))
    (doc,) = iter_documents(tmp_path, include_authors=[tmp_path.name], filter=lambda n: "ok" in n)
    assert doc.text == "fine"


def test_parquet_without_pyarrow_says_how_to_install(tmp_path):
    # pyarrow is optional: with it parquet is read, without it the error says how to install.
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pyarrow"):
            list(iter_documents(tmp_path / "x.parquet"))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "x.parquet")
        assert [d.text for d in iter_documents(tmp_path / "x.parquet")] == ["a", "b"]


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    text = "Grüße, 世界! \n"
    ids = tok.encode(text)
    assert ids == list(text.encode()) and max(ids) < 256 and tok.eod_id == 256
    assert tok.decode(ids + [tok.eod_id]) == text
    assert isinstance(tok, Tokenizer)
    tok.save(tmp_path)  # a Hugging Face folder (tests/test_hf.py loads it with AutoTokenizer)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="no-such"):
        load_tokenizer(tmp_path / "no-such")


def test_bpe_training_round_trip(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 50 + "Ünïcödé ✓ text.\n"
    (tmp_path / "a.txt").write_text(text)
    out = tmp_path / "tok" / "tokenizer.json"
    tok = train_bpe([str(tmp_path / "a.txt")], vocab_size=300, output_path=out, progress=False)
    assert out.is_file() and 257 < tok.vocab_size <= 300  # a small text has fewer merges
    sample = "the lazy fox, Ünïcödé ✓ and unseen wörds 123"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox")
    loaded = load_tokenizer(out.parent)
    assert isinstance(loaded, HFTokenizer) and loaded.eod_id == tok.eod_id
    assert loaded.encode(sample) == tok.encode(sample)
    assert loaded.decode([loaded.eod_id]) == "<|endoftext|>"
    with pytest.raises(DataError, match="vocab_size must be"):
        train_bpe([str(tmp_path / "a.txt")], vocab_size=100, progress=False)


def test_tokenizer_cli(tmp_path, capsys):
    from foldformer.cli import main

    (tmp_path / "a.txt").write_text("hello hello hello world world " * 20)
    out = tmp_path / "tokenizer.json"
    assert (
        main(["tokenizer", "train", "--vocab-size", "280", str(tmp_path), "-o", str(out), "-q"])
        == 0
    )
    assert 257 < load_tokenizer(out).vocab_size <= 280
