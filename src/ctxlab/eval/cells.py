"""Finished cells of an evaluation grid on disk, so an interrupted grid resumes where it stopped.

A cell is the smallest unit of grid work: one perplexity window (its NLL per piece of a scored
block) or one passkey trial (the model's answer). The store is an append-only JSONL file, one
finished cell per line, written, flushed and fsynced as the cell completes::

    {"fp": "<fingerprint hash>", "key": "<cell key>", "value": <JSON value>}

``fp`` is :func:`fingerprint_hash` of what the caller says the cells depend on besides their key
(the model checkpoint, evaluation attention, position scale, grid settings): a line of another
fingerprint is never read back, so changed settings recompute rather than reuse stale cells.
Several stores of different fingerprints may share a file.

Under data parallelism each rank appends to its own file, ``path`` with ``.rank{r}`` before the
suffix (``cells.jsonl`` -> ``cells.rank1.jsonl``), and every rank reads them all, together with
``path`` itself (a single process writes ``path``), so a grid may resume on another world size.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def fingerprint_hash(fingerprint: dict) -> str:
    """A short hash of ``fingerprint``'s canonical JSON (sorted keys; objects JSON cannot write
    are written as ``str(obj)``)."""
    text = json.dumps(fingerprint, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_path(path: Path, shard: int) -> Path:
    return path.with_name(f"{path.stem}.rank{shard}{path.suffix}")


class CellStore:
    """Finished cells of one fingerprint: ``key in store``, ``store[key]``, ``store.put(key, value)``.

    ``shard``: the file this process appends to: ``None`` asks ``ctxlab.distributed`` (this rank's
    file under several ranks, else ``path``); an int picks ``path`` with ``.rank{shard}``."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, *, shard: int | None = None) -> None:
        self.path = Path(path)
        self.fp = fingerprint_hash(fingerprint)
        if shard is None:
            from ctxlab import distributed

            shard = distributed.rank() if distributed.world_size() > 1 else None
        self.own = self.path if shard is None else shard_path(self.path, shard)
        self.cells: dict[str, Any] = {}
        for file in self.files():
            self._read(file)
        self._file = None

    def files(self) -> list[Path]:
        """``path`` and every rank's file beside it that exists."""
        shards = sorted(self.path.parent.glob(f"{self.path.stem}.rank*{self.path.suffix}"))
        return [f for f in [self.path, *shards] if f.is_file()]

    def _read(self, file: Path) -> None:
        lines = file.read_bytes().split(b"\n")
        # A file that does not end in a newline was cut mid-line (a crash while writing): its
        # last line never finished, so it is no cell. Any other bad line is corruption.
        for n, line in enumerate(lines[:-1], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                fp, key, value = rec["fp"], rec["key"], rec["value"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{file}:{n} is not a cell line ({e})") from e
            if fp == self.fp:
                self.cells[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def __getitem__(self, key: str) -> Any:
        return self.cells[key]

    def __len__(self) -> int:
        return len(self.cells)

    def put(self, key: str, value: Any) -> None:
        """Record a finished cell; it is on disk when ``put`` returns."""
        line = json.dumps({"fp": self.fp, "key": key, "value": value}, separators=(",", ":"))
        if self._file is None:
            self._file = self._open()
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.cells[key] = value

    def _open(self):
        self.own.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.own, "ab+")  # noqa: SIM115  (held open across puts; closed by close())
        f.seek(0)
        data = f.read()
        if data and not data.endswith(b"\n"):
            # Drop the unfinished line a crash left, so the next line starts on a line of its own.
            f.truncate(data.rfind(b"\n") + 1)
        return f

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CellStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
