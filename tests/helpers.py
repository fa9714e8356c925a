"""Small builders shared by tests."""

from __future__ import annotations

import torch

from ctxlab.attention import DenseAttention, MSAttention
from ctxlab.model import Llama, LlamaConfig
from ctxlab.position import Rope

SMALL = {
    "region": 8,
    "budget": 8,
    "merge": 2,
    "block_size": 16,
}
"""The settings of the sparse attention options (by setting name) at which 256 tokens, or the
conformance test's 128, show each one's pattern: MS has a 64-token dense prefix, then blocks of
16 queries. A new sparse option adds its own settings here (every option takes the ones it has)."""
SMALL_OVERRIDES = [f"attention.{key}={value}" for key, value in SMALL.items()]


def tiny_model(
    attention="dense", *, vocab=64, dim=32, layers=2, heads=4, kv_heads=2, position=None, seed=0, **ms
):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads)
    if attention == "dense":
        factory = DenseAttention
    else:
        kw = dict(region=4, budget=4, merge=2, select=attention, backend="torch") | ms
        factory = lambda: MSAttention(**kw)  # noqa: E731
    position = position or Rope(head_dim=cfg.head_dim, base=10000.0)
    return Llama(cfg, factory, position).eval()


def assert_within_pytorch_error(mine, theirs, reference) -> None:
    """A low-precision kernel's output and gradients against PyTorch's own computation in the same
    precision, both judged against a float32 ``reference``: at most 2x PyTorch's error forward and
    3x backward (flash-attention's rule). Each argument is ``(output, [dq, dk, dv])``."""
    (out, grads), (torch_out, torch_grads), (ref, ref_grads) = mine, theirs, reference
    for name, a, b, want, factor in [("o", out, torch_out, ref, 2.0)] + [
        (n, g, t, r, 3.0) for n, g, t, r in zip(("dq", "dk", "dv"), grads, torch_grads, ref_grads)
    ]:
        assert not a.isnan().any(), name
        err = (a.float() - want).abs().max().item()
        torch_err = (b.float() - want).abs().max().item()
        assert err <= factor * torch_err + 1e-5, f"{name}: {err:.3g} vs PyTorch bf16 {torch_err:.3g}"


def wandb_records(run_file) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``), as
    ``wandb_internal_pb2.Record`` objects.

    The file is a ``:W&B`` header (7 bytes) followed by LevelDB-log records in 32 KiB blocks
    (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last), each record a
    ``wandb_internal_pb2.Record``; wandb 0.31 ships no Python reader of its own."""
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, block, records, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            records.append(rec)
    return records


def wandb_summary_keys(run_file) -> set[str]:
    """The summary keys recorded in an offline W&B run file (``run-<id>.wandb``)."""
    keys: set[str] = set()
    for rec in wandb_records(run_file):
        if rec.WhichOneof("record_type") == "summary":
            keys |= {u.key or "/".join(u.nested_key) for u in rec.summary.update}
    return keys
