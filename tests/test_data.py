"""Data pipeline: tokenizers, the shipped corpus, document splits, local sources, packing,
the tokenized cache, the Hydra data configs, and the errors that stop a run before work."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ctxlab.data import build_corpus
from ctxlab.data.corpus import BOOKS_FILE, load_corpus, resolve_paths, split_documents
from ctxlab.data.datamodule import DataConfig, TextDataModule, pack_documents
from ctxlab.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    build_tokenizer,
)

CFG_DATA = Path(__file__).resolve().parents[1] / "cfg" / "data"
SAMPLES = ["", "plain ascii", "Æsop's fable — naïve café, 東京, emoji 🦀\n\ttabs", "<|endoftext|>"]


@pytest.fixture(scope="module")
def tiktoken_tok():
    return TiktokenTokenizer("cl100k_base")


@pytest.fixture()
def corpus_dir(tmp_path):
    """Twelve small documents as .txt files; lengths 40..150 bytes, all different."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        words = " ".join(f"w{i}x{j}" for j in range(5 + i))
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. {words}\n", encoding="utf-8")
    return folder


def local_module(corpus_dir, tmp_path, **overrides):
    fields = dict(
        source="local",
        paths=[str(corpus_dir)],
        seq_len=16,
        batch_size=2,
        val_fraction=0.2,
        test_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    return TextDataModule(**(fields | overrides))


class CountingEncode:
    """Counts calls of a tokenizer class's encode_batch (the only way the pipeline tokenizes)."""

    def __init__(self, monkeypatch, cls):
        self.calls = 0
        original = cls.encode_batch

        def counted(tok, texts):
            self.calls += 1
            return original(tok, texts)

        monkeypatch.setattr(cls, "encode_batch", counted)


# Tokenizers


@pytest.mark.parametrize("text", SAMPLES, ids=["empty", "ascii", "unicode", "special-literal"])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode_batch([text])[0].tolist() == ids
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_byte_tokenizer_ids():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    assert tok.decode(np.array([0xE6, 0x9D])) == "\ufffd"  # a cut character decodes, replaced


@pytest.mark.parametrize("text", SAMPLES, ids=["empty", "ascii", "unicode", "special-literal"])
def test_tiktoken_round_trip(tiktoken_tok, text):
    ids = tiktoken_tok.encode(text)
    assert tiktoken_tok.decode(ids) == text
    assert tiktoken_tok.encode_batch([text])[0].tolist() == ids
    assert tiktoken_tok.eos_id not in ids  # a literal <|endoftext|> stays ordinary text


def test_tiktoken_ids(tiktoken_tok):
    assert tiktoken_tok.vocab_size == 100277
    assert tiktoken_tok.eos_id == tiktoken_tok.bos_id == 100257
    assert len(tiktoken_tok.encode("hello world")) == 2
    with pytest.raises(ValueError, match="encoding='nosuch'"):
        TiktokenTokenizer("nosuch")


def _train_tiny_bpe(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the cat sat on the mat; the dog sat on the log"] * 20, trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_from_local_file(tmp_path):
    path = _train_tiny_bpe(tmp_path / "tokenizer.json")
    tok = HFTokenizer(path, eos_token="<eos>")
    text = "the cat sat on a log — naïve"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text])[0].tolist() == ids
    assert tok.eos_id == tok.bos_id == 0 and tok.vocab_size >= 257
    same = build_tokenizer(f"hf:{path}::<eos>")
    assert same.encode(text) == ids and same.cache_key == tok.cache_key
    with pytest.raises(ValueError, match="no EOS token"):
        HFTokenizer(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HFTokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize("spec", ["", "bpe", "byte:x", "hf:"])
def test_build_tokenizer_rejects_unknown_specs(spec):
    with pytest.raises(ValueError, match="tokenizer="):
        build_tokenizer(spec)


# The shipped corpus


def test_shipped_corpus_matches_its_provenance():
    provenance = (BOOKS_FILE.parent / "PROVENANCE.md").read_text()
    digest = hashlib.sha256(BOOKS_FILE.read_bytes()).hexdigest()
    assert f"sha256 `{digest}`" in provenance
    with gzip.open(BOOKS_FILE, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) == 109
    assert [d["id"] for d in docs] == sorted(d["id"] for d in docs)
    assert all(list(d) == ["id", "title", "author", "source", "text"] for d in docs)
    authors = {a: sum(d["author"] == a for d in docs) for a in {d["author"] for d in docs}}
    assert authors == {"Jane Austen": 6, "King James Version (1611)": 66, "William Shakespeare": 37}
    assert not any(re.search(r"gutenberg", d["text"], re.I) for d in docs)


def test_books_corpus_splits_are_disjoint_and_deterministic(tmp_path):
    first = load_corpus(source="books", cache_dir=tmp_path)
    again = load_corpus(source="books", cache_dir=tmp_path)
    ids = {s: list(first[s]["id"]) for s in first}
    assert ids == {s: list(again[s]["id"]) for s in again}
    assert set(first) == {"train", "validation", "test"}
    assert first["train"].column_names == ["id", "title", "text"]
    assert {len(v) for k, v in ids.items() if k != "train"} == {11}
    everything = ids["train"] + ids["validation"] + ids["test"]
    assert len(everything) == len(set(everything)) == 109
    other = load_corpus(source="books", seed=1, cache_dir=tmp_path)
    assert list(other["test"]["id"]) != ids["test"]


def test_split_keeps_one_document_each_and_refuses_too_few():
    three = Dataset.from_dict({"id": ["a", "b", "c"], "title": ["a", "b", "c"], "text": ["x"] * 3})
    splits = split_documents(three, val_fraction=0.01, test_fraction=0.01, seed=0)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1, 1, 1]
    with pytest.raises(ValueError, match="2 documents"):
        split_documents(three.select([0, 1]), val_fraction=0.1, test_fraction=0.1, seed=0)
    twice = Dataset.from_dict({"id": ["a", "a", "b", "c"], "title": ["t"] * 4, "text": ["x"] * 4})
    with pytest.raises(ValueError, match="not unique"):
        split_documents(twice, val_fraction=0.1, test_fraction=0.1, seed=0)


# Local sources


def test_local_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "b.txt").write_text("   \n", encoding="utf-8")  # empty: dropped
    records = [{"key": f"r{i}", "name": f"Record {i}", "body": f"record {i} body"} for i in range(3)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    pq.write_table(
        pa.table({"key": ["p0", "p1"], "name": ["P0", "P1"], "body": ["pq0", "pq1"]}), tmp_path / "p.parquet"
    )
    corpus = load_corpus(
        source="local",
        paths=[str(tmp_path / "*.txt"), str(tmp_path / "r.jsonl"), str(tmp_path / "p.parquet")],
        text_field="body",
        id_field="key",
        title_field="name",
        val_fraction=0.2,
        test_fraction=0.2,
        cache_dir=tmp_path / "cache",
    )
    rows = {r["id"]: r for s in corpus for r in corpus[s].to_list()}
    assert set(rows) == {str(tmp_path / "a.txt"), "r0", "r1", "r2", "p0", "p1"}
    assert rows[str(tmp_path / "a.txt")] | {} == {
        "id": str(tmp_path / "a.txt"),
        "title": "a",
        "text": "alpha text",
    }
    assert rows["r1"]["title"] == "Record 1" and rows["p1"]["text"] == "pq1"


def test_local_records_without_id_field_get_row_ids(tmp_path):
    lines = [json.dumps({"text": f"t{i}"}) for i in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines), encoding="utf-8")
    corpus = load_corpus(source="local", paths=[str(tmp_path / "d.jsonl")], cache_dir=tmp_path)
    ids = sorted(i for s in corpus for i in corpus[s]["id"])
    assert ids == ["doc-000000", "doc-000001", "doc-000002", "doc-000003"]
    with pytest.raises(ValueError, match="text_field='body'"):
        load_corpus(source="local", paths=[str(tmp_path / "d.jsonl")], text_field="body")


def test_local_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        resolve_paths([str(tmp_path / "missing.txt")])
    with pytest.raises(FileNotFoundError, match=r"\*.jsonl"):
        resolve_paths([str(tmp_path / "*.jsonl")])
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="data.csv"):
        resolve_paths([str(tmp_path / "data.csv")])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty corpus"):
        load_corpus(source="local", paths=[str(tmp_path / "empty.txt")])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"source": "web"}, "source='web'"),
        ({"source": "local"}, "needs paths"),
        ({"source": "books", "paths": ["x.txt"]}, "paths="),
        ({"source": "hub"}, "hub_name"),
        ({"source": "books", "hub_name": "pg19"}, "hub_name='pg19'"),
        ({"source": "books", "text_field": "body"}, "text_field='body'"),
        ({"source": "books", "val_fraction": 0.0}, "val_fraction=0.0"),
        ({"source": "books", "val_fraction": 0.5, "test_fraction": 0.5}, "no train split"),
    ],
    ids=[
        "unknown",
        "local-no-paths",
        "books-paths",
        "hub-no-name",
        "books-hub",
        "books-field",
        "zero-fraction",
        "no-train",
    ],
)
def test_bad_corpus_settings(args, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        load_corpus(**args)


# Packing


def test_pack_documents_is_the_eos_joined_stream_cut_into_rows():
    docs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9]), np.array([], int)]
    rows = pack_documents(docs, eos_id=0, seq_len=3)
    stream = [1, 2, 3, 0, 4, 0, 5, 6, 7, 8, 9, 0, 0]
    assert rows.shape == (3, 4)
    assert rows.ravel().tolist() == stream[:12]
    capped = pack_documents(docs, eos_id=0, seq_len=3, max_tokens=9)
    assert capped.ravel().tolist() == stream[:8]
    assert pack_documents(docs, eos_id=0, seq_len=20).shape == (0, 21)


# The datamodule


def test_datamodule_batches_are_packed_documents(corpus_dir, tmp_path):
    dm = local_module(corpus_dir, tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 17) and batch["input_ids"].dtype == torch.int64

    corpus = load_corpus(
        source="local",
        paths=[str(corpus_dir)],
        val_fraction=0.2,
        test_fraction=0.2,
        cache_dir=tmp_path / "c2",
    )
    tok = ByteTokenizer()
    for split in ("train", "validation"):
        stream = [t for text in corpus[split]["text"] for t in [*tok.encode(text), tok.eos_id]]
        rows = dm.packed[split]
        assert rows.shape == (len(stream) // 17, 17)
        assert rows.ravel().tolist() == stream[: rows.size]
    # One epoch serves distinct packed rows, whole batches only (drop_last).
    served = [tuple(r) for b in dm.train_dataloader() for r in b["input_ids"].tolist()]
    packed = {tuple(r) for r in dm.packed["train"].tolist()}
    assert len(served) == len(set(served)) == len(packed) // 2 * 2 and set(served) <= packed

    docs = dm.eval_documents("test")
    meta = dm.document_metadata("test")
    assert [m["id"] for m in meta] == list(corpus["test"]["id"])
    for doc, text, m in zip(docs, corpus["test"]["text"], meta, strict=True):
        assert doc.dtype == torch.int64 and doc.tolist() == tok.encode(text)
        assert m["num_tokens"] == len(doc)


def test_second_setup_reads_the_cache_without_tokenizing(corpus_dir, tmp_path, monkeypatch):
    counter = CountingEncode(monkeypatch, ByteTokenizer)
    first = local_module(corpus_dir, tmp_path)
    first.setup("fit")
    assert counter.calls > 0
    cached = [f["filename"] for f in first.tokenized["train"].cache_files]
    assert cached and all(Path(f).is_relative_to(tmp_path / "cache") for f in cached)

    counter.calls = 0
    second = local_module(corpus_dir, tmp_path)
    second.setup("fit")
    assert counter.calls == 0
    assert [f["filename"] for f in second.tokenized["train"].cache_files] == cached
    assert np.array_equal(first.packed["train"], second.packed["train"])

    key = first.cache_key()
    assert local_module(corpus_dir, tmp_path, tokenizer="tiktoken").cache_key() != key
    assert local_module(corpus_dir, tmp_path, seed=3).cache_key() != key
    (corpus_dir / "doc00.txt").write_text("changed text, changed size\n")
    assert local_module(corpus_dir, tmp_path).cache_key() != key


def test_max_train_tokens_caps_the_training_rows(corpus_dir, tmp_path):
    dm = local_module(corpus_dir, tmp_path, max_train_tokens=40)
    dm.setup("fit")
    assert dm.packed["train"].shape == (2, 17)


def test_seq_len_longer_than_any_document_stops_before_tokenizing(corpus_dir, tmp_path, monkeypatch):
    counter = CountingEncode(monkeypatch, ByteTokenizer)
    dm = local_module(corpus_dir, tmp_path, seq_len=10_000)
    for check in (dm.validate, dm.prepare_data, dm.setup):
        with pytest.raises(ValueError, match=r"seq_len=10000 .* longest training document"):
            check()
    assert counter.calls == 0


def test_seq_len_checked_in_tokens_after_tokenizing(corpus_dir, tmp_path):
    # The longest document has 115 bytes but 69 cl100k tokens: the byte bound lets 75 pass.
    dm = local_module(corpus_dir, tmp_path, tokenizer="tiktoken", seq_len=75)
    with pytest.raises(ValueError, match=r"seq_len=75 .* tokens"):
        dm.setup("fit")


def test_missing_file_stops_setup(tmp_path):
    dm = TextDataModule(
        source="local", paths=[str(tmp_path / "gone.txt")], seq_len=8, batch_size=1, cache_dir=str(tmp_path)
    )
    for check in (dm.validate, dm.setup):
        with pytest.raises(FileNotFoundError, match="gone.txt"):
            check()


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"seq_len": 0}, "seq_len=0"),
        ({"batch_size": -1}, "batch_size=-1"),
        ({"max_train_tokens": 16}, "max_train_tokens=16"),
        ({"num_workers": -2}, "num_workers=-2"),
        ({"vocab_size": 300}, "vocab_size=300"),
        ({"tokenizer": "words"}, "tokenizer='words'"),
        ({"source": "pg19"}, "source='pg19'"),
    ],
    ids=[
        "seq_len",
        "batch_size",
        "max_train_tokens",
        "num_workers",
        "vocab_size",
        "tokenizer",
        "source",
    ],
)
def test_bad_config_fails_at_construction(fields, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        TextDataModule(**({"seq_len": 16, "batch_size": 2} | fields))


def test_data_config_is_keyword_only():
    with pytest.raises(TypeError):
        DataConfig(16, 2)  # type: ignore[misc]


def test_books_end_to_end(tmp_path):
    dm = TextDataModule(seq_len=1024, batch_size=4, cache_dir=str(tmp_path), vocab_size=259)
    dm.setup()
    assert {s: dm.packed[s].shape[1] for s in dm.packed} == dict.fromkeys(
        ("train", "validation", "test"), 1025
    )
    assert dm.packed["train"].shape[0] > 10_000 and dm.packed["train"].max() < 259
    longest = max(m["num_tokens"] for m in dm.document_metadata("train"))
    # With the tokenized cache there, validate() checks exact token counts.
    with pytest.raises(ValueError, match=f"seq_len={longest + 1} .*{longest} tokens"):
        TextDataModule(seq_len=longest + 1, batch_size=1, cache_dir=str(tmp_path)).validate()


# Hydra configs


@pytest.mark.parametrize("option", sorted(p.stem for p in CFG_DATA.glob("*.yaml")))
def test_data_configs_instantiate(option, tmp_path):
    cfg = OmegaConf.load(CFG_DATA / f"{option}.yaml")
    cfg.cache_dir = str(tmp_path)
    if option == "local":
        cfg.paths = [str(tmp_path / "anything.txt")]
    dm = instantiate(cfg)
    assert isinstance(dm, TextDataModule)
    assert dm.vocab_size == cfg.vocab_size
    assert isinstance(cfg.seq_len, int) and isinstance(cfg.batch_size, int)


# The build script's text cleaning (the build itself needs the registries)


def test_strip_gutenberg_removes_header_footer_and_notes():
    text = (
        "The Project Gutenberg EBook of Hamlet\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\n"
        "HAMLET\n\n<<THIS ELECTRONIC VERSION ... WORLD LIBRARY, INC. ...>>\nACT I\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK ***\nlicence text"
    )
    assert build_corpus.strip_gutenberg(text, "x").split() == ["HAMLET", "ACT", "I"]
    with pytest.raises(RuntimeError, match="Project Gutenberg"):
        build_corpus.strip_gutenberg("HAMLET\nThis is a Project Gutenberg etext\n", "x")
    assert build_corpus.strip_gutenberg("my pretext\n", "x") == "my pretext\n"


def test_normalize_text():
    raw = "\r\n\r\nTITLE  \r\n\n\n\n  indented line\t\nend\n\n"
    assert build_corpus.normalize_text(raw) == "TITLE\n\n  indented line\nend"
