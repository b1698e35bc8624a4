"""Start-up cost of the tokenizer: loading spiece.model, the first encode, and a tokenize-pool worker's share.

    .venv/bin/python benchmarks/tokenizer_load.py --baseline HEAD --out benchmarks/results/tokenizer-load.json

On the test fixture's spiece.model (synthetic/spiece.py: a unigram model padded to mT5's 250,000 pieces), for
model/tokenizer.py as it is ("ours") and, with --baseline, as it was at a git revision ("ours@REV"):
- load: MT5Tokenizer.from_pretrained (the driver's model_fingerprint, each replica);
- first encode: one short text just after loading (tables built on first use are paid here; the grapheme
  patterns, built once per process, are in the first repeat only: read the median);
- worker: what a tokenize-pool worker pays, unpickling the tokenizer it is sent and encoding that text;
- import: a fresh `python -c "import model.tokenizer"`, and whether that imported torch (a worker that imports
  torch pays seconds and hundreds of MiB).
Wall seconds, the best and the median of --repeats, in this process (model.checkpoint, which from_pretrained
reads through, is imported first and not counted). The machine's load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.tokenizer_speed import CACHE, tokenizer_at  # noqa: E402

TEXT = "The summary of a long report on the river, the lake and the city's water."


def fixture_dir() -> Path:
    """The tests' mT5-shaped spiece.model, built once."""
    from synthetic.spiece import build_spiece_model

    directory = CACHE / "fixture-250k"
    if not (directory / "spiece.model").exists():
        build_spiece_model(directory)
    return directory


def timed(work, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return times, result


def measure(cls, directory: Path, repeats: int) -> dict:
    load, tok = timed(lambda: cls.from_pretrained(directory), repeats)
    first = [timed(lambda: cls.from_pretrained(directory), 1)[1] for _ in range(repeats)]  # fresh tokenizers
    first_encode = [timed(lambda t=t: t.encode(TEXT), 1)[0][0] for t in first]
    tok.encode(TEXT)
    blob = pickle.dumps(tok)
    worker, _ = timed(lambda: pickle.loads(blob).encode(TEXT), repeats)
    return {
        "load_s": summary(load),
        "first_encode_s": summary(first_encode),
        "worker_unpickle_and_encode_s": summary(worker),
        "pickle_mb": round(len(blob) / 1e6, 2),
    }


def import_cost(revision: str | None, repeats: int) -> dict:
    """Seconds to import the tokenizer's module in a fresh process, and whether that imported torch."""
    if revision is None:
        load = "import model.tokenizer"
    else:  # git show runs inside the timing: a few ms
        load = f"from benchmarks.tokenizer_speed import tokenizer_at; tokenizer_at({revision!r})"
    code = "\n".join(
        [
            f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); start = time.perf_counter()",
            load,
            "print(time.perf_counter() - start, 'torch' in sys.modules)",
        ]
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
        for _ in range(repeats)
    ]
    seconds = [float(run.stdout.split()[0]) for run in runs]
    return {"import_s": summary(seconds), "imports_torch": runs[0].stdout.split()[1] == "True"}


def summary(times: list[float]) -> dict:
    return {"best": round(min(times), 4), "median": round(statistics.median(times), 4)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="a git revision whose model/tokenizer.py to measure too (e.g. HEAD)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import model.checkpoint  # noqa: F401  (from_pretrained's own import: not counted in its time)
    from model.tokenizer import MT5Tokenizer
    from tests.environment import cpu

    directory = fixture_dir()
    load_before = os.getloadavg()
    rows = {"ours": {**measure(MT5Tokenizer, directory, args.repeats), **import_cost(None, args.repeats)}}
    if args.baseline:
        baseline = tokenizer_at(args.baseline)
        rows[f"ours@{args.baseline}"] = {
            **measure(baseline, directory, args.repeats),
            **import_cost(args.baseline, args.repeats),
        }
    load_after = os.getloadavg()

    keys = ("load_s", "first_encode_s", "worker_unpickle_and_encode_s", "import_s")
    print(f"seconds, best/median of {args.repeats}")
    labels = ("load", "first encode", "worker", "import")
    print(f"{'tokenizer':<14}" + "".join(f" {label:>15}" for label in labels) + "  pickle MB  imports torch")
    for name, row in rows.items():
        cells = "".join(f"     {row[key]['best']:>5.3f}/{row[key]['median']:<5.3f}" for key in keys)
        print(f"{name:<14}{cells}  {row['pickle_mb']:>9}  {row['imports_torch']}")
    if args.out:
        model_name, flags = cpu()
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["benchmarks/tokenizer_load.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": {"cpu": model_name, "simd": flags, "cores": os.cpu_count(), "python": sys.version.split()[0]},
            "load_average": {"start": load_before, "end": load_after},
            "spiece_model": "synthetic/spiece.py build_spiece_model: 250,000 pieces",
            "results": rows,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
