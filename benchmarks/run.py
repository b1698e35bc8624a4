"""Benchmark our engine against transformers and CTranslate2 on the same checkpoint and documents.

    python benchmarks/run.py --shape small --engines ours,transformers,ct2 --decoding greedy,beam4 \
        --docs 64 --repeats 3 --out benchmarks/results/cpu-mt5-small.json

Every engine loads once, in this process, and the engines then take turns: each repeat runs every
(decoding, engine) pair over all documents, in an order rotated from repeat to repeat, so that a machine
shared with other work slows them alike. Figures are medians over repeats; ratios are medians of the
per-repeat ratios. Peak memory is measured apart, one subprocess per engine (see `probe`).
Prints a table and writes a JSON results file; it never asserts a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import checkpoints  # noqa: E402
from benchmarks.engines import BASELINES, DECODINGS, Context, Decoding, build, expand  # noqa: E402
from model.cpu_isa import isa_caps  # noqa: E402

# Warm-up: every engine and decoding once on a few short documents, so that thread pools, allocators
# and oneDNN kernels are set up before anything is timed.
WARMUP_DOCS, WARMUP_TOKENS = 4, 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(checkpoints.SHAPES), default="small")
    p.add_argument(
        "--engines",
        default="ours,transformers,ct2",
        help="comma-separated engines or groups: ours, vocab, bnb, transformers, ct2, pipeline, or "
        "single names such as ours-fp32, ct2-int8, pipeline-ray (ours-fp32 is always included)",
    )
    p.add_argument("--decoding", default="greedy,beam4", help=f"comma-separated: {', '.join(DECODINGS)}")
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--to-cap",
        action="store_true",
        help="every output runs to --max-new-tokens (EOS forbidden before it, in every engine): the same number of "
        "steps for each, whatever their numerics make of a random model",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for every engine")
    p.add_argument("--no-memory", action="store_true", help="skip the per-engine peak-memory subprocesses")
    p.add_argument(
        "--memory-only",
        nargs="+",
        type=Path,
        metavar="RESULTS",
        help="only measure peak memory, and add it to the rows of these earlier results files",
    )
    p.add_argument("--out", type=Path, help="results JSON (a table is printed either way)")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: measure one engine's peak memory
    return p.parse_args(argv)


def setup(args) -> tuple[Context, list[dict], list[Decoding]]:
    from model import MT5Tokenizer

    torch.set_num_threads(args.threads)
    path = checkpoints.checkpoint(args.shape)
    tokenizer = MT5Tokenizer.from_pretrained(path)
    docs = checkpoints.documents(args.docs, tokenizer)
    # Batches of similar length, longest first (what the pipeline's length bucketing does within a window).
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]["ids"]))
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    ctx = Context(args.shape, path, args.device, args.threads, batches, args.batch_size)
    decodings = []
    for name in args.decoding.split(","):
        if name not in DECODINGS:
            raise SystemExit(f"unknown decoding {name!r}; use {', '.join(DECODINGS)}")
        cap = args.max_new_tokens
        decodings.append(
            dataclasses.replace(DECODINGS[name], max_new_tokens=cap, min_new_tokens=cap if args.to_cap else 0)
        )
    return ctx, docs, decodings


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def probe(args) -> None:
    """In a subprocess of its own: load one engine, run its longest batch once per decoding, print peak RSS."""
    ctx, docs, decodings = setup(args)
    if args.probe == "pipeline-ray":  # its replica is another process, which Ray starts
        print(json.dumps({"engine": args.probe}))
        return
    ctx.batches = ctx.batches[:1]  # the longest documents: peak memory does not grow with more batches
    docs_in_batch = [docs[i] for i in ctx.batches[0]]
    out = {"engine": args.probe, "baseline_rss_mib": round(rss_mib())}
    engine = build(args.probe, ctx, {})
    out["loaded_rss_mib"] = round(rss_mib())
    for d in decodings:
        if engine.output == "text":
            ctx.batches = [list(range(len(docs_in_batch)))]
            engine.run(docs_in_batch, d)
        else:
            engine.run(docs, d)
        out[f"peak_rss_mib_{d.name}"] = round(peak_rss_mib())
        device_bytes = engine.peak_device_bytes()
        if device_bytes is not None:
            out[f"peak_device_mib_{d.name}"] = round(device_bytes / 2**20)
    print(json.dumps(out))


def measure_memory(args, engines: list[str]) -> dict[str, dict]:
    results = {}
    for name in engines:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--probe",
            name,
            "--shape",
            args.shape,
            "--decoding",
            args.decoding,
            "--docs",
            str(args.docs),
            "--batch-size",
            str(args.batch_size),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
            *(["--to-cap"] if args.to_cap else []),
        ]
        print(f"[bench] peak memory of {name} (subprocess)", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def add_memory(args, engines: list[str]) -> None:
    """Peak memory for engines timed by earlier runs: the matching rows of each file gain peak_rss_mib."""
    memory = measure_memory(args, engines)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    for path in args.memory_only:
        if not path.exists():
            print(f"[bench] {path} does not exist: skipped", file=sys.stderr)
            continue
        report = json.loads(path.read_text(encoding="utf-8"))
        for row in report["results"]:
            mem = memory.get(row["engine"], {})
            if f"peak_rss_mib_{row['decoding']}" in mem:
                row["peak_rss_mib"] = mem[f"peak_rss_mib_{row['decoding']}"]
                row["loaded_rss_mib"] = mem["loaded_rss_mib"]
            if f"peak_device_mib_{row['decoding']}" in mem:
                row["peak_device_mib"] = mem[f"peak_device_mib_{row['decoding']}"]
        report["memory_command"] = command
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print_table(report)


def generated_count(output, reference_ids, reference_text, tokenizer) -> int:
    """Tokens an engine generated for one document, EOS included. Text outputs (the pipelines) are counted
    as the reference's tokens when the text is the reference's, else by re-tokenizing the text."""
    if isinstance(output, list):
        return len(output)
    if output == reference_text:
        return len(reference_ids)
    return len(tokenizer.encode(output or ""))


def agreement(outputs, reference_ids, reference_texts) -> dict:
    """Fraction of documents whose output is identical to the reference's, and (for ids) of identical
    tokens: matches at the same position over the longer of the two lengths."""
    if outputs and isinstance(outputs[0], list):
        same = sum(o == r for o, r in zip(outputs, reference_ids))
        matched = sum(sum(a == b for a, b in zip(o, r)) for o, r in zip(outputs, reference_ids))
        total = sum(max(len(o), len(r)) for o, r in zip(outputs, reference_ids))
        return {"sequences": same / len(outputs), "tokens": matched / max(total, 1)}
    same = sum(o == r for o, r in zip(outputs, reference_texts))
    return {"sequences": same / len(outputs), "tokens": None}


def transparent_hugepage() -> str | None:
    """The kernel's THP mode, the bracketed word of /sys/kernel/mm/transparent_hugepage/enabled."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def machine(args) -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    out = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": args.threads,
        "simd": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "transparent_hugepage": transparent_hugepage(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # the caps that held the libraries below the CPU (model/cpu_isa.py ISA_CAP_VARIABLES)
        "isa_caps": isa_caps() or None,
    }
    for package in ("transformers", "ctranslate2", "bitsandbytes", "ray"):
        try:
            out[package] = __import__(package).__version__
        except ImportError:
            pass
    if args.device.startswith("cuda") and torch.cuda.is_available():
        out["accelerator"] = torch.cuda.get_device_name(torch.device(args.device))
    else:
        out["accelerator"] = None
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.probe:
        probe(args)
        return
    started = datetime.datetime.now(datetime.timezone.utc)
    load_at_start = os.getloadavg()
    engines = expand(args.engines.split(","), args.device)
    if args.memory_only:
        add_memory(args, engines)
        return
    ctx, docs, decodings = setup(args)
    from model import MT5Tokenizer

    tokenizer = MT5Tokenizer.from_pretrained(ctx.checkpoint)
    lengths = sorted(len(d["ids"]) for d in docs)
    print(
        f"[bench] mt5-{args.shape}, {len(docs)} documents of {lengths[0]}-{lengths[-1]} tokens "
        f"(median {statistics.median(lengths)}), batches of {args.batch_size}, engines {', '.join(engines)}",
        file=sys.stderr,
        flush=True,
    )

    loaded, load_seconds = {}, {}
    for name in engines:
        start = time.perf_counter()
        loaded[name] = build(name, ctx, loaded)
        load_seconds[name] = time.perf_counter() - start
        print(
            f"[bench] loaded {name} in {load_seconds[name]:.1f}s (RSS {rss_mib():.0f} MiB)", file=sys.stderr, flush=True
        )

    warm_ctx_batches = ctx.batches
    warm_docs = sorted(docs, key=lambda d: len(d["ids"]))[:WARMUP_DOCS]
    ctx.batches = [list(range(len(warm_docs)))]
    for d in decodings:
        warm = Decoding(d.name, d.num_beams, WARMUP_TOKENS, d.no_repeat_ngram_size, d.length_penalty, d.early_stopping)
        for name in engines:
            loaded[name].run(warm_docs, warm)
    ctx.batches = warm_ctx_batches
    startup = [loaded["pipeline-ray"].measure_startup()] if "pipeline-ray" in loaded else []

    seconds = {(e, d.name): [] for e in engines for d in decodings}
    # CPU time of this process (all its threads, CTranslate2's included): on a machine shared with other
    # jobs, wall time also counts the time the engine waited for a core; CPU time mostly does not.
    cpu_seconds = {(e, d.name): [] for e in engines for d in decodings}
    outputs: dict[tuple[str, str], list] = {}
    nondeterministic = set()
    for r in range(args.repeats):
        order = engines[r % len(engines) :] + engines[: r % len(engines)]
        for d in decodings:
            for name in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                out = loaded[name].run(docs, d)
                elapsed = time.perf_counter() - start
                seconds[(name, d.name)].append(elapsed)
                cpu_seconds[(name, d.name)].append(time.process_time() - start_cpu)
                if (name, d.name) in outputs and outputs[(name, d.name)] != out:
                    nondeterministic.add((name, d.name))
                outputs.setdefault((name, d.name), out)
                print(
                    f"[bench] repeat {r + 1}/{args.repeats} {d.name:7s} {name:32s} {elapsed:7.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
        if "pipeline-ray" in loaded:
            startup.append(loaded["pipeline-ray"].measure_startup())
    del loaded

    memory = {} if args.no_memory else measure_memory(args, engines)
    results = summarize(
        args,
        engines,
        decodings,
        docs,
        outputs,
        (seconds, cpu_seconds),
        load_seconds,
        memory,
        nondeterministic,
        startup,
        tokenizer,
    )
    report = {
        "benchmark": "lakesum generate vs transformers vs CTranslate2",
        # the script run (a wrapper such as before_after_issue15.py calls this main)
        "command": " ".join(
            [isa_caps(), "python", os.path.relpath(__file__ if argv is not None else sys.argv[0], ROOT)]
            + (argv if argv is not None else sys.argv[1:])
        ).lstrip(),
        "date": started.isoformat(timespec="seconds"),
        # other jobs on a shared machine: the 1-minute load average when the run started and ended
        "machine": {**machine(args), "load_average": [round(load_at_start[0], 2), round(os.getloadavg()[0], 2)]},
        "setup": {
            "shape": args.shape,
            "shape_config": checkpoints.SHAPES[args.shape],
            "device": args.device,
            "documents": len(docs),
            "input_tokens": {
                "min": lengths[0],
                "median": statistics.median(lengths),
                "max": lengths[-1],
                "total": sum(lengths),
            },
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "decodings": {d.name: d.hf_settings() for d in decodings},
            "baselines": dict(
                zip(("transformers", "ctranslate2"), BASELINES["cuda" if args.device.startswith("cuda") else "cpu"])
            ),
            "pipeline_ray_startup_seconds": [round(s, 2) for s in startup],
        },
        "results": results,
    }
    print_table(report)
    write_report(report, args.out, "bench")


def write_report(report: dict, out: Path | None, tag: str) -> None:
    """The results file, when asked for (also quality.py's)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"[{tag}] wrote {out}", file=sys.stderr)


def cpu_timings_report(
    benchmark: str,
    script: str,
    argv: list[str] | None,
    threads: int,
    started,
    load_before: float,
    setup: dict,
    results: list[dict],
    first: str,
    columns: list[str],
    decimals: int,
) -> dict:
    """A CPU micro-benchmark's report (head_layouts.py, encode_groups.py): its command, machine, load and `results`,
    each a row keyed by `first` with one median per column, also printed as a Markdown table."""
    report = {
        "benchmark": benchmark,
        "command": "python " + " ".join([os.path.relpath(script, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(argparse.Namespace(threads=threads, device="cpu")),
        "setup": setup,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }
    print(
        f"{report['machine']['cpu']}, {threads} thread(s), torch {torch.__version__}, load average "
        f"{report['load_average'][0]} -> {report['load_average'][1]}; {benchmark}"
    )
    print(f"| {first} | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for row in results:
        print(f"| {row[first]} | " + " | ".join(f"{row[name]:.{decimals}f}" for name in columns) + " |")
    return report


def summarize(
    args, engines, decodings, docs, outputs, timings, load_seconds, memory, nondeterministic, startup, tokenizer
) -> list[dict]:
    """The results' rows; timings: (wall seconds, CPU seconds), each a list per (engine, decoding)."""
    seconds, cpu_seconds = timings
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    hf_ref, ct2_ref = BASELINES[kind]
    results = []
    for d in decodings:
        ref_ids = outputs[("ours-fp32", d.name)]
        ref_texts = tokenizer.batch_decode(ref_ids, skip_special_tokens=True)
        tokens = {
            e: sum(generated_count(o, r, t, tokenizer) for o, r, t in zip(outputs[(e, d.name)], ref_ids, ref_texts))
            for e in engines
        }
        # tokens/s per repeat, so that ratios compare engines that ran side by side
        rates = {e: [tokens[e] / s for s in seconds[(e, d.name)]] for e in engines}
        cpu_rates = {e: [tokens[e] / s for s in cpu_seconds[(e, d.name)]] for e in engines}
        for e in engines:
            times = seconds[(e, d.name)]
            row = {
                "engine": e,
                "decoding": d.name,
                "seconds": [round(s, 3) for s in times],
                "median_seconds": round(statistics.median(times), 3),
                "docs_per_second": round(len(docs) / statistics.median(times), 3),
                "generated_tokens": tokens[e],
                "tokens_per_second": round(statistics.median(rates[e]), 2),
                "cpu_seconds": [round(s, 3) for s in cpu_seconds[(e, d.name)]],
                "tokens_per_cpu_second": round(statistics.median(cpu_rates[e]), 2),
                "load_seconds": round(load_seconds[e], 2),
            }
            for label, ref in (("vs_transformers", hf_ref), ("vs_ct2", ct2_ref), ("vs_ours_fp32", "ours-fp32")):
                if ref in rates:
                    row[label] = round(statistics.median(a / b for a, b in zip(rates[e], rates[ref])), 3)
                    row[label + "_cpu_time"] = round(
                        statistics.median(a / b for a, b in zip(cpu_rates[e], cpu_rates[ref])), 3
                    )
            if e.startswith("pipeline"):  # end-to-end vs engine-only is a question of documents per second
                row["docs_per_second_vs_ours_fp32"] = round(
                    statistics.median(a / b for a, b in zip(seconds[("ours-fp32", d.name)], times)), 3
                )
            if e == "pipeline-ray" and startup:
                steady = statistics.median(times) - statistics.median(startup)
                row["docs_per_second_without_startup"] = round(len(docs) / steady, 3)
            row["agreement_with_ours_fp32"] = agreement(outputs[(e, d.name)], ref_ids, ref_texts)
            if hf_ref in rates and e == "ours-fp32":
                row["identical_to_transformers"] = outputs[(e, d.name)] == outputs[(hf_ref, d.name)]
            if (e, d.name) in nondeterministic:
                row["nondeterministic"] = True
            mem = memory.get(e, {})
            if f"peak_rss_mib_{d.name}" in mem:
                row["peak_rss_mib"] = mem[f"peak_rss_mib_{d.name}"]
                row["loaded_rss_mib"] = mem["loaded_rss_mib"]
            if f"peak_device_mib_{d.name}" in mem:
                row["peak_device_mib"] = mem[f"peak_device_mib_{d.name}"]
            results.append(row)
    return results


def print_table(report: dict) -> None:
    ref_hf, ref_ct2 = report["setup"]["baselines"].values()
    width = max(len(r["engine"]) for r in report["results"])
    head = (
        f"{'decoding':8s} {'engine':{width}s} {'docs/s':>7s} {'tok/s':>7s} {'tokens':>6s} "
        f"{'x ' + ref_hf:>20s} {'x ' + ref_ct2:>11s} {'x ours':>6s} {'same seq':>8s} {'same tok':>8s} "
        f"{'peak MiB':>8s} {'x ' + ref_ct2 + ' (CPU time)':>22s}"
    )
    print(
        f"\n{report['command']}\n{report['machine']['cpu']}, {report['machine']['threads']} threads, "
        f"torch {report['machine']['torch']}, {report['date']}"
    )
    print(head)
    print("-" * len(head))
    for row in report["results"]:
        agree = row["agreement_with_ours_fp32"]
        tok = "" if agree["tokens"] is None else f"{agree['tokens']:.3f}"
        print(
            f"{row['decoding']:8s} {row['engine']:{width}s} {row['docs_per_second']:7.2f} "
            f"{row['tokens_per_second']:7.1f} "
            f"{row['generated_tokens']:6d} {row.get('vs_transformers', float('nan')):20.2f} "
            f"{row.get('vs_ct2', float('nan')):11.2f} {row.get('vs_ours_fp32', float('nan')):6.2f} "
            f"{agree['sequences']:8.3f} {tok:>8s} "
            f"{row.get('peak_rss_mib', ''):>8} {row.get('vs_ct2_cpu_time', float('nan')):22.2f}"
        )
    notes = [
        f"{r['decoding']} ours-fp32 token-identical to {ref_hf}: {r['identical_to_transformers']}"
        for r in report["results"]
        if "identical_to_transformers" in r
    ]
    notes += [
        f"{r['decoding']} {r['engine']}: end-to-end docs/s = {r['docs_per_second_vs_ours_fp32']:.2f} x ours-fp32"
        + (
            f" ({r['docs_per_second_without_startup']:.2f} docs/s without replica start)"
            if "docs_per_second_without_startup" in r
            else ""
        )
        for r in report["results"]
        if "docs_per_second_vs_ours_fp32" in r
    ]
    notes += [
        f"{r['decoding']} {r['engine']}: outputs differ between repeats"
        for r in report["results"]
        if r.get("nondeterministic")
    ]
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
