"""The Nsight Compute summary (kernels/bench/ncu_summary.py) on small exports built here in the
layout ``ncu --csv`` writes: metrics, stall shares, opcode table, wgmma counts, clear errors."""

from __future__ import annotations

import csv
import gzip
import io

import pytest

from ctxlab.kernels.bench import ncu_summary

DETAILS_HEADER = ["ID", "Kernel Name", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]
SASS_HEADER = ["Address", "Source", ncu_summary.SAMPLES, "Instructions Executed", "stall_barrier",
               "stall_long_sb", "stall_barrier (Not Issued)"]  # fmt: skip


def _csv(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL).writerows(rows)
    return buf.getvalue()


def _write(folder, name, sass_rows, gz=False):
    details = [DETAILS_HEADER, ["0", "ms_attn_fwd_kernel", "SOL", "Duration", "ms", "19.00"],
               ["0", "ms_attn_fwd_kernel", "SOL", "Block Size", "", "256"]]  # fmt: skip
    (folder / f"{name}_details.csv").write_text(_csv(details))
    text = '"Kernel Name","ms_attn_fwd_kernel",\n' + _csv([SASS_HEADER, *sass_rows])
    text += '"Kernel Name","another_kernel",\n' + _csv(
        [SASS_HEADER, ["0x9", "NOP", "1000", "1", "0", "0", "0"]]
    )
    if gz:
        with gzip.open(folder / f"{name}_sass.csv.gz", "wt") as fh:
            fh.write(text)
    else:
        (folder / f"{name}_sass.csv").write_text(text)


def test_summary_of_two_launches(tmp_path):
    rows = [
        ["0x10", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], R24", "10", "1,000", "0", "0", "0"],
        ["0x20", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "60", "100", "60", "0", "0"],
        ["0x30", "@!P0 IMAD.WIDE R16, R20, 0x800, R2", "30", "2,000,000", "0", "30", "0"],
    ]
    _write(tmp_path, "paper_fwd", rows)
    _write(tmp_path, "prefix_fwd", rows, gz=True)
    text = ncu_summary.summarize(tmp_path)
    assert text.count("Duration 19.00 ms") == 2 and "Block Size" not in text
    assert text.count("- SASS: 3 instructions, 1 HGMMA, 1 WARPGROUP.DEPBAR") == 2  # the 2nd kernel left out
    assert "- barrier: 60.0%" in text and "- long_sb: 30.0%" in text
    assert "| IMAD | 30.0% | 1 | 2.0 |" in text  # the predicate skipped, the count's commas read
    assert text.index("WARPGROUP.DEPBAR.LE") < text.index("`@!P0 IMAD.WIDE")  # hottest first


def test_summary_errors_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*_details.csv"):
        ncu_summary.summarize(tmp_path)
    (tmp_path / "x_details.csv").write_text(_csv([DETAILS_HEADER]))
    (tmp_path / "x_sass.csv").write_text("address,source\n1,NOP\n")
    with pytest.raises(ValueError, match="x_sass.csv: not an ncu source-page export"):
        ncu_summary.summarize(tmp_path)
    with pytest.raises(SystemExit):
        ncu_summary.main([str(tmp_path / "missing")])


def test_samples_split_by_what_the_warps_wait_on(tmp_path):
    """An mbarrier poll (the branch guarded by the predicate a ``SYNCS.PHASECHK`` set, other
    instructions between them, a later write of another predicate in between ignored) counts as
    an mbarrier wait whatever its stall reason; ``WARPGROUP.DEPBAR`` as the wgmma's; barrier
    stalls elsewhere as ``bar.sync``; a branch on a predicate an ``ISETP`` set is not a poll."""
    rows = [
        ["0x10", "SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR24+0x30590], R3", "5", "1", "0", "5", "0"],
        ["0x20", "ISETP.GE.AND P0, PT, R2, UR14, PT", "0", "1", "0", "0", "0"],
        ["0x30", "LEA R16, P3, R2, UR33, 0xc", "0", "1", "0", "0", "0"],
        ["0x40", "@!P2  BRA 0x10", "40", "1", "0", "40", "0"],
        ["0x50", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "20", "1", "20", "0", "0"],
        ["0x60", "BAR.SYNC.DEFER_BLOCKING 0x0, 0x80", "5", "1", "0", "5", "0"],
        ["0x70", "NOP", "15", "1", "15", "0", "0"],
        ["0x80", "ISETP.NE.AND P1, PT, R0, RZ, PT", "0", "1", "0", "0", "0"],
        ["0x90", "@P1 BRA 0x60", "15", "1", "0", "15", "0"],
    ]
    got = ncu_summary.wait_kinds([dict(zip(SASS_HEADER, r)) for r in rows])
    assert got == pytest.approx(
        {"mbarrier": 0.45, "wgmma": 0.2, "bar.sync": 0.15, "issuing": 0.0, "other": 0.2}
    )
    _write(tmp_path, "ws", rows)
    assert "mbarrier 45.0%, wgmma 20.0%, bar.sync 15.0%, issuing 0.0%, other 20.0%" in ncu_summary.summarize(
        tmp_path
    )
