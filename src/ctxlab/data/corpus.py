"""Documents as a ``datasets.DatasetDict`` with splits train / validation / test.

Every split has the string columns ``id``, ``title`` and ``text``, one row per document.

Sources:

- ``books``: the corpus shipped in ``ctxlab/data/books/books.jsonl.gz`` (Austen's novels,
  the 66 books of the King James Bible, 37 Shakespeare plays; see ``PROVENANCE.md`` there),
  read with ``datasets.load_dataset("json", ...)``.
- ``local``: files, folders or glob patterns. ``.txt`` (also ``.txt.gz``): one document per
  file, ``id`` the path, ``title`` the file name without suffix. ``.jsonl``/``.json`` (also
  gzipped) and ``.parquet``: one document per record, text in ``text_field``.
- ``hub``: ``datasets.load_dataset(hub_name, hub_config, revision=hub_revision)``; its own
  train/validation/test splits are kept when it has all three (PG19 does), otherwise its
  ``train`` split is split here. Needs a network; never used in tests.

Records (jsonl, parquet, hub) take ``id`` from ``id_field`` and ``title`` from ``title_field``
when those are set, else ``id`` is ``doc-<row>`` in load order and ``title`` equals ``id``.
Documents whose text is empty or only whitespace are dropped (and counted in the log).

Sources without splits are split by document: each document's rank is the sha256 of
``"<seed>:<id>"``; the lowest ``max(1, round(n * test_fraction))`` go to test, the next
``max(1, round(n * val_fraction))`` to validation, the rest to train, each split keeping corpus
order. A document's split depends only on its id, the seed and the split sizes, not on numpy's
random streams or on file order.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset

log = logging.getLogger(__name__)

BOOKS_FILE = Path(__file__).resolve().parent / "books" / "books.jsonl.gz"
SOURCES = ("books", "local", "hub")
SPLITS = ("train", "validation", "test")
COLUMNS = ("id", "title", "text")
_SUFFIXES = {
    ".txt": "text",
    ".txt.gz": "text",
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}


def check_corpus_args(
    *,
    source: str,
    paths: Sequence[str] = (),
    text_field: str = "text",
    id_field: str | None = None,
    title_field: str | None = None,
    hub_name: str | None = None,
    hub_config: str | None = None,
    hub_revision: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> None:
    """Raise ValueError for a setting the source cannot use or a bad split fraction.

    Cheap: touches no file. Settings that a source would ignore are refused, not dropped.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is unknown; expected one of {SOURCES}")
    if source == "local" and not paths:
        raise ValueError("source='local' needs paths (files, folders or glob patterns)")
    if source != "local" and paths:
        raise ValueError(f"paths={list(paths)} is only read by source='local', not {source!r}")
    if source == "hub" and not hub_name:
        raise ValueError("source='hub' needs hub_name (e.g. 'deepmind/pg19')")
    hub_args = {"hub_name": hub_name, "hub_config": hub_config, "hub_revision": hub_revision}
    for name, value in hub_args.items():
        if source != "hub" and value is not None:
            raise ValueError(f"{name}={value!r} is only read by source='hub', not {source!r}")
    if source == "books":
        fields = {"text_field": (text_field, "text"), "id_field": (id_field, None)}
        fields["title_field"] = (title_field, None)
        for name, (value, default) in fields.items():
            if value != default:
                raise ValueError(f"{name}={value!r}: source='books' has fixed fields")
    if not text_field:
        raise ValueError("text_field must name a column")
    for name, value in {"val_fraction": val_fraction, "test_fraction": test_fraction}.items():
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name}={value} must lie in (0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction={val_fraction} + test_fraction={test_fraction} leaves no train split")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def resolve_paths(paths: Sequence[str]) -> list[Path]:
    """Expand files, folders (searched recursively) and glob patterns into a sorted file list.

    Raises FileNotFoundError naming a path or pattern that matches nothing, and ValueError
    naming a file whose suffix is not one of .txt, .jsonl, .json (optionally .gz), .parquet.
    Files appear once, in the order of ``paths``, each entry's matches sorted.
    """
    if isinstance(paths, str):
        paths = [paths]
    files: dict[Path, None] = {}
    for entry in paths:
        entry = str(Path(entry).expanduser())
        if glob.has_magic(entry):
            matches = sorted(Path(p) for p in glob.glob(entry, recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise FileNotFoundError(f"paths: pattern {entry!r} matches no file")
        elif Path(entry).is_dir():
            matches = sorted(p for p in Path(entry).rglob("*") if p.is_file() and _suffix(p))
            if not matches:
                raise FileNotFoundError(f"paths: folder {entry!r} holds no supported file")
        elif Path(entry).is_file():
            matches = [Path(entry)]
        else:
            raise FileNotFoundError(f"paths: data file {entry!r} does not exist")
        for path in matches:
            if not _suffix(path):
                raise ValueError(f"paths: {str(path)!r} is not a supported file ({', '.join(_SUFFIXES)})")
            files[path] = None
    return list(files)


def corpus_fingerprint(
    *,
    source: str,
    paths: Sequence[str] = (),
    text_field: str = "text",
    id_field: str | None = None,
    title_field: str | None = None,
    hub_name: str | None = None,
    hub_config: str | None = None,
    hub_revision: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> str:
    """A hex key that changes whenever ``load_corpus`` with these arguments could change.

    Books: the shipped file's sha256. Local: each file's path, size and modification time.
    Hub: name, config and revision (an unpinned revision that moves upstream is not seen:
    pin ``hub_revision``). Split settings are part of the key. Raises FileNotFoundError like
    ``resolve_paths``; reads no document.
    """
    args = dict(locals())
    check_corpus_args(**{k: v for k, v in args.items() if k != "seed"})
    args["paths"] = list(paths)
    if source == "books":
        args["books_sha256"] = _sha256_file(_books_file())
    elif source == "local":
        stats = [(str(p.resolve()), p.stat()) for p in resolve_paths(paths)]
        args["files"] = [(name, st.st_size, st.st_mtime_ns) for name, st in stats]
    blob = json.dumps(args, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _books_file() -> Path:
    if not BOOKS_FILE.is_file():
        raise FileNotFoundError(
            f"the shipped corpus {BOOKS_FILE} is missing; rebuild it with "
            "`python -m ctxlab.data.build_corpus`"
        )
    return BOOKS_FILE


def _standardize(
    ds: Dataset, *, text_field: str, id_field: str | None, title_field: str | None, what: str
) -> Dataset:
    """Rename to columns (id, title, text), all strings; generate missing ids and titles."""
    for name, field in {"text_field": text_field, "id_field": id_field}.items():
        if field is not None and field not in ds.column_names:
            raise ValueError(f"{name}={field!r} is not a column of {what}: {ds.column_names}")
    if title_field is not None and title_field not in ds.column_names:
        raise ValueError(f"title_field={title_field!r} is not a column of {what}: {ds.column_names}")
    table = ds.with_format("arrow")[:]
    ids = (
        pc.cast(table[id_field], pa.string())
        if id_field is not None
        else pa.array([f"doc-{i:06d}" for i in range(len(table))], pa.string())
    )
    titles = pc.cast(table[title_field], pa.string()) if title_field is not None else ids
    kind = table[text_field].type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise ValueError(f"text_field={text_field!r} of {what} holds {kind} values, not text")
    texts = pc.cast(table[text_field], pa.string())
    return Dataset(pa.table({"id": ids, "title": titles, "text": texts}))


def _read_text_files(files: Sequence[Path]) -> Dataset:
    ids, titles, texts = [], [], []
    for path in files:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"paths: {str(path)!r} is not UTF-8 text ({err})") from err
        ids.append(str(path))
        titles.append(path.name[: -len(_suffix(path))])
    return Dataset.from_dict({"id": ids, "title": titles, "text": texts})


def _raise_bad_json(files: Sequence[Path], err: Exception) -> None:
    """After ``datasets`` failed on JSON files: ValueError naming the first file and line that is
    not JSON (a JSON Lines file), or the file that is neither JSON Lines nor one JSON document.
    Read only on that failure, so a good corpus is never parsed twice."""
    for path in files:
        try:
            raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        except (OSError, EOFError) as bad:  # a truncated or damaged .gz
            raise ValueError(f"paths: {str(path)!r} cannot be read ({type(bad).__name__}: {bad})") from err
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise ValueError(f"paths: {str(path)!r} is not UTF-8 text ({bad})") from err
        first_bad = None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as bad:
                first_bad = first_bad or (number, f"not valid JSON ({bad.msg}, column {bad.colno})", line)
                continue
            if not isinstance(record, dict):
                first_bad = first_bad or (number, f"a JSON {type(record).__name__}, not an object", line)
        if first_bad is None:
            continue
        try:
            json.loads(text)  # one JSON document (a .json file), not JSON Lines
            continue
        except json.JSONDecodeError:
            pass
        number, why, line = first_bad
        shown = line if len(line) <= 80 else line[:77] + "..."
        raise ValueError(
            f"paths: {str(path)!r} line {number} is {why}: {shown!r} (JSON Lines files hold one "
            "JSON object per line)"
        ) from err
    raise ValueError(f"paths: cannot read JSON files {[str(f) for f in files]}: {err}") from err


def load_documents(
    *,
    source: str,
    paths: Sequence[str] = (),
    text_field: str = "text",
    id_field: str | None = None,
    title_field: str | None = None,
    hub_name: str | None = None,
    hub_config: str | None = None,
    hub_revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Dataset | DatasetDict:
    """Load a source's documents, unsplit (a ``DatasetDict`` only for a pre-split hub dataset).

    Columns ``id, title, text``. Raises FileNotFoundError for a missing file, ValueError for a
    bad setting or a missing column. Does not drop empty documents (``load_corpus`` does).
    """
    check_corpus_args(
        source=source,
        paths=paths,
        text_field=text_field,
        id_field=id_field,
        title_field=title_field,
        hub_name=hub_name,
        hub_config=hub_config,
        hub_revision=hub_revision,
    )
    cache = str(Path(cache_dir).expanduser()) if cache_dir is not None else None
    fields = {"text_field": text_field, "id_field": id_field, "title_field": title_field}
    if source == "books":
        ds = load_dataset("json", data_files=str(_books_file()), split="train", cache_dir=cache)
        return ds.select_columns(list(COLUMNS))
    if source == "hub":
        loaded = load_dataset(hub_name, hub_config, revision=hub_revision, cache_dir=cache)
        what = f"hub dataset {hub_name!r}"
        if all(split in loaded for split in SPLITS):
            return DatasetDict({s: _standardize(loaded[s], **fields, what=f"{what}[{s}]") for s in SPLITS})
        if "train" not in loaded:
            raise ValueError(f"{what} has splits {list(loaded)}: needs 'train' or all {SPLITS}")
        return _standardize(loaded["train"], **fields, what=what)

    files = resolve_paths(paths)
    text_files = [p for p in files if _SUFFIXES[_suffix(p)] == "text"]
    parts = [_read_text_files(text_files)] if text_files else []
    for builder in ("json", "parquet"):
        mine = [str(p) for p in files if _SUFFIXES[_suffix(p)] == builder]
        if mine:
            try:
                records = load_dataset(builder, data_files=mine, split="train", cache_dir=cache)
            except Exception as err:
                if builder == "json":
                    _raise_bad_json([Path(m) for m in mine], err)
                raise ValueError(f"paths: cannot read {builder} files {mine}: {err}") from err
            parts.append(_standardize(records, **fields, what=f"{builder} files {mine}"))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def drop_empty(ds: Dataset) -> Dataset:
    """Drop documents whose text is missing, empty or only whitespace."""
    texts = ds.with_format("arrow")[:]["text"]
    keep = pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(texts), ""), False)
    keep_np = keep.to_numpy(zero_copy_only=False)
    if keep_np.all():
        return ds
    log.warning("dropping %d empty documents", int((~keep_np).sum()))
    return ds.select(np.flatnonzero(keep_np))


def split_documents(ds: Dataset, *, val_fraction: float, test_fraction: float, seed: int) -> DatasetDict:
    """Split documents into train / validation / test by a seeded hash of each ``id``.

    Validation and test get ``max(1, round(n * fraction))`` documents each; train gets the
    rest and must get at least one. Raises ValueError if the corpus has too few documents or
    repeats an id.
    """
    ids = list(ds["id"])
    n = len(ids)
    n_val, n_test = (max(1, round(n * f)) for f in (val_fraction, test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(
            f"the corpus has {n} documents: too few for train, validation ({n_val}) "
            f"and test ({n_test}) splits of at least one document each"
        )
    if len(set(ids)) != n:
        raise ValueError("document ids are not unique; a document-level split needs them to be")
    digest = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ids]
    order = np.argsort(np.array(digest), kind="stable")
    parts = {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    return DatasetDict({s: ds.select(np.sort(parts[s])) for s in SPLITS})


def load_corpus(
    *,
    source: str,
    paths: Sequence[str] = (),
    text_field: str = "text",
    id_field: str | None = None,
    title_field: str | None = None,
    hub_name: str | None = None,
    hub_config: str | None = None,
    hub_revision: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> DatasetDict:
    """Documents split into train / validation / test, columns ``id, title, text``.

    A hub dataset that comes with all three splits keeps them (``val_fraction``,
    ``test_fraction`` and ``seed`` then do not apply, and a log line says so). Raises
    FileNotFoundError for a missing file and ValueError for an unknown source, a bad setting,
    an empty corpus or one too small to split.
    """
    check_corpus_args(
        source=source,
        paths=paths,
        hub_name=hub_name,
        hub_config=hub_config,
        hub_revision=hub_revision,
        text_field=text_field,
        id_field=id_field,
        title_field=title_field,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    docs = load_documents(
        source=source,
        paths=paths,
        text_field=text_field,
        id_field=id_field,
        title_field=title_field,
        hub_name=hub_name,
        hub_config=hub_config,
        hub_revision=hub_revision,
        cache_dir=cache_dir,
    )
    where = f"source={source!r}" + (f" paths={list(paths)}" if paths else "")
    if isinstance(docs, DatasetDict):
        log.info("%s comes split; val_fraction, test_fraction and seed do not apply", where)
        splits = DatasetDict({s: drop_empty(docs[s]) for s in SPLITS})
        for s in SPLITS:
            if len(splits[s]) == 0:
                raise ValueError(f"empty corpus: the {s} split of {where} has no documents")
        return splits
    docs = drop_empty(docs)
    if len(docs) == 0:
        raise ValueError(f"empty corpus: {where} has no non-empty document")
    return split_documents(docs, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
