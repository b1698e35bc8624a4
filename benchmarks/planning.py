"""Planning at lake scale: list, inspect and plan a lake of many small Parquet files, then resume over it.

    .venv/bin/python benchmarks/planning.py --files 1000000 --partitions 10000 --out benchmarks/results/planning.json

Each phase runs in its own process, so its peak RSS is its own: `plan` is a first run's planning (list, read
one footer a partition, plan the other small files from their listing, make units, write the manifest);
`resume` is the next night's, with every unit committed (markers compacted, as a run leaves them, with the row
counts the replicas read from the footers) and nothing to do; `filtered` is a --partition-filter run over one
partition. The model is a tiny one (its fingerprint costs the same at any lake size), and --quantization auto is
resolved as the driver resolves it for CPU replicas. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


ROWS_PER_FILE = 3


def build_lake(root: Path, files: int, partitions: int) -> None:
    """`files` copies of one small Parquet file (ROWS_PER_FILE rows), spread over `partitions` Hive folders."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = root / f"_built-{files}-{partitions}"
    if marker.exists():
        return
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["a document", "another", "a third"]}), buffer)
    data = buffer.getvalue()
    per_partition = -(-files // partitions)
    written = 0
    for p in range(partitions):
        folder = root / f"date={p:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_partition, files - written)):
            (folder / f"part-{i:04d}.parquet").write_bytes(data)
        written += per_partition
    marker.touch()


def tiny_model(root: Path) -> Path:
    """A tiny mT5 checkpoint: planning fingerprints the model, whose size does not change with the lake."""
    from benchmarks.checkpoints import spiece_model
    from synthetic.checkpoints import TINY, build_checkpoint

    model = root / "tiny-model"
    if not (model / "config.json").exists():
        build_checkpoint(model, TINY, spiece_model())
    return model


def phase(name: str, lake: str, out: str, model: str) -> dict:
    """One phase in this process, as jobs/summarize.py plans and prepares (no lease, no replicas)."""
    from dataclasses import replace

    from pipeline import fit
    from pipeline.commit import OutputLocation, _unit_record
    from pipeline.driver import plan
    from pipeline.settings import SummarizeSettings

    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    settings = SummarizeSettings(model=model)
    # as the driver resolves --quantization auto before planning (fit.resolved), for replicas on CPU
    settings = replace(settings, quantization=fit.on_this_device(settings, Path(model), "cpu"))
    location = OutputLocation(out)
    work = plan(settings, lake, None, "date=00042" if name == "filtered" else None, location)
    planned = time.perf_counter()
    changes = location.prepare(work.manifest, units=work.units, **work.selection)
    prepared = time.perf_counter()
    if name == "plan":  # as if the run committed every unit: the markers it leaves, compacted (finish())
        location._write_index(
            {
                u.id: {
                    **_unit_record(u)._asdict(),
                    "num_rows": ROWS_PER_FILE,  # a replica's marker has the footer's rows
                    "attempt": "a1",
                    "generation": 1,
                    "committed_at": "2026-11-30T00:00:00+00:00",
                }
                for u in work.units
            }
        )
    seconds = {"plan": planned - start, "prepare": prepared - planned, "total": time.perf_counter() - start}
    return {
        "phase": name,
        "files": len({u.shard.path for u in work.units}),
        "units": len(work.units),
        # units of small files planned from their listing, whose footers the plan did not read
        "planned_from_listing": sum(u.num_rows is None for u in work.units),
        "quantization": settings.quantization,
        "to_run": len(changes.run),
        "skipped": len(changes.skip),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        # user + system, this process and its footer workers: on a shared machine, what the phase cost itself
        "cpu_seconds": round(_cpu_seconds() - cpu_start, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cpu() -> str:
    """The machine, as benchmarks/run.py records it for every benchmark."""
    from benchmarks.run import machine

    m = machine(argparse.Namespace(threads=1, device="cpu"))
    return f"cpu: {m['cpu']}; simd: {' '.join(m['simd'])} | python {m['python']}; torch {m['torch']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=10_000)
    p.add_argument("--root", default="/tmp/lakesum-planning")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase and print it
    args = p.parse_args()
    root = Path(args.root)
    lake, out = root / f"lake-{args.files}-{args.partitions}", root / f"out-{args.files}-{args.partitions}"
    if args.phase:
        print(json.dumps(phase(args.phase, str(lake), str(out), str(tiny_model(root)))))
        return
    load_before = os.getloadavg()  # the machine may be shared: its load says how far to trust the seconds
    step = time.perf_counter()
    build_lake(lake, args.files, args.partitions)
    print(f"lake: {args.files:,} files in {args.partitions:,} partitions ({time.perf_counter() - step:.0f} s to build)")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    tiny_model(root)
    results = []
    for name in ("plan", "resume", "filtered"):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--files",
                str(args.files),
                "--partitions",
                str(args.partitions),
                "--root",
                args.root,
                "--phase",
                name,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"{name:<9} {r['files']:>9,} files {r['units']:>9,} units ({r['planned_from_listing']:>9,} listed)"
            f"  run {r['to_run']:>9,}  skip {r['skipped']:>9,}"
            f"  {r['seconds']['total']:>7.1f} s  cpu {r['cpu_seconds']:>7.1f} s  peak {r['peak_rss_mib']:>6,} MiB"
            f"  {r['seconds']}"
        )
    report = {
        "command": " ".join(["benchmarks/planning.py", *sys.argv[1:]]),
        "cpu": cpu(),
        "cores": os.cpu_count(),
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "python": platform.python_version(),
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
