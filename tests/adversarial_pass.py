"""A hostile-but-realistic user's pass over ctxlab (issue #17), as a script, not a test:

    .venv/bin/python tests/adversarial_pass.py [--only SUBSTRING] [--out FILE.json]

Each case runs ctxlab's commands as a user would (subprocesses, tiny sizes, CPU) and is judged
*well handled* when the outcome is the expected one: a run that should work exits 0 (and leaves
what it should), a bad input exits non-zero with a message naming the culprit (a setting, a file,
a line) and no Python traceback of ctxlab's own code after it. Anything else is *poorly handled*
(a failure, but unclear) or *wrong* (a bad input accepted, or a good one refused). The combination
matrix (every experiment x every attention x every position option) is tests/test_composition.py's
and runs in CI; this pass covers faults around runs: data, files, processes, restarts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# this folder is on sys.path when run as a script: the reliability tests' environment and settings
from test_reliability import ENV, MS, NO_EVAL
from test_reliability import TINY as RELIABILITY_TINY

ROOT = Path(__file__).resolve().parents[1]
# two steps, a checkpoint at step 2
TINY = [*RELIABILITY_TINY, "model=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2"]
HELD: list[int] = []


@dataclass
class Case:
    name: str
    args: list[str]
    expect: str  # "ok", or a regex the output must hold on a non-zero exit
    setup: object = None  # callable(tmp) -> extra args, run before the command
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "ctxlab"])


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def judge(case: Case, proc: subprocess.CompletedProcess) -> tuple[str, str]:
    out = proc.stdout + proc.stderr
    ours_traceback = re.search(r'File ".*?/ctxlab/[^"]*", line \d+', out) is not None and "Traceback" in out
    if case.expect == "ok":
        return ("well", "") if proc.returncode == 0 else ("wrong", f"rc={proc.returncode}: {out[-400:]}")
    if proc.returncode == 0:
        return "wrong", "accepted"
    if not re.search(case.expect, out):
        return "poor", f"message lacks /{case.expect}/: {out[-400:]}"
    if ours_traceback and "HYDRA_FULL_ERROR" not in out:
        return "poor", "named, but after a traceback of ctxlab's code"
    return "well", ""


def write_jsonl(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return path


def book_lines() -> list[str]:
    path = ROOT / "src" / "ctxlab" / "data" / "books" / "books.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.dumps({"text": json.loads(line)["text"][:20000]}) for line, _ in zip(f, range(30))]


def cases(tmp: Path) -> list[Case]:
    good = book_lines()
    trained = tmp / "trained"

    def local(lines: list[str], name: str):
        def make(_tmp: Path) -> list[str]:
            path = write_jsonl(tmp / name, lines)
            return ["data=local", f"data.paths=[{path}]"]

        return make

    def text_ckpt(_tmp: Path) -> list[str]:
        bad = tmp / "not_a_checkpoint.ckpt"
        bad.write_text("hello")
        return [f"phase.checkpoint={bad}"]

    def truncated_ckpt(_tmp: Path) -> list[str]:
        src = trained / "checkpoints" / "last.ckpt"
        cut = tmp / "truncated.ckpt"
        cut.write_bytes(src.read_bytes()[:1000])
        return [f"phase.checkpoint={cut}"]

    def corrupt_summary(_tmp: Path) -> list[str]:
        bad = tmp / "cmp" / "run_a" / "results"
        bad.mkdir(parents=True, exist_ok=True)
        (bad / "summary.json").write_text("{not json")
        return [str(tmp / "cmp"), "--out", str(tmp / "cmp_out")]

    def held_dir(_tmp: Path) -> list[str]:  # a live run's lock: this script holds its flock
        import fcntl

        d = tmp / "held"
        d.mkdir(exist_ok=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        HELD.append(fd)  # kept open (and locked) until the script ends
        return [f"hydra.run.dir={d}"]

    def changed(_tmp: Path) -> list[str]:
        return [f"hydra.run.dir={trained}", *MS, "trainer.max_steps=4"]

    return [
        # settings
        Case("seq_len negative", [*TINY, "data.seq_len=-5"], r"data\.seq_len"),
        Case("seq_len not a number", [*TINY, "data.seq_len=abc"], r"data\.seq_len"),
        Case("typo in a group setting", [*TINY, "attention.regoin=8"], r"regoin"),
        Case("batch size 0", [*TINY, "data.batch_size=0"], r"batch_size"),
        Case("max_steps negative", [*TINY, "trainer.max_steps=-3"], r"max_steps"),
        Case("heads do not divide", [*TINY, "model.n_heads=3"], r"n_heads|heads"),
        Case("passkey depth > 1", [*TINY, "eval.passkey.depths=[1.5]"], r"depth"),
        Case("unknown attention option", [*TINY, "attention=flash9"], r"flash9"),
        Case(
            "selected positions with dense attention",
            [*TINY, "attention=dense", "position=selected"],
            r"selected",
        ),
        Case(
            "MS dense at the training length",
            [*TINY, "attention=ms_causal", "attention.region=64"],
            r"region|dense",
        ),
        Case("study arm collision", ["experiment=quickstart", "attention=s2", *TINY], r"attention"),
        Case("unknown study arm", ["experiment=quickstart", "study.only=[nope]", *TINY], r"nope"),
        Case(
            "context parallel n does not divide",
            [*TINY, "trainer=cp_cpu", "trainer.strategy.context_parallel=3"],
            r"context_parallel",
        ),
        Case(
            "NIAH shorter than its prompt",
            [*TINY, "eval.niah.enabled=true", "eval.niah.lengths=[8]"],
            r"niah",
        ),
        # checkpoints and files
        Case(
            "checkpoint missing",
            [*TINY, "phase=extrapolate", "phase.checkpoint=/nonexistent/x.ckpt"],
            r"phase\.checkpoint",
        ),
        Case(
            "checkpoint is a text file", [*TINY, "phase=extrapolate"], r"phase\.checkpoint", setup=text_ckpt
        ),
        Case(
            "checkpoint truncated", [*TINY, "phase=extrapolate"], r"phase\.checkpoint", setup=truncated_ckpt
        ),
        Case(
            "evaluate under other settings",
            [*TINY, "phase=extrapolate", f"phase.checkpoint={trained}/checkpoints/last.ckpt", *MS],
            r"attention|position",
        ),
        Case("resume with changed settings", [*TINY], r"attention", setup=changed),
        Case("directory held by a live run", [*TINY, *NO_EVAL], r"in use|held|lock", setup=held_dir),
        # data
        Case(
            "local data file missing",
            [*TINY, "data=local", "data.paths=[/nonexistent/corpus.jsonl]"],
            r"data\.paths|nonexistent",
        ),
        Case(
            "malformed JSONL line",
            [*TINY, *NO_EVAL],
            r"line \d+",
            setup=local([*good[:3], "{broken", *good[3:]], "bad"),
        ),
        Case(
            "empty data file", [*TINY, *NO_EVAL], r"empty|no (text|document)|tokens", setup=local([], "empty")
        ),
        Case(
            "documents shorter than a row",
            [*TINY, *NO_EVAL, "data.seq_len=100000"],
            r"seq_len",
            setup=local(good, "short"),
        ),
        Case("local data works", [*TINY, *NO_EVAL], "ok", setup=local(good, "good")),
        # other commands
        Case(
            "compare: a corrupt summary",
            [],
            r"summary\.json",
            setup=corrupt_summary,
            command=[sys.executable, "-m", "ctxlab.compare"],
        ),
        Case(
            "export: not a run",
            [str(tmp / "nothing"), str(tmp / "exp_out")],
            r"nothing|run",
            command=[sys.executable, "-m", "ctxlab.export"],
        ),
        Case(
            "lm-eval: not a run",
            [
                "--model",
                "ctxlab",
                "--model_args",
                f"run={tmp / 'nothing'}",
                "--tasks",
                "ctxlab_niah_single",
                "--limit",
                "1",
            ],
            r"nothing|run",
            command=[sys.executable, "-m", "ctxlab.lm_eval"],
        ),
        Case(
            "report: no study",
            [str(tmp / "nothing")],
            r"nothing|summary",
            command=[sys.executable, "-m", "ctxlab.report"],
        ),
        # the good paths
        Case(
            "sweep over options with MS settings",
            [
                "-m",
                "attention=dense,ms_causal",
                "attention.region=4",
                "attention.budget=8",
                "attention.merge=2",
                *TINY,
                *NO_EVAL,
                f"hydra.sweep.dir={tmp / 'sweep'}",
            ],
            "ok",
        ),
    ]


def interrupt_cases(tmp: Path) -> list[tuple[str, str, str]]:
    """Kill -9 and SIGTERM at a few points, then the same command: (name, verdict, note)."""
    results = []
    for sig, point in (
        (signal.SIGKILL, "step2.ckpt"),
        (signal.SIGTERM, "step2.ckpt"),
        (signal.SIGKILL, "step4.ckpt"),
    ):
        run_dir = tmp / f"int_{sig.name}_{point}"
        args = [
            *TINY,
            *NO_EVAL,
            "trainer.max_steps=8",
            "trainer.val_check_interval=2",
            f"hydra.run.dir={run_dir}",
        ]
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctxlab", *args],
            cwd=tmp,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        t0 = time.monotonic()
        while (
            not (run_dir / "checkpoints" / point).exists()
            and proc.poll() is None
            and time.monotonic() - t0 < 300
        ):
            time.sleep(0.2)
        proc.send_signal(sig)
        out = proc.communicate(timeout=300)[0]
        name = f"{sig.name} after {point}, then rerun"
        if sig == signal.SIGTERM and (proc.returncode == 0 or "resume" not in out.lower()):
            results.append((name, "poor", f"rc={proc.returncode}, no resume command"))
            continue
        again = run([sys.executable, "-m", "ctxlab", *args], tmp)
        rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines() if again.returncode == 0 else []
        kept = any(",1," in r or r.endswith(",1") for r in rows[1:]) if rows else False
        verdict = "well" if again.returncode == 0 and len(rows) > 1 and kept else "wrong"
        results.append(
            (name, verdict, "" if verdict == "well" else f"rc={again.returncode}, rows={len(rows)}")
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ctxlab-adversarial-"))
    # one finished run the checkpoint cases use
    trained = run([sys.executable, "-m", "ctxlab", *TINY, *NO_EVAL, f"hydra.run.dir={tmp / 'trained'}"], tmp)
    if trained.returncode != 0:
        sys.exit(f"the reference run failed:\n{trained.stdout[-2000:]}\n{trained.stderr[-2000:]}")
    results = []
    for case in cases(tmp):
        if args.only not in case.name:
            continue
        extra = case.setup(tmp) if case.setup else []
        proc = run([*case.command, *case.args, *extra], tmp)
        verdict, note = judge(case, proc)
        results.append((case.name, verdict, note))
        print(f"{verdict:5s} {case.name}{'  -- ' + note[:300] if note else ''}", flush=True)
    if "interrupt" in args.only or not args.only:
        for name, verdict, note in interrupt_cases(tmp):
            results.append((name, verdict, note))
            print(f"{verdict:5s} {name}{'  -- ' + note if note else ''}", flush=True)
    counts = {v: sum(1 for _, x, _ in results if x == v) for v in ("well", "poor", "wrong")}
    well, poor, wrong = counts["well"], counts["poor"], counts["wrong"]
    print(f"{len(results)} cases: {well} handled well, {poor} poorly, {wrong} wrong")
    if args.out:
        Path(args.out).write_text(json.dumps({"counts": counts, "cases": results}, indent=1))


if __name__ == "__main__":
    main()
