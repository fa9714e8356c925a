"""Summarize Nsight Compute exports of the MS kernels into one Markdown file.

    python -m ctxlab.kernels.bench.ncu_summary DIR --out DIR/ncu_summary.md

DIR holds, per profiled launch NAME (as ``experiments/gpu/lease_s13.sh`` 1 writes them),
``NAME_details.csv`` (``ncu --import NAME.ncu-rep --page details --csv``) and ``NAME_sass.csv``
or ``NAME_sass.csv.gz`` (``--page source --csv --print-source sass``). The file gets, per launch:
duration, throughputs, occupancy and issue rate; the warp stall reasons as shares of all stall
samples; the opcodes by share of samples with their executed count; and the hottest instructions
with their two main stall reasons. ``WARPGROUP.DEPBAR`` taking a wait per ``HGMMA`` is the sign
of ptxas serializing the wgmma (C7515; kernels/README.md, session 13).

Warp-specialized kernels wait in three ways the stall reasons do not tell apart, so the samples
are also split by what the warps wait on: an mbarrier (the branch of a ``SYNCS.PHASECHK`` polling
loop, which Nsight Compute counts as a long-scoreboard stall: the load warps waiting for a free
slot, the consumers for data or for each other), their own wgmma (``WARPGROUP.DEPBAR``) or a
``bar.sync`` of their warpgroup (barrier stalls elsewhere). Session 18 read a fused kernel's long
scoreboard as memory latency; most of it was its load warps polling for free slots.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import re
from collections import Counter
from pathlib import Path

METRICS = (
    "Duration",
    "Compute (SM) Throughput",
    "Memory Throughput",
    "Registers Per Thread",
    "Achieved Occupancy",
    "Executed Ipc Active",
    "Issue Slots Busy",
    "Executed Instructions",
    "Eligible Warps Per Scheduler",
    "Warp Cycles Per Issued Instruction",
)
SAMPLES = "Warp Stall Sampling (All Samples)"


def _number(text: str | None) -> float:
    if text is None:
        return 0.0
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_details(path: Path) -> dict[str, dict[str, str]]:
    """Kernel launch (ID and name) -> metric name -> value with unit."""
    out: dict[str, dict[str, str]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("Metric Name") in METRICS:
                key = f"{row['ID']} {row['Kernel Name']}"
                value = f"{row['Metric Value']} {row['Metric Unit']}".strip()
                out.setdefault(key, {})[row["Metric Name"]] = value
    return out


def read_sass(path: Path) -> list[dict[str, str]]:
    """Rows of the source page (one per SASS instruction) of the first kernel in it: each kernel's
    section starts with a line naming it."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as fh:
            raw = fh.read()
    else:
        raw = path.read_text()
    lines = raw.splitlines()
    if not lines or not lines[0].startswith('"Kernel Name"'):
        raise ValueError(f"{path}: not an ncu source-page export (first line {lines[:1]!r})")
    end = next((i for i, line in enumerate(lines[1:], 1) if line.startswith('"Kernel Name"')), len(lines))
    return list(csv.DictReader(io.StringIO("\n".join(lines[1:end]))))


def opcode(source: str) -> str:
    parts = source.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0].split(".")[0] if parts else ""


_GUARDED_BRANCH = re.compile(r"\s*@!?(U?P\d)\s+BRA\b")


def _writes_first(source: str, predicate: str) -> bool:
    """Whether the instruction's first operand (its destination) is ``predicate``."""
    parts = source.split(None, 1)
    if parts and parts[0].startswith("@"):
        parts = parts[1].split(None, 1) if len(parts) > 1 else []
    return len(parts) == 2 and parts[1].split(",")[0].strip() == predicate


def wait_kinds(rows: list[dict[str, str]], lookback: int = 64) -> dict[str, float]:
    """Shares of all stall samples by what the warps wait on: "mbarrier" (at a ``SYNCS.PHASECHK``
    or at the guarded branch whose predicate it set, found up to ``lookback`` instructions back),
    "wgmma" (at ``WARPGROUP.DEPBAR``), "bar.sync" (barrier stalls anywhere else), "issuing" (the
    ``selected`` samples elsewhere: not a wait) and "other" (memory, dependencies, throttles)."""
    total = sum(_number(r[SAMPLES]) for r in rows) or 1.0
    kinds = Counter()
    for i, r in enumerate(rows):
        source, samples = r["Source"], _number(r[SAMPLES])
        guard = _GUARDED_BRANCH.match(source)
        setter = None
        if guard:
            back = range(i - 1, max(-1, i - 1 - lookback), -1)
            setter = next(
                (rows[j]["Source"] for j in back if _writes_first(rows[j]["Source"], guard[1])), None
            )
        if "SYNCS.PHASECHK" in source or (setter and "SYNCS.PHASECHK" in setter):
            kinds["mbarrier"] += samples
        elif "WARPGROUP.DEPBAR" in source:
            kinds["wgmma"] += samples
        else:
            barrier, issuing = _number(r.get("stall_barrier")), _number(r.get("stall_selected"))
            kinds["bar.sync"] += barrier
            kinds["issuing"] += issuing
            kinds["other"] += samples - barrier - issuing
    return {k: kinds[k] / total for k in ("mbarrier", "wgmma", "bar.sync", "issuing", "other")}


def sass_tables(rows: list[dict[str, str]], top: int) -> list[str]:
    if not rows or SAMPLES not in rows[0]:
        raise ValueError("the source-page export has no warp stall samples")
    stalls = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    total = sum(_number(r[SAMPLES]) for r in rows) or 1.0
    out = ["", "Warp stall reasons (share of all samples, >= 1%):", ""]
    shares = {c: sum(_number(r[c]) for r in rows) / total for c in stalls}
    out += [f"- {c[6:]}: {v:.1%}" for c, v in sorted(shares.items(), key=lambda t: -t[1]) if v >= 0.01]
    waits = wait_kinds(rows)
    out += ["", "Samples by what the warps wait on (mbarrier polls, own wgmma, bar.sync; issuing; other): "
            + ", ".join(f"{k} {v:.1%}" for k, v in waits.items())]  # fmt: skip
    by_op, static, executed = Counter(), Counter(), Counter()
    for r in rows:
        op = opcode(r["Source"])
        by_op[op] += _number(r[SAMPLES])
        static[op] += 1
        executed[op] += _number(r["Instructions Executed"])
    out += ["", "| opcode | samples | static | executed (M) |", "|---|---|---|---|"]
    for op, v in by_op.most_common(15):
        out.append(f"| {op} | {v / total:.1%} | {static[op]} | {executed[op] / 1e6:.1f} |")
    out += ["", "| # | samples | instruction | main stalls |", "|---|---|---|---|"]
    for i, r in sorted(enumerate(rows), key=lambda t: -_number(t[1][SAMPLES]))[:top]:
        s = _number(r[SAMPLES]) or 1.0
        main = sorted(((_number(r[c]), c[6:]) for c in stalls), reverse=True)[:2]
        why = ", ".join(f"{name} {v / s:.0%}" for v, name in main if v)
        out.append(f"| {i} | {_number(r[SAMPLES]) / total:.2%} | `{r['Source'].strip()[:70]}` | {why} |")
    return out


def summarize(folder: Path, top: int = 12) -> str:
    names = sorted(p.name[: -len("_details.csv")] for p in folder.glob("*_details.csv"))
    if not names:
        raise FileNotFoundError(f"{folder}: no *_details.csv (ncu --import X.ncu-rep --page details --csv)")
    out = [f"# Nsight Compute summary of {folder.name}", ""]
    for name in names:
        out += [f"## {name}", ""]
        details = read_details(folder / f"{name}_details.csv")
        for kernel, metrics in details.items():
            out.append(f"- {kernel}: " + "; ".join(f"{m} {metrics[m]}" for m in METRICS if m in metrics))
        found = [p for p in (folder / f"{name}_sass.csv", folder / f"{name}_sass.csv.gz") if p.exists()]
        if found:
            rows = read_sass(found[0])
            text = " ".join(r["Source"] for r in rows)
            hgmma, waits = text.count("HGMMA"), text.count("WARPGROUP.DEPBAR")
            out.append(f"- SASS: {len(rows)} instructions, {hgmma} HGMMA, {waits} WARPGROUP.DEPBAR")
            out += sass_tables(rows, top)
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="Markdown file (default: print)")
    parser.add_argument("--top", type=int, default=12, help="hottest instructions listed per launch")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"no folder at {args.folder}")
    try:
        text = summarize(args.folder, args.top)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
