"""Check, then time, attention implementations (MS's, and other ops such as MoBA's) on the
registry's cases; write result files.

    python -m ctxlab.kernels.bench.run --preset h100 --ops gather,triton,dense --out DIR

Per case (bf16, fresh random inputs): the selections are timed: ``ms_select_torch`` (its
sort-free default, ``method="topk"``, whose indices must equal those of the stable-sort path
``method="sort"``, also timed: if they differ the topk time is not reported) and, on a GPU, the
fused ``ms_select_triton``, whose indices are compared with torch's. Then each op is checked
before it is timed (``triton_det`` is the deterministic mode, timed beside ``triton``). The
check: the output's last rows (up to two blocks) against
``ms_attend_torch`` in float32 (dense causal attention for ``dense``), and dq, dk, dv against
the ``gather`` op's (an independent PyTorch implementation of the same function). An op of
another function (``fn.reference(q, k, v, start)`` gives its float32 output rows from
``start``; ``fn.pairs`` the query-key pairs it computes) is checked on its output tail against
that reference; its gradients are checked by its own tests. An op that
fails its check is reported as failed, with its errors and no time. Times are CUDA-event
medians after a warm-up; ``extra_gib`` is the peak memory of one forward+backward beyond the
inputs, the output and the three gradients. Results go to ``<out>/<stem>.json`` and ``.md``
after every case, so a run cut short keeps what it finished. ``--fit FIRST,LAST`` then doubles
L from FIRST (B=1, 32 query heads, 8 kv heads, D=128, paper settings) until a forward+backward
of ``ms_attention(backend="triton")`` runs out of memory, and records the lengths that fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import triton

from ..ms_attention import triton_impl
from ..ms_attention.interface import ms_attention
from ..ms_attention.torch_impl import ms_attend_torch, ms_select_torch
from ..ms_attention.triton_impl import INTERPRETER_CONFIG, ms_select_triton, select_shallow_counted
from .cases import PRESETS, SETTINGS, Case, registry
from .ops import OPS, build, launch_config, launch_fields, triton_parts

OUT_TOL = 2e-2  # relative L2 error of a bf16 output against float32
GRAD_TOL = 5e-2  # relative L2 error between two bf16 implementations' gradients
SELECT_KEYS = ("shallow_select_ms", "select_ms", "torch_select_ms", "torch_sort_select_ms")
"""The selections timed: shallow, fused (full depth), torch topk, torch sort."""
SELECT_KEY_OF = {"shallow": "shallow_select_ms", "triton": "select_ms", "torch": "torch_select_ms"}
"""The time column of each ``LaunchConfig.select_impl``."""


class _HostEvent:
    """CPU stand-in for torch.cuda.Event (the harness's smoke runs on CPU)."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1e3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn, budget_ms: float = 400.0, max_reps: int = 20) -> float:
    """Median milliseconds of fn() over CUDA events (host clock on CPU), after one warm-up."""

    def event():
        return torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else _HostEvent()

    fn()
    _sync()
    start, end = event(), event()
    start.record()
    fn()
    end.record()
    _sync()
    reps = int(min(max_reps, max(3, budget_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        _sync()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def selection_agreement(got: torch.Tensor, want: torch.Tensor, n: int) -> tuple[float, float]:
    """(fraction of blocks with identical index rows, mean overlap of the selected sets)."""
    same = (got.long() == want).all(-1).float().mean().item()
    member = torch.zeros(*want.shape[:3], n, dtype=torch.int32, device=want.device)
    member.scatter_add_(-1, got.long(), torch.ones_like(want, dtype=torch.int32))
    member.scatter_add_(-1, want, torch.ones_like(want, dtype=torch.int32))
    return same, ((member == 2).sum(-1).float() / want.shape[-1]).mean().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(case: Case, seed: int, device: str):
    """bf16 on a GPU; float32 on CPU, where the interpreter cannot take bf16."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    q = rand(case.B, case.L, case.Hq, case.D)
    k, v = rand(case.B, case.L, case.Hkv, case.D), rand(case.B, case.L, case.Hkv, case.D)
    return q, k, v, rand(case.B, case.L, case.Hq, case.D)


def kind_of(op: str) -> str:
    """Which function an op computes: ``dense``, ``s2`` or ``ms`` (every MS implementation)."""
    return op if op in ("dense", "s2") else "ms"


def probe_rows(case: Case, kind: str) -> tuple[int, int]:
    """The probed rows ``[start, end)``: the last 256 rows for dense attention; for S2 the 256
    rows before the last G/2 (where both head halves sit in whole groups: the plain halves in the
    last group, the shifted ones in the group before the roll's wrap); else the last two blocks."""
    if kind == "s2":
        end = case.L - case.s2_group() // 2
        return max(end - 256, case.L - case.s2_group()), end
    return max(case.L - (256 if kind == "dense" else 2 * case.merge * case.region), 0), case.L


def reference_tail(case: Case, q, k, v, idx, kind: str) -> torch.Tensor:
    """float32 outputs of the probed rows, from a plain softmax over each row's visible keys."""
    start, end = probe_rows(case, kind)
    with torch.no_grad():
        if kind in ("dense", "s2"):
            rep = case.Hq // case.Hkv
            qf = q[:, start:end].float().transpose(1, 2)
            kf = k.float().repeat_interleave(rep, 2).transpose(1, 2)
            vf = v.float().repeat_interleave(rep, 2).transpose(1, 2)
            logits = qf @ kf.transpose(-1, -2) * case.D**-0.5  # [B, Hq, rows, L]
            pos = torch.arange(case.L, device=q.device)
            rows = torch.arange(start, end, device=q.device)[:, None]
            keep = (pos <= rows)[None]  # [1, rows, L]
            if kind == "s2":  # plain heads: keys from L - G on; shifted heads: from L - 3G/2 on
                G = case.s2_group()
                lo = torch.full((case.Hq, 1, 1), case.L - G, device=q.device)
                lo[case.Hq // 2 :] = case.L - G - G // 2
                keep = keep & (pos >= lo)
            out = logits.masked_fill(~keep, float("-inf")).softmax(-1) @ vf
            return out.transpose(1, 2)
        return ms_attend_torch(
            q.float(),
            k.float(),
            v.float(),
            idx,
            region=case.region,
            budget=case.budget,
            merge=case.merge,
            scope=case.scope,
            pe=case.pe,
            start=start,
        )


def run_case(
    case: Case, ops: list[str], seed: int, flex_cases: list[str], device: str = "cuda"
) -> list[dict]:
    q, k, v, do = inputs(case, seed, device)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    sel_opts = dict(region=case.region, budget=case.budget, merge=case.merge, scope=case.scope)

    def selection(method: str = "topk"):
        return ms_select_torch(q, k, method=method, **sel_opts)

    def fused_selection():
        return ms_select_triton(q, k, pool="mean", select="paper", **sel_opts)

    def shallow_selection():
        return select_shallow_counted(q, k, pool="mean", select="paper", **sel_opts)[0]

    with torch.no_grad():
        torch_sort_select_ms = cuda_time(lambda: selection("sort"), budget_ms=200, max_reps=5)
        idx = selection("sort")
        torch_methods_same = torch.equal(selection(), idx)
        torch_select_ms = cuda_time(selection, budget_ms=200, max_reps=5) if torch_methods_same else None
        select_same = select_overlap = shallow_same = shallow_vs_fused = None
        shallow_redone = shallow_retried = None
        shallow_ms = None
        if device == "cuda":
            fused = fused_selection()
            select_same, select_overlap = selection_agreement(fused, idx, -(-case.L // case.region))
            select_ms = cuda_time(fused_selection, budget_ms=300, max_reps=5)
            shallow, shallow_redone, shallow_retried = select_shallow_counted(
                q, k, pool="mean", select="paper", **sel_opts
            )
            shallow_same = selection_agreement(shallow, idx, -(-case.L // case.region))[0]
            shallow_vs_fused = bool(torch.equal(shallow, fused))
            shallow_ms = cuda_time(shallow_selection, budget_ms=300, max_reps=5)
        else:
            select_ms = torch_select_ms
    configured = triton_impl.resolve_select_impl(triton_impl.default_config(torch.device(device)), case.merge)
    tails = {}
    ref_grads = None
    rows = []
    for op in ops:
        if op == "flex" and not any(c and c in case.name for c in flex_cases):
            continue
        row = dict(
            case=case.name,
            op=op,
            L=case.L,
            Hq=case.Hq,
            Hkv=case.Hkv,
            D=case.D,
            setting=case.setting,
            region=case.region,
            budget=case.budget,
            merge=case.merge,
            scope=case.scope,
            pe=case.pe,
            shallow_select_ms=shallow_ms,
            shallow_redone_items=shallow_redone,
            shallow_retried_items=shallow_retried,
            shallow_same_rows=shallow_same,
            shallow_equals_fused=shallow_vs_fused,
            select_ms=select_ms,
            torch_select_ms=torch_select_ms,
            torch_sort_select_ms=torch_sort_select_ms,
            torch_topk_equals_sort=torch_methods_same,
            configured_select=configured,
            select_same_rows=select_same,
            select_overlap=select_overlap,
        )
        rows.append(row)
        try:
            fn = build(op, case, idx)
            row["pairs"] = getattr(fn, "pairs", None)
            if device != "cuda" and hasattr(fn, "config"):
                fn.config = INTERPRETER_CONFIG
            with launch_config(fn):
                check_and_time(case, op, fn, row, leaves, q, k, v, do, idx, tails, ref_grads)
            if op == "gather" and row.get("grads") is not None:
                ref_grads = row.pop("grads")
            row.pop("grads", None)
            if op.startswith("triton") and op != "triton_det" and row.get("status") == "ok":
                with torch.no_grad():
                    parts = triton_parts(case, idx, q, k, v, do, fn.config, cuda_time)
                row["parts_ms"] = parts
        except torch.cuda.OutOfMemoryError as err:
            row["status"] = f"out of memory: {str(err).splitlines()[0][:120]}"
        except Exception as err:  # noqa: BLE001 - a broken op is reported, the run goes on
            row["status"] = f"error: {type(err).__name__}: {str(err)[:300]}"
        row.pop("grads", None)
        if device == "cuda":
            torch.cuda.empty_cache()
    dense_pairs, ms_pairs = case.dense_pairs(), case.ms_pairs()
    for row in rows:
        pairs = row.pop("pairs", None) or {"dense": dense_pairs, "s2": case.s2_pairs()}.get(
            row["op"], ms_pairs
        )
        row["computed_pair_fraction"] = pairs / dense_pairs
        for pass_ in ("fwd", "fwd+bwd"):
            ms = row.get(f"{pass_}_ms")
            if ms:
                row[f"{pass_}_tflops_computed"] = case.flops(pairs, pass_) / ms / 1e9
                row[f"{pass_}_tflops_dense_equiv"] = case.flops(dense_pairs, pass_) / ms / 1e9
    return rows


def check_and_time(case, op, fn, row, leaves, q, k, v, do, idx, tails, ref_grads) -> None:
    """Check op's output tail and gradients (and, in deterministic mode, that a second backward
    gives the same bits), then time it; results go into ``row``."""
    for x in leaves:
        x.grad = None
    out = fn(*leaves)
    out.backward(do)
    grads = [x.grad.detach().clone() for x in leaves]
    own = getattr(fn, "reference", None)  # an op of another function: its own reference
    if own is not None:
        start, _ = probe_rows(case, "dense")
        errs = {"o_tail": rel_err(out[:, start:], own(q.float(), k.float(), v.float(), start))}
        kind, ref_grads = "own", None
    else:
        kind = kind_of(op)
        if kind not in tails:
            tails[kind] = reference_tail(case, q, k, v, idx, kind)
        start, end = probe_rows(case, kind)
        errs = {"o_tail": rel_err(out[:, start:end], tails[kind])}
    if kind == "ms" and ref_grads is not None:
        errs |= {n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)}
    row["errors"] = errs
    row["grads"] = grads if op == "gather" else None
    del out
    ok = errs["o_tail"] <= OUT_TOL and all(e <= GRAD_TOL for n, e in errs.items() if n != "o_tail")
    if not ok:
        row["status"] = "failed check"
        return
    if getattr(getattr(fn, "config", None), "deterministic", False):
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(do)
        row["bitwise_repeatable"] = all(torch.equal(x.grad, g) for x, g in zip(leaves, grads))
        if not row["bitwise_repeatable"]:
            row["status"] = "failed check: deterministic mode gave other bits on a second backward"
            return
    row.update(time_op(case, fn, leaves, do))
    row["status"] = "ok"


def time_op(case: Case, fn, leaves, do) -> dict:
    with torch.no_grad():
        fwd = cuda_time(lambda: fn(*leaves))

    def step():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(do)

    both = cuda_time(step)
    result = {"fwd_ms": fwd, "fwd+bwd_ms": both, "bwd_ms": both - fwd}
    for x in leaves:
        x.grad = None
    if do.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        outputs = do.nbytes + sum(x.nbytes for x in leaves)  # o, dq, dk, dv
        result["extra_gib"] = (torch.cuda.max_memory_allocated() - base - outputs) / 2**30
        for x in leaves:
            x.grad = None
    return result


def _fit_step(tensors: list[torch.Tensor], region: int, budget: int, merge: int) -> None:
    q, k, v, do = tensors
    for x in (q, k, v):
        x.grad = None
    ms_attention(q, k, v, region=region, budget=budget, merge=merge, backend="triton").backward(do)


def fit_probe(
    first: int, last: int, kv_heads: int = 8, setting: str = "paper", seed: int = 0, on_row=None
) -> list[dict]:
    """Double L from ``first`` until a forward+backward (selection included) runs out of memory
    or L passes ``last``; each row says whether L fit, one step's milliseconds and peak GiB.
    ``on_row(rows)`` is called after every length, so a run cut short keeps what it measured."""
    w, T, m = SETTINGS[setting]
    rows = []
    L = first
    while last >= L:
        row: dict = dict(L=L, kv=kv_heads, setting=setting, fits=False, ms=None, peak_gib=None)
        rows.append(row)
        tensors = []
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            gen = torch.Generator(device="cuda").manual_seed(seed)
            for heads in (32, kv_heads, kv_heads, 32):
                tensors.append(
                    torch.randn(1, L, heads, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
                )
            for x in tensors[:3]:
                x.requires_grad_()
            _fit_step(tensors, w, T, m)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _fit_step(tensors, w, T, m)
            end.record()
            torch.cuda.synchronize()
            row.update(
                fits=True, ms=start.elapsed_time(end), peak_gib=torch.cuda.max_memory_allocated() / 2**30
            )
        except torch.cuda.OutOfMemoryError as err:
            row["error"] = str(err).splitlines()[0][:160]
            break
        finally:
            for x in tensors:
                x.grad = None
            del tensors
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        if on_row is not None:
            on_row(rows)
        L *= 2
    return rows


def environment(device: str) -> dict:
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        card="CPU (Triton interpreter)",
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta |= dict(card=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                     sms=props.multi_processor_count)  # fmt: skip
    return meta


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# MS attention benchmark, {meta['card']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; bf16, B=1; "
        "ms are CUDA-event medians; TFLOP/s on computed pairs (dense-equivalent in brackets); "
        "selection timed apart (shallow Triton selection / full-depth fused Triton selection / "
        "ms_select_torch sort-free / ms_select_torch stable sort); 'pairs' is the "
        "fraction of causal query-key pairs computed; 'extra GiB' is peak memory beyond q, k, v, "
        "o and the gradients.",
        "",
        "| case | op | status | fwd ms | fwd+bwd ms | + select ms (shallow / fused / topk / sort) | "
        "TFLOP/s fwd+bwd | "
        "pairs | extra GiB | vs dense | vs gather |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["op"]] = row
    dense_by_len = {r["L"]: r for r in rows if r["op"] == "dense" and r.get("status") == "ok"}

    def fmt(row, key, digits=1):
        value = row.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    for row in rows:
        ratio = {}
        for base_name, base in (
            ("dense", dense_by_len.get(row["L"])),
            ("gather", by_case[row["case"]].get("gather")),
        ):
            if base and base.get("fwd+bwd_ms") and row.get("fwd+bwd_ms"):
                ratio[base_name] = f"{base['fwd+bwd_ms'] / row['fwd+bwd_ms']:.2f}x"
        tflops = "-"
        if row.get("fwd+bwd_tflops_computed"):
            tflops = f"{row['fwd+bwd_tflops_computed']:.0f} ({row['fwd+bwd_tflops_dense_equiv']:.0f})"
        select = "-"
        if row["op"] != "dense":
            select = " / ".join(fmt(row, key) for key in SELECT_KEYS)
        lines.append(
            f"| {row['case']} | {row['op']} | {row.get('status', '?')} | {fmt(row, 'fwd_ms')} | "
            f"{fmt(row, 'fwd+bwd_ms')} | {select} | {tflops} | "
            f"{row['computed_pair_fraction']:.3f} | {fmt(row, 'extra_gib', 2)} | "
            f"{ratio.get('dense', '-')} | {ratio.get('gather', '-')} |"
        )
    lines += summary(rows, dense_by_len)
    lines += [
        "",
        "Stages of ours (ms): forward, dq, dk/dv by relaxed atomics (dkv), by partial sums and a "
        "fixed-order reduction (dkv_partial, deterministic), by the reverse index (dkv_reverse, "
        "deterministic), and the whole backward as the launch config runs it (bwd: where fused_dq "
        "applies, dq inside dk/dv, so less than dq + dkv).",
        "",
    ]
    for row in rows:
        if row.get("parts_ms"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in row["parts_ms"].items())
            lines.append(f"- {row['case']} / {row['op']}: {parts}")
    lines += [
        "",
        "Selections: ms_select_torch sort-free (topk) vs stable sort (indices must be identical); "
        "fused vs ms_select_torch (identical index rows; mean overlap of the sets); shallow vs "
        "ms_select_torch (identical rows), vs fused (identical tensors: the same float32 scores) "
        "and the items (b, head, block) it sent to the full-depth kernel.",
        "",
    ]
    for row in rows:
        if row["op"] == "triton":
            lines.append(f"- {row['case']}: topk == sort: {row.get('torch_topk_equals_sort')}")
        if row["op"] == "triton" and row.get("select_same_rows") is not None:
            lines.append(
                f"- {row['case']}: identical rows {row['select_same_rows']:.4f}, overlap "
                f"{row['select_overlap']:.5f}"
            )
        if row["op"] == "triton" and row.get("shallow_same_rows") is not None:
            lines.append(
                f"- {row['case']}: shallow identical rows {row['shallow_same_rows']:.4f}, "
                f"equals fused {row['shallow_equals_fused']}, items redone {row['shallow_redone_items']}"
            )
    fits = meta.get("fit_probe") or []
    if fits:
        lines += [
            "",
            "Longest length that fits: ms_attention(backend='triton') forward+backward, selection "
            "included, B=1, 32 query heads, 8 kv heads, D=128, bf16, paper settings; one step timed "
            "after one warm-up step.",
            "",
            "| L | fits | fwd+bwd+select ms | peak GiB |",
            "|---|---|---|---|",
        ]
        for fit in fits:
            ms = "-" if fit.get("ms") is None else f"{fit['ms']:.0f}"
            peak = "-" if fit.get("peak_gib") is None else f"{fit['peak_gib']:.1f}"
            lines.append(f"| {fit['L']} | {fit['fits']} | {ms} | {peak} |")
    lines += ["", "Errors (relative L2): o_tail vs float32 reference; dq, dk, dv vs gather.", ""]
    for row in rows:
        if row.get("errors"):
            errs = ", ".join(f"{k} {v:.2e}" for k, v in row["errors"].items())
            lines.append(f"- {row['case']} / {row['op']}: {errs}")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict], dense_by_len: dict[int, dict]) -> list[str]:
    """One line per case, the kernels README's table: dense, S2, gather, ours (fast and
    deterministic), the selections, ours + the configured selection, and the issue's bound
    (dense fwd+bwd x fraction of causal pairs computed)."""
    lines = [
        "",
        "Summary (fwd+bwd ms; 'sel' shallow / fused / torch topk / torch sort; 'ours + sel' adds "
        "the selection "
        "ms_attention runs (LaunchConfig.select_impl); 'bound' = dense x pair fraction; S2 = "
        "LongLoRA's S2-Attn at G = L/4, which computes 1/4 of the causal pairs).",
        "",
        "| case | dense | S2 | gather | ours | ours det | sel | ours + sel | bound | "
        "(ours + sel) / bound | dense / (ours + sel) | S2 / (ours + sel) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    s2_by_len = {r["L"]: r for r in rows if r["op"] == "s2" and r.get("status") == "ok"}
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["op"]] = row

    def ms(row: dict | None) -> float | None:
        return None if row is None or row.get("status") != "ok" else row.get("fwd+bwd_ms")

    def num(x: float | None, digits: int = 1) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    for case, ops in by_case.items():
        ours_row = ops.get("triton")
        if ours_row is None:
            continue
        dense_ms, ours = ms(dense_by_len.get(ours_row["L"])), ms(ours_row)
        s2_ms = ms(s2_by_len.get(ours_row["L"]))
        sel = ours_row.get(SELECT_KEY_OF[ours_row.get("configured_select", "torch")])
        total = None if ours is None or sel is None else ours + sel
        bound = None if dense_ms is None else dense_ms * ours_row["computed_pair_fraction"]
        sels = " / ".join(num(ours_row.get(k)) for k in SELECT_KEYS)
        lines.append(
            f"| {case} | {num(dense_ms)} | {num(s2_ms)} | {num(ms(ops.get('gather')))} | {num(ours)} | "
            f"{num(ms(ops.get('triton_det')))} | {sels} | {num(total)} | {num(bound)} | "
            f"{num(total / bound if total and bound else None, 2)} | "
            f"{num(dense_ms / total if total and dense_ms else None, 2)} | "
            f"{num(s2_ms / total if total and s2_ms else None, 2)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="h100", choices=sorted(PRESETS))
    parser.add_argument(
        "--ops",
        default="gather,triton,dense,flex",
        help=f"comma list of {', '.join(OPS)} (triton_det: deterministic mode); gather "
        "first (its gradients are the check's reference); launch overrides as "
        "triton:sel_block_n=128+sel_warps=8 or triton:dkv_path=partial",
    )
    parser.add_argument("--cases", default="", help="comma list; run cases containing any")
    parser.add_argument(
        "--pe",
        default="pre",
        choices=("pre", "selected"),
        help="positions: pre (RoPE already in q and k) or selected (ours rotates on the fly, at "
        "the positions the paper's pre-training gives the selected tokens; gather and flex "
        "implement pre only)",
    )
    parser.add_argument(
        "--flex-cases",
        default="paper-L32K-kv8",
        help="comma list of case-name substrings that run flex (it compiles)",
    )
    parser.add_argument("--out", default="kernels/bench/results")
    parser.add_argument("--stem", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: a smoke run of the harness (needs TRITON_INTERPRET=1)",
    )
    parser.add_argument(
        "--time-limit-s", type=float, default=1e9, help="start no new case after this many seconds"
    )
    parser.add_argument(
        "--fit",
        default="",
        help="FIRST,LAST: after the cases, double L from FIRST to LAST until fwd+bwd runs out of memory",
    )
    parser.add_argument(
        "--select-impl",
        default=None,
        choices=triton_impl.SELECT_IMPLS,
        help="the selection ms_attention runs on the GPU in this run (LaunchConfig.select_impl; "
        "default: the configured one); 'ours + sel' adds its time",
    )
    parser.add_argument(
        "--launch",
        default="",
        help="GPU launch settings for the whole run, '+'-joined (LaunchConfig fields), e.g. "
        "select_precision=tf32x3+shallow_rescore=true",
    )
    args = parser.parse_args(argv)
    try:
        launch = launch_fields(args.launch)
    except ValueError as err:
        parser.error(f"--launch: {err}")
    if args.select_impl:
        launch["select_impl"] = args.select_impl
    triton_impl.GPU_CONFIG = dataclasses.replace(triton_impl.GPU_CONFIG, **launch)

    flex_cases = args.flex_cases.split(",")
    wanted = args.cases.split(",")
    cases = registry(**PRESETS[args.preset], pe=args.pe).values()
    cases = [c for c in cases if any(w in c.name for w in wanted)]
    ops = args.ops.split(",")
    meta = environment(args.device)
    # The launch settings the run's ops start from (per-op overrides are in the op names).
    meta["launch_config"] = dataclasses.asdict(triton_impl.default_config(torch.device(args.device)))
    card = "".join(ch if ch.isalnum() else "_" for ch in meta["card"])
    stem = args.stem or f"ms_attention_{meta['date'][:10]}_{card}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    began = time.monotonic()
    lengths_done: set[int] = set()  # lengths whose dense and S2 rows exist (they ignore the MS setting)
    for case in cases:
        if time.monotonic() - began > args.time_limit_s:
            print(f"time limit: skipping {case.name} and later cases", flush=True)
            break
        case_ops = [op for op in ops if kind_of(op) == "ms" or case.L not in lengths_done]
        lengths_done.add(case.L)
        new = run_case(case, case_ops, args.seed, flex_cases, args.device)
        rows += new
        for row in new:
            print(
                json.dumps(
                    {
                        k: (round(v, 3) if isinstance(v, float) else v)
                        for k, v in row.items()
                        if k not in ("Hq", "D", "region", "budget", "merge", "scope", "pe")
                    }
                ),
                flush=True,
            )
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (out / f"{stem}.md").write_text(markdown(meta, rows))
    if args.fit:
        first, last = (int(x) for x in args.fit.split(","))

        def save(fits: list[dict]) -> None:
            meta["fit_probe"] = fits
            (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
            (out / f"{stem}.md").write_text(markdown(meta, rows))

        save(fit_probe(first, last, seed=args.seed, on_row=save))


if __name__ == "__main__":
    main()
