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
