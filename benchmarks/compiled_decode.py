"""The compiled decode step against the eager one: tokens/s of steady decoding, and the time to compile.

    .venv/bin/python benchmarks/compiled_decode.py --threads 1 --docs 4 --max-new-tokens 24

Every document decodes exactly --max-new-tokens steps (min_new_tokens is the same), all at once, so a run is one
(rows, width) bucket: one compile per decoding, and the figures are those of the step itself. Each engine runs
once untimed (the compiled one's first run, which compiles, is reported as compile time) and then --repeats
times; the median is kept. Prints a table and writes one JSON; nothing here asserts a time.
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
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import checkpoints  # noqa: E402
from benchmarks.engines import DECODINGS  # noqa: E402
from benchmarks.run import agreement, machine  # noqa: E402


def decode(model, docs: list[dict], settings: dict) -> list[list[int]]:
    from model.decode import decode_stream

    config = model.generation_config.updated(**settings)
    rows = len(docs) * settings["num_beams"]
    with torch.inference_mode():
        out = dict(decode_stream(model, ((i, d["ids"]) for i, d in enumerate(docs)), config, max_rows=rows))
    return [out[i][0] for i in range(len(docs))]


def timed(model, docs, settings) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = decode(model, docs, settings)
    if torch.cuda.is_available() and model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(checkpoints.SHAPES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--docs", type=int, default=4, help="documents decoded at once")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decoding", default="greedy,beam4")
    p.add_argument(
        "--out", type=Path, help="results JSON (default benchmarks/results/<device>-mt5-<shape>-compiled-decode.json)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from model import MT5Tokenizer, load_for_inference

    path = checkpoints.checkpoint(args.shape)
    docs = checkpoints.documents(args.docs, MT5Tokenizer.from_pretrained(path))
    # as a job with --compile-decode loads it (its head alone packed on CPU), for the eager step too: the same model
    model = load_for_inference(path, dtype=args.dtype, device=args.device, compile_decode=True)
    rows = []
    for name in args.decoding.split(","):
        d = DECODINGS[name]
        settings = dict(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            num_beams=d.num_beams,
            no_repeat_ngram_size=d.no_repeat_ngram_size,
            length_penalty=d.length_penalty,
            early_stopping=d.early_stopping,
        )
        first = {}
        seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
        outputs = {}
        for engine in ("eager", "compiled"):
            first[engine], outputs[engine] = timed(model, docs, {**settings, "compile": engine == "compiled"})
        for r in range(args.repeats):
            for engine in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                elapsed, _ = timed(model, docs, {**settings, "compile": engine == "compiled"})
                seconds[engine].append(elapsed)
                print(f"[compiled-decode] {name} {engine} {elapsed:.2f} s", file=sys.stderr, flush=True)
        tokens = len(docs) * args.max_new_tokens
        eager, compiled = statistics.median(seconds["eager"]), statistics.median(seconds["compiled"])
        rows.append(
            {
                "decoding": name,
                "tokens": tokens,
                "eager_tokens_per_second": round(tokens / eager, 2),
                "compiled_tokens_per_second": round(tokens / compiled, 2),
                "compiled_vs_eager": round(eager / compiled, 3),
                "compile_seconds": round(first["compiled"] - compiled, 1),
                "agreement_with_eager": agreement(outputs["compiled"], outputs["eager"], []),
                "seconds": seconds,
            }
        )
    report = {
        "benchmark": "compiled decode step vs eager",
        "command": "python " + " ".join([str(Path(__file__).relative_to(ROOT))] + (argv or sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(argparse.Namespace(threads=args.threads, device=args.device)),
        "load_average": list(__import__("os").getloadavg()),
        "shape": args.shape,
        "dtype": args.dtype,
        "documents": len(docs),
        "source_tokens": sorted(len(d["ids"]) for d in docs),
        "max_new_tokens": args.max_new_tokens,
        "results": rows,
    }
    out = (
        args.out
        or ROOT / "benchmarks" / "results" / f"{args.device.split(':')[0]}-mt5-{args.shape}-compiled-decode.json"
    )
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\n{report['command']}\n{report['machine']['cpu']}, {args.threads} thread(s), load {report['load_average']}")
    print(f"{'decoding':9s} {'eager tok/s':>12s} {'compiled tok/s':>15s} {'ratio':>6s} {'compile s':>10s}  same tokens")
    for r in rows:
        print(
            f"{r['decoding']:9s} {r['eager_tokens_per_second']:12.2f} {r['compiled_tokens_per_second']:15.2f} "
            f"{r['compiled_vs_eager']:6.2f} {r['compile_seconds']:10.1f}  {r['agreement_with_eager']['tokens']:.3f}"
        )
    print(f"[compiled-decode] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
