"""Where one generate() call of our engine spends its time: torch.profiler's operator table and cProfile's
Python functions, for one batch of the benchmark's documents.

    python benchmarks/profile_generate.py --shape small --decoding beam4 --batch 16

    python benchmarks/profile_generate.py --shape small --decoding greedy --continuous --docs 48

The operator table shows which kernels cost (lm_head's matmul, log_softmax over 250k ids, the n-gram
ban, cache reordering); the Python table shows where they are called from. Time in the encoder and in
each decode step is printed apart with record_function markers (monkeypatched here, not in model/).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import checkpoints  # noqa: E402
from benchmarks.engines import DECODINGS, Decoding, padded  # noqa: E402


def label_phases() -> None:
    """Wrap the encoder, decoder step, lm_head, logits processors and cache reordering in named profiler ranges."""
    from model.decode_batch import DecodeBatch, StepBuffers
    from model.logits import LogitsProcessor

    def labelled(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(label):
                return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    labelled(DecodeBatch, "_encode", "phase: encoder + cross k/v")
    labelled(DecodeBatch, "logits", "phase: decoder step (stack + lm_head)")
    labelled(StepBuffers, "logits", "phase: lm_head")
    labelled(DecodeBatch, "reorder_rows", "phase: cache reorder")
    labelled(LogitsProcessor, "__call__", "phase: logits processors")


def split_continuous(model, docs: list[dict], settings: dict, rows: int) -> None:
    """Time continuous batching over `docs` (longest first, as benchmarks/run.py streams them), split
    into encoding new sources and decode steps (decoder stack + lm_head)."""
    from model.decode import generate_stream
    from model.decode_batch import DecodeBatch

    spent = {"encode": 0.0, "step": 0.0, "steps": 0, "rows": 0}
    encode, logits = DecodeBatch._encode, DecodeBatch.logits

    def timed_encode(self, *args):
        start = time.perf_counter()
        try:
            return encode(self, *args)
        finally:
            spent["encode"] += time.perf_counter() - start

    def timed_logits(self):
        start = time.perf_counter()
        try:
            return logits(self)
        finally:
            spent["step"] += time.perf_counter() - start
            spent["steps"] += 1
            spent["rows"] += len(self.lengths)

    DecodeBatch._encode, DecodeBatch.logits = timed_encode, timed_logits
    ordered = sorted(range(len(docs)), key=lambda i: -len(docs[i]["ids"]))
    config = model.generation_config.updated(**settings)
    start = time.perf_counter()
    with torch.inference_mode():
        out = list(generate_stream(model, ((i, docs[i]["ids"]) for i in ordered), config, max_rows=rows))
    total = time.perf_counter() - start
    rest = total - spent["encode"] - spent["step"]
    print(
        f"continuous: {total:.1f}s for {len(out)} documents ({sum(len(d['ids']) for d in docs)} source tokens): "
        f"encoding {spent['encode']:.1f}s, {spent['steps']} decode steps {spent['step']:.1f}s "
        f"(mean {spent['rows'] / max(spent['steps'], 1):.1f} rows), the rest {rest:.1f}s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(checkpoints.SHAPES), default="small")
    p.add_argument("--decoding", choices=sorted(DECODINGS), default="beam4")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    p.add_argument("--quantization", default="none", help="as jobs/summarize.py's --quantization, e.g. int8-dynamic")
    p.add_argument(
        "--continuous",
        action="store_true",
        help="instead: time continuous batching over --docs documents, encoding vs decode steps",
    )
    p.add_argument("--docs", type=int, default=48, help="documents for --continuous")
    p.add_argument("--to-cap", action="store_true", help="every output runs to --max-new-tokens (as run.py --to-cap)")
    args = p.parse_args()

    from model import MT5Tokenizer, load_for_inference

    torch.set_num_threads(args.threads)
    path = checkpoints.checkpoint(args.shape)
    tokenizer = MT5Tokenizer.from_pretrained(path)
    model = load_for_inference(path, dtype="float32", quantization=args.quantization)  # as a replica loads it
    d = DECODINGS[args.decoding]
    settings = Decoding(
        d.name,
        d.num_beams,
        args.max_new_tokens,
        early_stopping=d.early_stopping,
        min_new_tokens=args.max_new_tokens if args.to_cap else 0,
    ).hf_settings()
    if args.continuous:
        split_continuous(model, checkpoints.documents(args.docs, tokenizer), settings, args.batch * d.num_beams)
        return
    docs = checkpoints.documents(64, tokenizer)  # the benchmark's documents; take a median-length batch
    docs = sorted(docs, key=lambda d: len(d["ids"]))[24 : 24 + args.batch]
    input_ids, mask = padded([d["ids"] for d in docs])
    with torch.inference_mode():
        model.generate(input_ids=input_ids[:2, :32], attention_mask=mask[:2, :32], **dict(settings, max_new_tokens=4))
        label_phases()
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=mask, **settings)
        print(
            f"plain generate: {time.perf_counter() - start:.2f}s, output {list(out.shape)}, "
            f"input {list(input_ids.shape)}"
        )

        profiler = cProfile.Profile()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiler.enable()
            model.generate(input_ids=input_ids, attention_mask=mask, **settings)
            profiler.disable()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60)
    print(table)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(args.rows)
    print(stream.getvalue())


if __name__ == "__main__":
    main()
