"""Engines each in a process of its own: benchmarks/run.py with one engine (and the ours-fp32 reference it always
runs) per process, the engines taking turns for --rounds. Everything after `--` goes to run.py as it is.

    python benchmarks/apart.py --engines ct2-int8,ct2-int8-parallel-batches,ours-int8-dynamic-continuous \\
        --rounds 2 --out benchmarks/results/cpu-amd-zen4-mt5-small-2threads-apart.json -- \\
        --shape small --docs 48 --decoding greedy,beam4 --threads 2

run.py runs its engines in one process, taking turns, so that a busy machine slows them alike. At one thread that is
fair. At more, two libraries' OpenMP runtimes share the process, and once CTranslate2 had run with 2 threads, our
engine's one-stream decode on 2 torch threads took 8.6-9.2 s instead of 5.8-6.3 (mt5-small int8-dynamic, 48
documents, AMD EPYC Zen 4; KMP_BLOCKTIME=0 changed nothing). Apart, no engine pays for another's threads.
Ratios are medians over the rounds of each round's tokens/s and documents/s against ct2-int8's in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import write_report  # noqa: E402

BASELINE = "ct2-int8"


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", required=True, help=f"comma-separated run.py engines, {BASELINE} among them")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, help="results JSON (a table is printed either way)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    if BASELINE not in args.engines.split(","):
        p.error(f"--engines must include {BASELINE}, the baseline of the ratios")
    return args, argv[split + 1 :]


def one_run(engine: str, run_args: list[str], folder: Path, round_: int) -> dict:
    """run.py with `engine` alone (one repeat, no memory probes): its report."""
    out = folder / f"{engine}-{round_}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), *run_args]
    cmd += ["--engines", engine, "--repeats", "1", "--no-memory", "--out", str(out)]
    print(f"[apart] round {round_ + 1}: {engine}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text(encoding="utf-8"))


def main(argv=None) -> None:
    args, run_args = parse_args(argv)
    engines = args.engines.split(",")
    rows: list[dict] = []  # one per (round, engine, decoding)
    first_report = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for engine in engines[r % len(engines) :] + engines[: r % len(engines)]:
                report = one_run(engine, run_args, Path(tmp), r)
                first_report = first_report or report
                for row in report["results"]:
                    if row["engine"] == engine:
                        rows.append(
                            {
                                "round": r,
                                "engine": engine,
                                "decoding": row["decoding"],
                                "seconds": row["median_seconds"],
                                "cpu_seconds": row["cpu_seconds"][0],
                                "generated_tokens": row["generated_tokens"],
                                "tokens_per_second": row["tokens_per_second"],
                                "docs_per_second": row["docs_per_second"],
                            }
                        )
    summary = []
    for decoding in dict.fromkeys(row["decoding"] for row in rows):
        base = {row["round"]: row for row in rows if row["engine"] == BASELINE and row["decoding"] == decoding}
        for engine in engines:
            mine = [row for row in rows if row["engine"] == engine and row["decoding"] == decoding]
            summary.append(
                {
                    "engine": engine,
                    "decoding": decoding,
                    "seconds": [row["seconds"] for row in mine],
                    "tokens_per_second": statistics.median(row["tokens_per_second"] for row in mine),
                    "docs_per_second": statistics.median(row["docs_per_second"] for row in mine),
                    "vs_ct2": round(
                        statistics.median(
                            row["tokens_per_second"] / base[row["round"]]["tokens_per_second"] for row in mine
                        ),
                        3,
                    ),
                    "vs_ct2_docs": round(
                        statistics.median(
                            row["docs_per_second"] / base[row["round"]]["docs_per_second"] for row in mine
                        ),
                        3,
                    ),
                }
            )
    command = " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *(sys.argv[1:] if argv is None else argv)])
    print(f"\n{command}\n{first_report['machine']['cpu']}, {first_report['machine']['threads']} threads")
    print(f"{'decoding':8s} {'engine':34s} {'tok/s':>7s} {'docs/s':>7s} {'x ct2-int8':>10s} {'(docs/s)':>9s}  seconds")
    for s in summary:
        print(
            f"{s['decoding']:8s} {s['engine']:34s} {s['tokens_per_second']:7.1f} {s['docs_per_second']:7.2f} "
            f"{s['vs_ct2']:10.2f} {s['vs_ct2_docs']:9.2f}  {s['seconds']}"
        )
    report = {
        "benchmark": "engines apart: one process each (benchmarks/apart.py over run.py)",
        "command": command,
        "date": first_report["date"],
        "machine": first_report["machine"],
        "setup": first_report["setup"],
        "results": summary,
        "rounds": rows,
    }
    write_report(report, args.out, "apart")


if __name__ == "__main__":
    main()
