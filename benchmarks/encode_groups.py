"""How many tokens a continuous batch should encode at once on CPU: model/decode_batch.py's ENCODE_TOKENS_CPU.

    .venv/bin/python benchmarks/encode_groups.py --shape small --quantization int8-dynamic --threads 1

New documents are encoded in groups of similar length (DecodeBatch._encode, as a decode does it: the encoder
and every decoder layer's cross-attention keys and values, written into the batch's storage). This times
that call for 16 documents under each cap on a group's tokens (padding included; "none": the similar-length
groups alone), taking turns so that other load hits every cap alike, median of --repeats:
- 16 sources of 512 tokens (a lake's long documents cut at the model's input length) and of 128;
- the 48 documents of benchmarks/run.py, longest first, 16 at a time (lengths 50-500, mostly in small groups
  already).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

UNCAPPED = 1 << 30


def encode_all(model, sources: list[list[int]], cap: int) -> None:
    """DecodeBatch._encode of `sources`, 16 at a time, with ENCODE_TOKENS_CPU set to `cap`."""
    from model import decode_batch
    from model.decode import Greedy

    decode_batch.ENCODE_TOKENS_CPU = cap
    config = model.generation_config
    for start in range(0, len(sources), 16):
        part = sources[start : start + 16]
        batch = decode_batch.DecodeBatch(model, config, Greedy(config))
        batch._append(len(part))
        batch._widen_sources(max(map(len, part)))
        batch._encode(part, torch.arange(len(part)))


def main(argv=None) -> None:
    from benchmarks import checkpoints
    from benchmarks.run import cpu_timings_report, write_report
    from model import MT5Tokenizer, load_for_inference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=["small", "base"])
    p.add_argument("--quantization", default="int8-dynamic")
    p.add_argument("--caps", default="none,4096,2048,1024,512", help="tokens per group; none: no cap")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()[0]
    checkpoint = checkpoints.checkpoint(args.shape)
    model = load_for_inference(checkpoint, quantization=args.quantization)
    generator = torch.Generator().manual_seed(0)
    workloads = {
        f"16 x {length}": torch.randint(5, 30000, (16, length), generator=generator).tolist() for length in (512, 128)
    }
    documents = checkpoints.documents(48, MT5Tokenizer.from_pretrained(checkpoint))
    workloads["run.py's 48 documents"] = sorted((d["ids"] for d in documents), key=len, reverse=True)
    caps = {name: UNCAPPED if name == "none" else int(name) for name in args.caps.split(",")}
    results = []
    with torch.inference_mode():
        for workload, sources in workloads.items():
            times: dict[str, list[float]] = {name: [] for name in caps}
            encode_all(model, sources[:16], UNCAPPED)  # warm up
            for _ in range(args.repeats):
                for name, cap in caps.items():
                    start = time.perf_counter()
                    encode_all(model, sources, cap)
                    times[name].append(time.perf_counter() - start)
            results.append(
                {"workload": workload, **{name: round(statistics.median(t), 3) for name, t in times.items()}}
            )
    report = cpu_timings_report(
        f"lakesum CPU encode of 16 documents at a time (mt5-{args.shape} {args.quantization}), median s, by the cap on"
        " a group's tokens",
        __file__,
        argv,
        args.threads,
        started,
        load_before,
        {"shape": args.shape, "quantization": args.quantization, "repeats": args.repeats},
        results,
        "workload",
        list(caps),
        2,
    )
    write_report(report, args.out, "encode-groups")


if __name__ == "__main__":
    main()
