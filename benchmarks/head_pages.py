"""What a fresh output costs the int8-dynamic head, with and without torch's transparent-huge-page allocation.

Each decode step's head returns a new [rows, 250k] float32 tensor. Up to 32 MiB (glibc's largest mmap threshold)
glibc serves it from memory freed the step before; beyond, from 33 rows on, it is mapped from the OS and returned
each step, and each first touch of a 4 KiB page faults. THP_MEM_ALLOC_ENABLE=1 makes torch's allocator ask for
2 MiB pages for tensors of 2 MiB or more: 512 times fewer faults. The setting is read at torch's first allocation, so
each setting runs in a process of its own; they alternate, `--repeats` times each.

    python benchmarks/head_pages.py --rows 16 64 --repeats 3 --out benchmarks/results/head-pages-intel.json

Prints a table and writes a results JSON; CPU milliseconds of this thread per call, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = 250112


def child(args) -> None:
    """One setting, in this process: the head's CPU ms and minor faults per call at each row count."""
    import torch
    from torch import nn

    from model.packed import int8_head_engine, repack_dynamic_int8
    from model.quantize import _dynamic_int8_layer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    linear = nn.Linear(args.d_model, VOCAB, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
    head = _dynamic_int8_layer(linear)
    engine = int8_head_engine(SimpleNamespace(config=SimpleNamespace(tie_word_embeddings=False)))
    if engine:
        repack_dynamic_int8(head, engine)  # as load_for_inference packs it on this CPU
    out = {}
    for rows in args.rows:
        x = torch.randn(rows, args.d_model)
        head(x).amax(-1)
        times, faults = [], resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(args.calls):
            start = time.thread_time()
            head(x).amax(-1)  # a consumer reads it, as the step's normalizer or argmax does
            times.append(time.thread_time() - start)
        faults = (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults) / args.calls
        out[rows] = {"ms": statistics.median(times) * 1e3, "faults": faults, "engine": engine or "fbgemm"}
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    from benchmarks.run import machine

    started, load = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), os.getloadavg()
    runs: dict[str, list] = {"1": [], "0": []}
    for _ in range(args.repeats):
        for thp in runs:
            command = [sys.executable, __file__, "--child", "--rows", *map(str, args.rows)]
            command += ["--d-model", str(args.d_model), "--calls", str(args.calls)]
            env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            runs[thp].append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = {
        thp: {
            rows: {key: statistics.median(r[str(rows)][key] for r in results) for key in ("ms", "faults")}
            for rows in args.rows
        }
        for thp, results in runs.items()
    }
    print(f"int8-dynamic head [rows, {args.d_model}] x [{args.d_model}, {VOCAB}], 1 thread, CPU ms per call (faults)")
    for rows in args.rows:
        on, off = table["1"][rows], table["0"][rows]
        print(
            f"rows {rows:3d}: THP {on['ms']:6.1f} ms ({on['faults']:6.0f})",
            f"  no THP {off['ms']:6.1f} ms ({off['faults']:6.0f})",
        )
    report = {
        "benchmark": "int8-dynamic head: a fresh output per call, with and without THP_MEM_ALLOC_ENABLE",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "date": started,
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg(),
        "machine": {k: v for k, v in machine(SimpleNamespace(threads=1, device="cpu")).items() if k[:3] != "thp"},
        "engine": runs["1"][0][str(args.rows[0])]["engine"],
        "median": table,
        "runs": runs,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
