"""Documents/s of a replica's Summarizer (tokenize -> decode -> detokenize, on its model thread) over a corpus
in small row groups, as a lake of small Parquet files gives it: each record batch becomes a window of its own.

    python benchmarks/row_groups.py --shape small --docs 96 --row-group 8 --threads 1 --label one-stream \
        --out benchmarks/results/cpu-mt5-small-row-groups.json

The model thread decodes every window's rows as one stream (issue 13). Before, each window was a
continuous-batching run of its own, which drained at the window's end and, with row groups smaller than
--batch-size, never filled the batch. `--code DIR` imports model/ and pipeline/ from DIR instead of this
checkout, to time an earlier version on the same documents and checkpoint:

    mkdir -p /tmp/before && git archive <commit> model pipeline | tar -x -C /tmp/before
    python benchmarks/row_groups.py ... --code /tmp/before --label per-window

Each run adds its label's figures to --out and prints every label there. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["small", "base"], default="small")
    p.add_argument("--decoding", choices=["greedy", "beam4"], default="greedy")
    p.add_argument("--docs", type=int, default=96)
    p.add_argument("--row-group", type=int, default=8, help="rows per record batch")
    p.add_argument("--batch-size", type=int, default=16, help="documents decoded at once (--batch-size)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--code", type=Path, help="import model/ and pipeline/ from this directory")
    p.add_argument("--label", default="current")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import pyarrow as pa
    import torch

    from benchmarks import checkpoints
    from benchmarks.run import machine

    if args.code is not None:  # after those, which put this checkout first on sys.path
        sys.path.insert(0, str(args.code.resolve()))
    from model import MT5ForConditionalGeneration, MT5Tokenizer
    from model.packed import pack_head_for_cpu
    from pipeline.settings import SummarizeSettings
    from pipeline.stages import Stats, Summarizer

    torch.set_num_threads(args.threads)
    path = checkpoints.checkpoint(args.shape)
    tokenizer = MT5Tokenizer.from_pretrained(path)
    model = MT5ForConditionalGeneration.from_pretrained(path)
    pack_head_for_cpu(model)  # as a replica does
    docs = checkpoints.documents(args.docs, tokenizer)
    settings = SummarizeSettings(
        model=str(path),
        dtype="float32",
        max_new_tokens=args.max_new_tokens,
        num_beams=1 if args.decoding == "greedy" else 4,
        no_repeat_ngram_size=2,
        length_penalty=0.6,
        batch_size=args.batch_size,
    )
    table = pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]})
    row_groups = table.to_batches(max_chunksize=args.row_group)

    def run() -> tuple[float, list[str]]:
        summarizer = Summarizer(model, tokenizer, settings)
        try:
            start = time.perf_counter()
            out = list(summarizer.stream(row_groups, Stats()))
            seconds = time.perf_counter() - start
        finally:
            summarizer.close()
        return seconds, pa.Table.from_batches(out).column("summary").to_pylist()

    run_warm = Summarizer(model, tokenizer, settings)  # thread pools and kernels set up before timing
    run_warm.summarize_table(table.slice(0, 2))
    run_warm.close()
    seconds, summaries = [], None
    for repeat in range(args.repeats):
        elapsed, summaries = run()
        seconds.append(elapsed)
        print(f"[{args.label}] repeat {repeat + 1}: {elapsed:.1f}s, {len(docs) / elapsed:.2f} docs/s", flush=True)

    result = {
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
        "docs_per_second": len(docs) / statistics.median(seconds),
        "summaries": summaries,
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": vars(args) | {"code": str(args.code) if args.code else None, "out": str(args.out)},
        "machine": machine(argparse.Namespace(threads=args.threads, device="cpu")),
    }
    report = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    report[args.label] = result
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{args.docs} documents in row groups of {args.row_group}, {args.decoding}, batch size {args.batch_size}")
    print(f"{'label':<16} {'median s':>9} {'docs/s':>7}  same summaries as {args.label}")
    for label, figures in report.items():
        same = sum(a == b for a, b in zip(figures["summaries"], summaries))
        seconds, rate = figures["median_seconds"], figures["docs_per_second"]
        print(f"{label:<16} {seconds:>9.1f} {rate:>7.2f}  {same}/{len(summaries)}")


if __name__ == "__main__":
    main()
