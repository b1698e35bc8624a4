"""The output head's matmul on CPU, in each layout it could be held in: which one model/packed.py keeps.

    .venv/bin/python benchmarks/head_layouts.py --threads 1 --out benchmarks/results/head-layouts.json

mT5's head is [vocab, d_model] ([250112, 512] for mt5-small); a decode step multiplies [rows, d_model] by it,
rows being batch x beams. Timed, at each row count, interleaved so that other load on the machine hits every
layout alike (median of --repeats calls):
- float32 row-major: nn.Linear as loaded (MKL, transposed B);
- float32 column-major: the same weight stored transposed (MKL, plain B), the layout that was dropped;
- float32 oneDNN-packed: model.packed.PackedLinear, the layout model.load_for_inference gives a CPU head;
- int8-dynamic: what quantization="int8-dynamic" makes of the head, where no float layout applies: its vocabulary blocks
  (model/quantize.py Int8HeadBlocks, written into a reused output as a decode step does) packed for fbgemm, packed for
  oneDNN, and as load_for_inference holds them on a CPU with VNNI: packed for oneDNN, with a copy packed for fbgemm
  that multiplies up to FEW_ROWS rows.

    .venv/bin/python benchmarks/head_layouts.py --layouts int8 --rows 1,2,4,8,12,16,20,24,32,48,64,128 --repeats 7
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
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def layouts(vocab: int, d_model: int, kinds: str) -> dict:
    from model.packed import PackedLinear, can_pack_int8
    from model.quantize import Int8HeadBlocks

    torch.manual_seed(0)
    linear = nn.Linear(d_model, vocab, bias=False).requires_grad_(False)
    heads = {}
    if kinds in ("all", "fp32"):
        row_major = linear.weight.detach().contiguous()
        column_major = row_major.t().contiguous().t()
        heads["fp32 row-major"] = lambda x: F.linear(x, row_major)
        heads["fp32 column-major"] = lambda x: F.linear(x, column_major)
        heads["fp32 oneDNN-packed"] = PackedLinear(linear)
    if kinds in ("all", "int8"):
        vnni = can_pack_int8()
        for engine in ["fbgemm", "onednn"] if vnni else ["fbgemm"]:
            blocks = Int8HeadBlocks.from_float(linear, engine)
            blocks.few_rows = ()  # this engine at every row count
            heads[f"int8 {engine}"] = into_reused_output(blocks)
        if vnni:
            heads["int8 as loaded"] = into_reused_output(Int8HeadBlocks.from_float(linear, "onednn"))
    return heads


def into_reused_output(head):
    """The head writing into one output per row count, as a decode step's reused logits buffer."""
    outputs: dict[int, torch.Tensor] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] not in outputs:  # made once, outside the timed calls that follow
            outputs[x.shape[0]] = x.new_empty(x.shape[0], head.out_features)
        return head(x, out=outputs[x.shape[0]])

    return run


def main(argv=None) -> None:
    from benchmarks.run import cpu_timings_report, write_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=250112)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--rows", default="1,4,16,64,128", help="row counts: batch x beams of a decode step")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layouts", choices=["all", "fp32", "int8"], default="all")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()[0]
    heads = layouts(args.vocab, args.d_model, args.layouts)
    results = []
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, args.d_model)
            times: dict[str, list[float]] = {name: [] for name in heads}
            for head in heads.values():
                head(x)
            for _ in range(args.repeats):
                for name, head in heads.items():
                    start = time.perf_counter()
                    head(x)
                    times[name].append(time.perf_counter() - start)
            results.append({"rows": rows, **{name: round(1000 * statistics.median(t), 2) for name, t in times.items()}})
    report = cpu_timings_report(
        "lakesum CPU output-head layouts, median ms per [rows, d_model] x [d_model, vocab]",
        __file__,
        argv,
        args.threads,
        started,
        load_before,
        {"vocab": args.vocab, "d_model": args.d_model, "repeats": args.repeats, "layouts": args.layouts},
        results,
        "rows",
        list(heads),
        1,
    )
    write_report(report, args.out, "head-layouts")


if __name__ == "__main__":
    main()
