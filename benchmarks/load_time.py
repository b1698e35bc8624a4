"""Load time of a replica's model: load_for_inference on the mt5-small-shaped checkpoint, per quantization.

    .venv/bin/python benchmarks/load_time.py --quantization none int8-dynamic --repeats 3
    .venv/bin/python benchmarks/load_time.py --quantization int8-dynamic --profile 25

Each load runs in this process after one warm-up load (which also builds the checkpoint on first use), so the
checkpoint's pages are in the page cache and the figures are the CPU work of loading. Prints a table and writes
benchmarks/results/load-time-<cpu kind>.json with the machine (CPU, SIMD flags, load average at start and end).
--profile N prints the N largest cumulative entries of a cProfile of one more load of the last quantization.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model as ours  # noqa: E402
from benchmarks.checkpoints import checkpoint  # noqa: E402
from benchmarks.run import machine  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=("small", "base"))
    parser.add_argument("--quantization", nargs="+", default=["none", "int8-dynamic"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a replica's model threads)")
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def load(path: Path, quantization: str) -> float:
    start = time.perf_counter()
    model = ours.load_for_inference(path, quantization=quantization)
    seconds = time.perf_counter() - start
    del model
    return seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = checkpoint(args.shape)
    info = machine(argparse.Namespace(threads=args.threads, device="cpu"))
    info["load_average_at_start"] = os.getloadavg()
    rows = []
    for quantization in args.quantization:
        load(path, quantization)  # warm-up: page cache, lazy imports, kernels' first use
        seconds = [load(path, quantization) for _ in range(args.repeats)]
        rows.append(
            {
                "quantization": quantization,
                "seconds": [round(s, 2) for s in seconds],
                "median_seconds": round(statistics.median(seconds), 2),
            }
        )
        print(f"{quantization:<18} median {rows[-1]['median_seconds']:7.2f} s   runs {rows[-1]['seconds']}", flush=True)
    info["load_average_at_end"] = os.getloadavg()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(ours.load_for_inference, path, quantization=args.quantization[-1])
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    kind = "intel" if "Intel" in info["cpu"] else "amd" if "AMD" in info["cpu"] else "cpu"
    out = args.out or ROOT / "benchmarks" / "results" / f"load-time-{kind}-mt5-{args.shape}.json"
    command = "python benchmarks/load_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(json.dumps({"command": command, "machine": info, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
