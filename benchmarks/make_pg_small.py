"""A smaller pg.tar.xz for the GPU machine's 64 MiB carry: every book of the six validation
authors (so `?split=validation` is unchanged) and the first book, by path, of each training
author. BABILong records say when they were made with it (round 8 on).

    python benchmarks/make_pg_small.py ../shared/data/pg.tar.xz .carry/pg_small.tar.xz
"""

from __future__ import annotations

import io
import posixpath
import sys
import tarfile

from foldformer.data.text import PG_VALIDATION_AUTHORS


def main(source: str, target: str) -> None:
    with tarfile.open(source) as src:
        members = src.getmembers()
        books = sorted(m.name for m in members if m.isfile() and m.name.endswith(".txt"))
        keep, authors = set(), set()
        for name in books:  # pg/<author>/<title>.txt
            author = name.split("/")[1]
            if author in PG_VALIDATION_AUTHORS or author not in authors:
                keep.add(name)
                authors.add(author)
        chars = 0
        with tarfile.open(target, "w:xz") as out:
            for member in members:
                if member.isdir():
                    out.addfile(member)
                elif member.name in keep:
                    data = src.extractfile(member).read()
                    chars += len(data)
                    out.addfile(member, io.BytesIO(data))
                elif member.name.endswith("manifest.tsv"):  # the kept books' rows only
                    folder = posixpath.dirname(member.name)  # rows are paths inside it
                    header, *rows = src.extractfile(member).read().decode().splitlines(True)
                    kept = [r for r in rows if posixpath.join(folder, r.split("\t")[0]) in keep]
                    text = header + "".join(kept)
                    member.size = len(text.encode())
                    out.addfile(member, io.BytesIO(text.encode()))
    print(f"{target}: {len(keep)} of {len(books)} books, {chars:,} bytes of text")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
