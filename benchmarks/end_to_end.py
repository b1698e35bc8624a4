"""The whole job against what a user would build instead: Parquet in, Parquet out, the same documents and checkpoint.

    .venv/bin/python benchmarks/end_to_end.py --rounds 2 --out benchmarks/results/end-to-end-cpu.json

Settings (--settings), each run as a fresh process, alternated round by round (a, b, c, a, b, c, ...):

  ray-data-transformers   (a) ray.data.read_parquet -> map_batches(transformers MT5ForConditionalGeneration.generate
                              in an ActorPoolStrategy) -> write_parquet
  ray-data-ct2-int8       (b) the same with a CTranslate2 int8 Translator in the actors (the checkpoint converted once,
                              before any run, with ct2-transformers-converter's --quantization int8; timed apart)
  lakesum-fp32            (c) `python jobs/summarize.py` on a local Ray (RAY_ADDRESS=local), as the README runs it
  lakesum-int8-dynamic    (c) the same with --quantization int8-dynamic
  lakesum-int8-dynamic-b2x    ... and --batch-size twice --batch-size

The documents: Django's translations (synthetic/real_text.py, 99 languages, every script Django ships) cut into
--chars characters (benchmarks/tokenizer_speed.py's corpus), --docs of them drawn at random, in --files Parquet files.
The tokenizer: a 32k-piece unigram model trained on those translations in mT5's layout (tokenizer_speed.spiece_dir).
The model: mt5-small's shape with random weights (benchmarks/checkpoints.py), which is what speed depends on; its
generation_config.json gets min_new_tokens = max_new_tokens, which every engine honours (transformers and our job
read it, CTranslate2 gets min_decoding_length), so every summary runs to the cap and the engines do the same work
whatever quantization does to the logits; output tokens per document are reported for each setting to show it
(generated tokens other than pad, as the job counts them: random weights emit the pad id now and then).
transformers' fast tokenizer is converted from spiece.model once and saved in the folder (tokenizer.json, as hub
checkpoints ship it); it gives the job's ids on these documents, so the float32 settings do the same work.

Start-up is everything before the first output can begin: the process and its imports, Ray's start, planning, the
actors or replicas placed and their models loaded. For the Ray Data settings its end is the first batch's start in
an actor (each batch records its start and end in wall-clock seconds); for jobs/summarize.py it is the driver's
`placed` log line (replicas placed and loaded; units are handed out right after), its log lines timed as they
arrive. Without start-up: documents / (process exit - that moment), writing and Ray's shutdown included for all.

Ray Data on a small node: each actor asks num_cpus = --threads and Ray is started with replicas x threads + 1 CPUs,
so that read_parquet's and write_parquet's tasks keep a CPU slot beside the actor pool (with Ray's default, one
slot a core, a 2-core node with 2 one-CPU actors has none left for the read tasks, and the pipeline stalls).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "benchmarks" / ".cache" / "end-to-end"

SETTINGS = {
    "ray-data-transformers": ("ray-data", "transformers", []),
    "ray-data-ct2-int8": ("ray-data", "ct2-int8", []),
    "lakesum-fp32": ("lakesum", None, []),
    "lakesum-int8-dynamic": ("lakesum", None, ["--quantization", "int8-dynamic"]),
    "lakesum-int8-dynamic-b2x": ("lakesum", None, ["--quantization", "int8-dynamic", "batch-size-2x"]),
}
DEFAULT_SETTINGS = "ray-data-transformers,ray-data-ct2-int8,lakesum-fp32,lakesum-int8-dynamic"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--docs", type=int, default=96)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--chars", type=int, default=800, help="documents are cut to this many characters")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-input-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="model threads per actor / replica")
    p.add_argument("--replicas", type=int, default=2, help="actors in the pool / --replicas of the job")
    p.add_argument("--batch-size", type=int, default=16, help="map_batches' batch_size / the job's --batch-size")
    p.add_argument("--rounds", type=int, default=1, help="each setting runs once a round, in turn")
    p.add_argument(
        "--model",
        type=Path,
        help="a checkpoint directory (spiece.model included); default: mt5-small's shape, random weights, with "
        "the Django-trained tokenizer",
    )
    p.add_argument("--out", type=Path, help="results JSON")
    p.add_argument("--work", type=Path, default=CACHE, help="where the model folders, input and outputs go")
    p.add_argument("--keep", action="store_true", help="keep each run's input and outputs under --work")
    p.add_argument("--worker", choices=["transformers", "ct2-int8"], help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ct2", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Preparation (not timed): documents, checkpoint folder, tokenizer.json, CTranslate2 conversion


def build_documents(count: int, chars: int, seed: int = 15) -> list[dict]:
    """`count` pieces of Django's translations of `chars` characters (the last piece of a language is shorter)."""
    from benchmarks.tokenizer_speed import corpus

    pool = [(family, text) for family, texts in corpus(chars).items() for text in texts if text.strip()]
    if count > len(pool):
        raise SystemExit(f"--docs {count}: the corpus cut to {chars} characters has only {len(pool)} documents")
    picked = random.Random(seed).sample(pool, count)
    return [{"id": f"doc-{i:05d}", "script": family, "text": text} for i, (family, text) in enumerate(picked)]


def write_input(folder: Path, docs: list[dict], files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    per_file = -(-len(docs) // files)
    for n in range(files):
        part = docs[n * per_file : (n + 1) * per_file]
        if part:
            pq.write_table(pa.Table.from_pylist(part), folder / f"part-{n:03d}.parquet")


def model_folder(work: Path, source: Path | None, max_new_tokens: int) -> Path:
    """A checkpoint folder whose weights link to `source`'s, with min_new_tokens = max_new_tokens in its
    generation_config.json and transformers' fast tokenizer saved (tokenizer.json, as hub checkpoints ship it)."""
    if source is None:
        from benchmarks.checkpoints import checkpoint
        from benchmarks.tokenizer_speed import spiece_dir

        weights, spiece = checkpoint("small"), spiece_dir(32000) / "spiece.model"
        name = "mt5-small-django"
    else:
        weights, spiece = source.resolve(), source.resolve() / "spiece.model"
        name = f"{source.resolve().name}-{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]}"
    folder = work / f"{name}-min{max_new_tokens}"
    if (folder / ".complete").exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for file in ("config.json", "model.safetensors"):
        (folder / file).symlink_to(weights / file)
    shutil.copy(spiece, folder / "spiece.model")
    generation = json.loads((weights / "generation_config.json").read_text())
    generation.update(min_new_tokens=max_new_tokens, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    generation.pop("no_repeat_ngram_size", None)
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    from transformers import AutoTokenizer

    # converted from spiece.model as transformers does for a checkpoint without tokenizer.json (the same ids as
    # ours on these documents), and saved, so that the actors load it rather than convert it each time
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    (folder / ".complete").write_text("")
    return folder


def ct2_folder(model: Path) -> tuple[Path, float | None]:
    """The checkpoint converted for CTranslate2 with int8 weights, once; the seconds it took when done now."""
    folder = model.with_name(model.name + "-ct2-int8")
    if (folder / ".complete").exists():
        return folder, None
    import ctranslate2

    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    ctranslate2.converters.TransformersConverter(str(model)).convert(str(folder), quantization="int8")
    seconds = time.perf_counter() - start
    (folder / ".complete").write_text(json.dumps({"seconds": seconds}))
    return folder, seconds


# ---------------------------------------------------------------------------------------------------------------
# (a) and (b): Ray Data as a user writes it. Runs in its own process (--worker).


class TransformersSummarizer:
    """An actor of the pool: one transformers model, batches of texts in, summaries out."""

    def __init__(self, model: str, threads: int, max_input_tokens: int, max_new_tokens: int):
        started = time.time()
        import torch
        from transformers import AutoTokenizer, MT5ForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = MT5ForConditionalGeneration.from_pretrained(model).eval()
        self.max_input_tokens, self.max_new_tokens = max_input_tokens, max_new_tokens
        self.load = (started, time.time())

    def generate(self, texts: list[str]) -> list[list[int]]:
        encoded = self.tokenizer(
            texts, truncation=True, max_length=self.max_input_tokens, padding=True, return_tensors="pt"
        )
        with self.torch.inference_mode():
            out = self.model.generate(
                **encoded, max_new_tokens=self.max_new_tokens, min_new_tokens=self.max_new_tokens, num_beams=1
            )
        return [row[1:] for row in out.tolist()]  # the decoder start token dropped

    def __call__(self, batch: dict) -> dict:
        started = time.time()
        ids = self.generate(list(batch["text"]))
        ids = [[t for t in row if t != self.tokenizer.pad_token_id] for row in ids]
        batch["summary"] = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return timed(batch, ids, self.load, started)


class CTranslate2Summarizer(TransformersSummarizer):
    """The same actor with a CTranslate2 int8 Translator: tokens in, tokens out, transformers' tokenizer."""

    def __init__(self, model: str, ct2: str, threads: int, max_input_tokens: int, max_new_tokens: int):
        started = time.time()
        import ctranslate2
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.translator = ctranslate2.Translator(
            ct2, device="cpu", compute_type="int8", intra_threads=threads, inter_threads=1
        )
        self.max_input_tokens, self.max_new_tokens = max_input_tokens, max_new_tokens
        self.load = (started, time.time())

    def generate(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_input_tokens).input_ids
        results = self.translator.translate_batch(
            [self.tokenizer.convert_ids_to_tokens(row) for row in ids],
            beam_size=1,
            max_decoding_length=self.max_new_tokens,
            min_decoding_length=self.max_new_tokens,
            return_end_token=True,
        )
        return [self.tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]


def timed(batch: dict, ids: list[list[int]], load: tuple[float, float], started: float) -> dict:
    """The batch with its output token counts and the actor's load and this batch's times (wall-clock seconds)."""
    rows = len(ids)
    batch["output_tokens"] = [len(row) for row in ids]
    batch["_load_started"], batch["_load_ended"] = [load[0]] * rows, [load[1]] * rows
    batch["_started"], batch["_ended"] = [started] * rows, [time.time()] * rows
    batch["_pid"] = [os.getpid()] * rows
    return batch


def ray_data_worker(args) -> None:
    marks = {"process": float(os.environ.get("E2E_SPAWNED", time.time()))}
    import ray

    marks["imported"] = time.time()
    ray.init(
        address="local",
        num_cpus=args.replicas * args.threads + 1,  # one slot beyond the pool's for read and write tasks
        include_dashboard=False,
        logging_level="error",
        log_to_driver=False,
    )
    marks["ray_started"] = time.time()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    common = dict(threads=args.threads, max_input_tokens=args.max_input_tokens, max_new_tokens=args.max_new_tokens)
    if args.worker == "transformers":
        actor, kwargs = TransformersSummarizer, dict(model=str(args.model), **common)
    else:
        actor, kwargs = CTranslate2Summarizer, dict(model=str(args.model), ct2=str(args.ct2), **common)
    ds = ray.data.read_parquet(str(args.input))
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=args.replicas),
        batch_size=args.batch_size,
        num_cpus=args.threads,
    )
    ds = ds.drop_columns(["text"])
    marks["planned"] = time.time()
    ds.write_parquet(str(args.output))
    marks["written"] = time.time()
    ray.shutdown()
    marks["ray_shut_down"] = time.time()
    print("E2E_MARKS " + json.dumps(marks), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Running one setting as a fresh process, and reading what it did


def run_setting(name: str, args, model: Path, ct2: Path | None, input_dir: Path, output: Path) -> dict:
    kind, engine, flags = SETTINGS[name]
    if output.exists():
        shutil.rmtree(output)
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    if kind == "ray-data":
        command = [sys.executable, __file__, "--worker", engine, "--model", str(model), "--input", str(input_dir)]
        command += ["--output", str(output), "--replicas", str(args.replicas), "--threads", str(args.threads)]
        command += ["--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens)]
        command += ["--max-input-tokens", str(args.max_input_tokens)]
        if ct2:
            command += ["--ct2", str(ct2)]
    else:
        batch = 2 * args.batch_size if "batch-size-2x" in flags else args.batch_size
        command = [sys.executable, str(ROOT / "jobs" / "summarize.py"), "--model", str(model)]
        command += ["--input", str(input_dir), "--output", str(output), "--replicas", str(args.replicas)]
        command += ["--cpus-per-replica", str(args.threads), "--device", "cpu", "--num-beams", "1"]
        command += ["--max-new-tokens", str(args.max_new_tokens), "--max-input-tokens", str(args.max_input_tokens)]
        command += ["--no-repeat-ngram-size", "0", "--batch-size", str(batch), "--log-format", "json"]
        command += [f for f in flags if f != "batch-size-2x"]
    start = time.time()
    env["E2E_SPAWNED"] = repr(start)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: list[tuple[float, dict]] = []
    stderr_tail: list[str] = []
    for line in process.stderr:  # the job's log lines, timed as they arrive
        now = time.time()
        try:
            event = json.loads(line)
        except ValueError:
            stderr_tail = (stderr_tail + [line])[-40:]
            continue
        if isinstance(event, dict) and "event" in event:
            events.append((now, event))
    stdout = process.stdout.read()
    process.wait()
    end = time.time()
    if process.returncode != 0:
        raise RuntimeError(f"{name} exited {process.returncode}:\n{''.join(stderr_tail)}\n{stdout[-2000:]}")
    result = {"setting": name, "command": command, "seconds": end - start}
    if kind == "ray-data":
        marks = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("E2E_MARKS "))[10:])
        result.update(ray_data_timeline(marks, output, start, end))
    else:
        result.update(lakesum_timeline(events, output, model, start, end))
    result["docs_per_second"] = args.docs / result["seconds"]
    result["docs_per_second_without_startup"] = args.docs / (result["seconds"] - result["startup_seconds"])
    return result


def read_output(output: Path):
    import pyarrow.dataset as ds

    return ds.dataset(str(output), format="parquet", exclude_invalid_files=True).to_table()


def ray_data_timeline(marks: dict, output: Path, start: float, end: float) -> dict:
    table = read_output(output).to_pydict()
    first = min(table["_started"])
    loads = sorted({(pid, s, e) for pid, s, e in zip(table["_pid"], table["_load_started"], table["_load_ended"])})
    phases = {
        "python and imports": marks["imported"] - start,
        "ray start": marks["ray_started"] - marks["imported"],
        "dataset planned": marks["planned"] - marks["ray_started"],
        "actors start and load (to the first batch)": first - marks["planned"],
        "generate (first batch start to last batch end)": max(table["_ended"]) - first,
        "write and drain": marks["written"] - max(table["_ended"]),
        "ray shutdown and exit": end - marks["written"],
    }
    return {
        "startup_seconds": first - start,
        "phases": {k: round(v, 2) for k, v in phases.items()},
        "model_load_seconds": [round(e - s, 2) for _, s, e in loads],
        "batches": len(set(zip(table["_pid"], table["_started"]))),
        "summaries": dict(zip(table["id"], table["summary"])),
        "output_tokens": dict(zip(table["id"], table["output_tokens"])),
    }


def lakesum_timeline(events: list[tuple[float, dict]], output: Path, model: Path, start: float, end: float) -> dict:
    from model import MT5Tokenizer

    times = {}
    for at, event in events:
        times.setdefault(event["event"], at)  # the first line of each kind
    placed = times.get("placed")
    if placed is None:
        raise RuntimeError(f"no 'placed' line among the job's events: {sorted(times)}")
    report = json.loads((output / "_lakesum" / "report.json").read_text())
    table = read_output(output).to_pydict()
    # The job writes text; its token count is the summary encoded again (without the </s> the tokenizer adds),
    # which is the number of generated pieces whenever decode -> encode round-trips (it does on this tokenizer's
    # pieces, apart from merges across piece boundaries, which are rare).
    tokenizer = MT5Tokenizer.from_pretrained(model)
    counts = {i: len(tokenizer.encode(s)) - 1 for i, s in zip(table["id"], table["summary"])}
    stats = report["stats"]
    ordered = sorted((at, name) for name, at in times.items())
    phases, previous = {}, start
    for at, name in ordered:
        if at > placed:
            break
        phases[f"to the '{name}' line"] = at - previous
        previous = at
    phases["summarize and commit (placed to exit)"] = end - placed
    return {
        "startup_seconds": placed - start,
        "phases": {k: round(v, 2) for k, v in phases.items()},
        "events": [{"event": e["event"], "at": round(at - start, 2)} for at, e in events],
        "report": {k: v for k, v in report.items() if k != "settings"},
        "summaries": dict(zip(table["id"], table["summary"])),
        "output_tokens": counts,
        "output_tokens_per_doc": stats["output_tokens"] / max(stats["rows"], 1),  # what the model generated
    }


# ---------------------------------------------------------------------------------------------------------------


def machine(args) -> dict:
    import platform

    from benchmarks.run import machine as run_machine

    out = run_machine(argparse.Namespace(threads=args.threads, device="cpu"))
    out["load_average_at_start"] = os.getloadavg()
    out["platform"] = platform.platform()
    return out


def summarize_runs(names: list[str], runs: list[dict], args) -> list[dict]:
    rows = []
    for name in names:
        mine = [r for r in runs if r["setting"] == name]
        if not mine:
            continue
        tokens = [t for r in mine for t in r["output_tokens"].values()]
        row = {
            "setting": name,
            "runs": len(mine),
            "seconds": [round(r["seconds"], 2) for r in mine],
            "startup_seconds": [round(r["startup_seconds"], 2) for r in mine],
            "median_seconds": round(statistics.median(r["seconds"] for r in mine), 2),
            "median_startup_seconds": round(statistics.median(r["startup_seconds"] for r in mine), 2),
            "docs_per_second": round(statistics.median(r["docs_per_second"] for r in mine), 3),
            "docs_per_second_without_startup": round(
                statistics.median(r["docs_per_second_without_startup"] for r in mine), 3
            ),
            "output_tokens_per_doc": {
                # the job's own count of generated tokens where it gives one; min and max from the re-encoded text
                "mean": round(
                    statistics.mean(
                        r.get("output_tokens_per_doc", statistics.mean(r["output_tokens"].values())) for r in mine
                    ),
                    2,
                ),
                "min": min(tokens),
                "max": max(tokens),
            },
            "documents_written": [len(r["summaries"]) for r in mine],
            "phases_first_run": mine[0]["phases"],
        }
        for key in ("model_load_seconds", "events", "report"):
            if key in mine[0]:
                row[f"{key}_first_run"] = mine[0][key]
        rows.append(row)
    return rows


def ratios(runs: list[dict], names: list[str]) -> dict:
    """Per round, each lakesum setting's docs/s over each Ray Data setting's (with and without start-up); medians."""
    out = {}
    rounds = sorted({r["round"] for r in runs})
    for ours in [n for n in names if n.startswith("lakesum")]:
        for peer in [n for n in names if n.startswith("ray-data")]:
            for key in ("docs_per_second", "docs_per_second_without_startup"):
                per_round = []
                for k in rounds:
                    a = [r for r in runs if r["round"] == k and r["setting"] == ours]
                    b = [r for r in runs if r["round"] == k and r["setting"] == peer]
                    if a and b:
                        per_round.append(a[0][key] / b[0][key])
                if per_round:
                    out[f"{ours} / {peer} ({key})"] = {
                        "median": round(statistics.median(per_round), 3),
                        "per_round": [round(x, 3) for x in per_round],
                    }
    return out


def agreement(runs: list[dict], names: list[str]) -> dict:
    """Fraction of documents whose summary equals the first setting's, from each setting's first run."""
    first = {r["setting"]: r["summaries"] for r in reversed(runs)}
    if not names or names[0] not in first:
        return {}
    reference = first[names[0]]
    return {
        f"{name} vs {names[0]}": round(sum(first[name].get(i) == s for i, s in reference.items()) / len(reference), 3)
        for name in names[1:]
        if name in first
    }


def print_table(report: dict) -> None:
    print(
        f"\n{report['documents']['count']} documents in {report['documents']['files']} files, "
        f"{report['settings']['max_new_tokens']} new tokens, {report['settings']['threads']} thread(s) x "
        f"{report['settings']['replicas']} replica(s); {report['machine']['cpu']}"
    )
    print(f"{'setting':28} {'seconds':>8} {'start-up':>9} {'docs/s':>8} {'w/o start-up':>13} {'tokens/doc':>11}")
    for row in report["rows"]:
        print(
            f"{row['setting']:28} {row['median_seconds']:8.1f} {row['median_startup_seconds']:9.1f} "
            f"{row['docs_per_second']:8.2f} {row['docs_per_second_without_startup']:13.2f} "
            f"{row['output_tokens_per_doc']['mean']:11.1f}"
        )
    for key, value in report["ratios"].items():
        print(f"  {key}: {value['median']:.2f}x  (per round {value['per_round']})")
    for key, value in report.get("skipped", {}).items():
        print(f"  skipped {key}: {value}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return ray_data_worker(args)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; use {', '.join(SETTINGS)}")
    skipped = {}
    if "ray-data-ct2-int8" in names:
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            names.remove("ray-data-ct2-int8")
            skipped["ray-data-ct2-int8"] = "ctranslate2 is not installed"
    load_at_start = os.getloadavg()
    model = model_folder(args.work, args.model, args.max_new_tokens)
    ct2, conversion_seconds = ct2_folder(model) if "ray-data-ct2-int8" in names else (None, None)
    if ct2 and conversion_seconds is None:
        conversion_seconds = json.loads((ct2 / ".complete").read_text() or "{}").get("seconds")
    docs = build_documents(args.docs, args.chars)
    work = args.work / f"run-{os.getpid()}"
    input_dir = work / "input"
    write_input(input_dir, docs, args.files)
    print(f"[e2e] {len(docs)} documents in {args.files} files under {input_dir}; model {model}", file=sys.stderr)
    runs = []
    try:
        for k in range(args.rounds):
            for name in names:
                result = run_setting(name, args, model, ct2, input_dir, work / f"out-{name}-{k}")
                result["round"] = k
                runs.append(result)
                print(
                    f"[e2e] round {k} {name}: {result['seconds']:.1f} s, start-up {result['startup_seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    lengths = [len(d["text"]) for d in docs]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(args), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "settings": {
            k: getattr(args, k)
            for k in (
                "docs",
                "files",
                "chars",
                "max_new_tokens",
                "max_input_tokens",
                "threads",
                "replicas",
                "batch_size",
                "rounds",
            )
        },
        "model": str(model),
        "ct2_conversion_seconds": None if conversion_seconds is None else round(conversion_seconds, 1),
        "documents": {
            "count": len(docs),
            "files": args.files,
            "characters": {"mean": round(statistics.mean(lengths)), "min": min(lengths), "max": max(lengths)},
            "scripts": {f: sum(d["script"] == f for d in docs) for f in sorted({d["script"] for d in docs})},
        },
        "rows": summarize_runs(names, runs, args),
        "ratios": ratios(runs, names),
        "agreement": agreement(runs, names),
        "skipped": skipped,
        "runs": [{k: v for k, v in r.items() if k not in ("summaries", "output_tokens")} for r in runs],
    }
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
