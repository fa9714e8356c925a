"""Tokenized, packed text for next-token training, and tokenized documents for evaluation.

Shapes: ``B`` batch size, ``S`` ``seq_len``; ``N`` packed rows of a split.

Batches are ``{"input_ids": LongTensor[B, S + 1]}``: rows of ``S + 1`` consecutive tokens of
the packed stream. The model shifts internally (inputs ``[:, :-1]``, targets ``[:, 1:]``), so
every row trains ``S`` next-token predictions at context length up to ``S``.

Packing: the documents of a split, in corpus order, each followed by ``eos_id``, are
concatenated into one stream; the stream is cut into rows of ``S + 1`` tokens and the
remainder is dropped. Rows do not overlap, so the last token of a row is a target only.

Caching: each split is tokenized once with ``datasets.Dataset.map`` into
``cache_dir/tokenized/<key>/<split>.arrow``, where ``key`` hashes the corpus (the shipped
file's sha256, or each local file's path, size and modification time, or the hub name and
revision), the split settings and the tokenizer's ``cache_key``. A later run with the same key
memory-maps those files and reads no text. Packing is recomputed from the cached tokens (one
``np.insert``; 4 bytes of RAM per token).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, List, Value
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from ctxlab.data.corpus import SPLITS, check_corpus_args, corpus_fingerprint, load_corpus
from ctxlab.data.tokenizers import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the tokenized columns change
_FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "input_ids": List(Value("int32")),
        "num_tokens": Value("int64"),
    }
)


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from, how it is tokenized and packed, and how it is served."""

    seq_len: int
    """Context length S; batches hold rows of S + 1 tokens. Must not exceed the longest
    training document in tokens (checked in ``setup``)."""
    batch_size: int
    """Rows per training batch."""
    source: str = "books"
    """``books`` (shipped corpus), ``local`` (``paths``) or ``hub`` (``hub_name``)."""
    paths: Sequence[str] = ()
    """For ``local``: files, folders or glob patterns of .txt, .jsonl, .json (optionally .gz)
    and .parquet files."""
    text_field: str = "text"
    """Column holding the document text in record files and hub datasets."""
    id_field: str | None = None
    """Column holding a unique document id; ``None``: ``doc-<row>`` in load order."""
    title_field: str | None = None
    """Column holding a title; ``None``: the id."""
    hub_name: str | None = None
    """For ``hub``: the dataset's name, e.g. ``deepmind/pg19``."""
    hub_config: str | None = None
    """For ``hub``: the dataset's configuration name, if it has several."""
    hub_revision: str | None = None
    """For ``hub``: a commit or tag; pin it, since the cache key cannot see upstream changes."""
    val_fraction: float = 0.1
    """Fraction of documents for validation (at least one) where the source has no splits."""
    test_fraction: float = 0.1
    """Fraction of documents for test (at least one) where the source has no splits."""
    seed: int = 0
    """Seed of the document-level split."""
    tokenizer: str = "byte"
    """``byte``, ``tiktoken[:<encoding>]`` (default cl100k_base) or ``hf:<local path>``."""
    vocab_size: int | None = None
    """Expected vocabulary size, checked against the tokenizer (configs interpolate it into
    the model); ``None``: not checked."""
    eval_batch_size: int | None = None
    """Rows per validation/test batch; ``None``: ``batch_size``."""
    num_workers: int = 0
    """DataLoader worker processes."""
    pin_memory: bool = False
    """Pin batches in page-locked memory (worth it when training on a GPU)."""
    cache_dir: str = "~/.cache/ctxlab/data"
    """Folder for the datasets cache and the tokenized splits."""
    max_train_tokens: int | None = None
    """Cap on the packed training stream (EOS tokens included); ``None``: all of it."""

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = (self.paths,)
        self.paths = tuple(str(p) for p in self.paths)
        check_corpus_args(
            **self.corpus_args(), val_fraction=self.val_fraction, test_fraction=self.test_fraction
        )
        positive = {"seq_len": self.seq_len, "batch_size": self.batch_size}
        if self.eval_batch_size is not None:
            positive["eval_batch_size"] = self.eval_batch_size
        if self.vocab_size is not None:
            positive["vocab_size"] = self.vocab_size
        for name, value in positive.items():  # named as the config names them (data.seq_len)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"data.{name}={value!r} must be a positive integer")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers!r} must be an integer >= 0")
        if self.max_train_tokens is not None and self.max_train_tokens < self.seq_len + 1:
            raise ValueError(
                f"max_train_tokens={self.max_train_tokens} is less than one row of "
                f"seq_len + 1 = {self.seq_len + 1} tokens"
            )

    def corpus_args(self) -> dict[str, Any]:
        """The settings that choose the documents (``load_corpus`` keywords, less the split)."""
        names = ("source", "paths", "text_field", "id_field", "title_field")
        names += ("hub_name", "hub_config", "hub_revision")
        return {name: getattr(self, name) for name in names}

    def split_args(self) -> dict[str, Any]:
        return {
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
        }


def pack_documents(
    documents: Sequence[np.ndarray], *, eos_id: int, seq_len: int, max_tokens: int | None = None
) -> np.ndarray:
    """Concatenate documents, each followed by ``eos_id``, and cut into rows of seq_len + 1.

    ``documents``: 1-D integer arrays. ``max_tokens`` caps the stream before cutting. Returns
    an int32 array ``[N, seq_len + 1]`` with ``N = min(stream, max_tokens) // (seq_len + 1)``;
    the remainder is dropped.
    """
    lengths = np.fromiter((len(d) for d in documents), np.int64, count=len(documents))
    values = np.concatenate([np.asarray(d, np.int32) for d in documents] or [np.empty(0, np.int32)])
    stream = np.insert(values, np.cumsum(lengths), eos_id)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    rows = len(stream) // (seq_len + 1)
    return stream[: rows * (seq_len + 1)].reshape(rows, seq_len + 1)


class PackedSequences(torch.utils.data.Dataset):
    """Rows of packed tokens; item ``i`` is ``{"input_ids": LongTensor[S + 1]}``."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows  # [N, S + 1] int32

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.rows[index].astype(np.int64))}


def _documents(split: Dataset) -> list[np.ndarray]:
    """The token arrays of a tokenized split, zero-copy views into one flat array."""
    column = split.with_format("arrow")[:]["input_ids"]
    values = pc.list_flatten(column).to_numpy()
    lengths = pc.list_value_length(column).to_numpy()
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _num_tokens(split: Dataset) -> np.ndarray:
    return split.with_format("arrow")[:]["num_tokens"].to_numpy()


class TextDataModule(L.LightningDataModule):
    """Train / validation / test loaders of packed token rows, and tokenized eval documents.

    Built from ``DataConfig``'s fields as keywords (how ``hydra.utils.instantiate`` calls it)
    or with ``TextDataModule.from_config(config)``. The tokenizer is built and its vocabulary
    size checked at construction. ``prepare_data`` tokenizes into the cache; ``setup`` loads
    the cache (tokenizing first if needed), checks ``seq_len`` against the longest training
    document and packs. ``validate()`` runs the cheap checks (files exist, corpus not empty,
    seq_len within the longest training document) without tokenizing anything.
    """

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.config = DataConfig(**fields)
        self.save_hyperparameters(dataclasses.asdict(self.config))
        self.tokenizer: Tokenizer = build_tokenizer(self.config.tokenizer)
        if self.config.vocab_size is not None and self.config.vocab_size != self.vocab_size:
            raise ValueError(
                f"vocab_size={self.config.vocab_size} does not match tokenizer="
                f"{self.config.tokenizer!r}, whose vocabulary has {self.vocab_size} ids"
            )
        self.cache_dir = Path(self.config.cache_dir).expanduser()
        self.tokenized: DatasetDict | None = None
        self.packed: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, config: DataConfig) -> TextDataModule:
        return cls(**dataclasses.asdict(config))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def cache_key(self) -> str:
        """Names the tokenized cache folder; see the module docstring."""
        parts = {
            "format": CACHE_FORMAT,
            "corpus": corpus_fingerprint(**self.config.corpus_args(), **self.config.split_args()),
            "tokenizer": self.tokenizer.cache_key,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]

    def _cache_files(self) -> dict[str, Path]:
        folder = self.cache_dir / "tokenized" / self.cache_key()
        return {split: folder / f"{split}.arrow" for split in SPLITS}

    def validate(self) -> None:
        """Check the data before any training: cheap, and before tokenizing where possible.

        Raises FileNotFoundError for a missing file, ValueError for an empty or unsplittable
        corpus, and ValueError when ``seq_len`` exceeds the longest training document: in
        tokens where the tokenized cache exists, else in UTF-8 bytes, an upper bound on tokens
        for every tokenizer here (``setup`` checks the exact count after tokenizing).
        """
        if all(f.exists() for f in self._cache_files().values()):
            self._check_seq_len(self._tokenize()["train"])
        else:
            self._load_checked_corpus()

    def _load_checked_corpus(self) -> DatasetDict:
        corpus = load_corpus(
            **self.config.corpus_args(),
            **self.config.split_args(),
            cache_dir=self.cache_dir / "datasets",
        )
        train_texts = corpus["train"].with_format("arrow")[:]["text"]
        nbytes = pc.binary_length(train_texts).to_numpy(zero_copy_only=False)
        longest = int(np.argmax(nbytes))
        if self.seq_len > nbytes[longest]:
            raise ValueError(
                f"seq_len={self.seq_len} is longer than the longest training document, "
                f"{corpus['train'][longest]['title']!r} with {int(nbytes[longest])} bytes "
                "(an upper bound on its tokens)"
            )
        return corpus

    def _check_seq_len(self, train: Dataset) -> None:
        lengths = _num_tokens(train)
        longest = int(np.argmax(lengths))
        if self.seq_len > lengths[longest]:
            raise ValueError(
                f"seq_len={self.seq_len} is longer than the longest training document, "
                f"{train[longest]['title']!r} with {int(lengths[longest])} tokens"
            )

    def _encode(self, batch: dict[str, list]) -> dict[str, list]:
        ids = self.tokenizer.encode_batch(batch["text"])
        return {"input_ids": ids, "num_tokens": [len(x) for x in ids]}

    def _tokenize(self) -> DatasetDict:
        """Tokenized splits (columns id, title, input_ids, num_tokens), from cache if there."""
        if self.tokenized is not None:
            return self.tokenized
        files = self._cache_files()
        if all(f.exists() for f in files.values()):
            self.tokenized = DatasetDict({s: Dataset.from_file(str(files[s])) for s in SPLITS})
            return self.tokenized
        corpus = self._load_checked_corpus()
        next(iter(files.values())).parent.mkdir(parents=True, exist_ok=True)
        self.tokenized = DatasetDict(
            {
                split: corpus[split].map(
                    self._encode,
                    batched=True,
                    batch_size=64,
                    remove_columns=["text"],
                    features=_FEATURES,
                    cache_file_name=str(files[split]),
                    new_fingerprint=f"{files[split].parent.name}-{split}",
                    desc=f"tokenizing {split} ({self.tokenizer.name})",
                )
                for split in SPLITS
            }
        )
        return self.tokenized

    def prepare_data(self) -> None:
        self._tokenize()

    def setup(self, stage: str | None = None) -> None:
        """Load tokens, check seq_len against the longest training document, pack rows."""
        tokenized = self._tokenize()
        self._check_seq_len(tokenized["train"])
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}
        for split in wanted.get(stage, SPLITS):
            if split in self.packed:
                continue
            cap = self.config.max_train_tokens if split == "train" else None
            rows = pack_documents(
                _documents(tokenized[split]),
                eos_id=self.tokenizer.eos_id,
                seq_len=self.seq_len,
                max_tokens=cap,
            )
            if len(rows) == 0:
                total = int(_num_tokens(tokenized[split]).sum()) + len(tokenized[split])
                raise ValueError(
                    f"the {split} split packs into no row: {total} tokens (EOS included), "
                    f"fewer than seq_len + 1 = {self.seq_len + 1}; lower seq_len or give the "
                    f"split more documents"
                )
            self.packed[split] = rows
            log.info(
                "%s: %d documents, %d rows of %d tokens",
                split,
                len(tokenized[split]),
                len(rows),
                self.seq_len + 1,
            )

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        if split not in self.packed:
            raise RuntimeError(f"call setup() before asking for the {split} loader")
        batch_size = self.config.batch_size if train else self.config.eval_batch_size
        # A stateful loader: Lightning saves its position (and shuffle state) in checkpoints, so a
        # resumed or requeued run sees exactly the batches the uninterrupted run would have seen.
        return StatefulDataLoader(
            PackedSequences(self.packed[split]),
            batch_size=batch_size or self.config.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.config.num_workers,
            pin_memory=self.config.pin_memory,
            persistent_workers=self.config.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def eval_documents(self, split: str = "test") -> list[torch.Tensor]:
        """One int64 tensor ``[num_tokens]`` per document of ``split``, no BOS/EOS added.

        Same order as ``document_metadata(split)``. Tokenizes (or loads the cache) if needed.
        """
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        return [torch.from_numpy(d.astype(np.int64)) for d in _documents(self._tokenize()[split])]

    def document_metadata(self, split: str = "test") -> list[dict[str, Any]]:
        """``{"id", "title", "num_tokens"}`` per document of ``split``, in corpus order."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        columns = self._tokenize()[split].select_columns(["id", "title", "num_tokens"])
        return columns.to_list()
