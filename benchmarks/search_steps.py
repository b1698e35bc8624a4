"""How much decoding each engine's beam search does on the benchmark's documents, apart from how fast it does it.

On varied-length outputs, tokens/s compares engines whose searches end each document at their own step: with a
random model the int8 numerics of each engine decide where the beams finish. Here each engine returns all of a
document's num_beams finished hypotheses (transformers' early_stopping=True, CTranslate2's one rule: done once
num_beams hypotheses have finished), so a document took as many steps as its longest hypothesis has tokens; its
best hypothesis is the output the speed benchmark counts.

    python benchmarks/search_steps.py --shape small --docs 48 --out benchmarks/results/search-steps-amd-mt5-small.json

`run.py --to-cap` takes the difference away: every engine decodes every document to --max-new-tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import checkpoints, run  # noqa: E402
from benchmarks.engines import DECODINGS, Context, CTranslate2Engine, Decoding, generated_ids  # noqa: E402


def ours(path: Path, docs: list[dict], order: list[int], decoding: Decoding, batch_size: int) -> list[list[int]]:
    """Each document's hypotheses' generated ids (best first), from ours int8-dynamic, continuous."""
    from model import load_for_inference
    from model.decode import decode_stream

    model = load_for_inference(path, dtype="float32", quantization="int8-dynamic")
    config = model.generation_config.updated(**decoding.hf_settings(), num_return_sequences=decoding.num_beams)
    hypotheses: dict[int, list[list[int]]] = {}
    with torch.inference_mode():
        stream = decode_stream(
            model, ((i, docs[i]["ids"]) for i in order), config, max_rows=batch_size * decoding.num_beams
        )
        for i, outputs in stream:
            hypotheses[i] = [generated_ids(row) for row in outputs]
    return [hypotheses[i] for i in order]


def ctranslate2_int8(ctx: Context, docs: list[dict], order: list[int], decoding: Decoding) -> list[list[list[int]]]:
    """The same from CTranslate2 int8 (the speed benchmark's engine), batch by batch as it runs them."""
    engine = CTranslate2Engine(ctx, "int8")
    out = []
    for start in range(0, len(order), ctx.batch_size):
        batch = order[start : start + ctx.batch_size]
        results = engine.translator.translate_batch(
            [[engine.vocab[t] for t in docs[i]["ids"]] for i in batch],
            beam_size=decoding.num_beams,
            num_hypotheses=decoding.num_beams,
            length_penalty=decoding.length_penalty,
            no_repeat_ngram_size=decoding.no_repeat_ngram_size,
            max_decoding_length=decoding.max_new_tokens,
            min_decoding_length=0,
            return_end_token=True,
        )
        out += [[[engine.ids[t] for t in h] for h in result.hypotheses] for result in results]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(checkpoints.SHAPES), default="small")
    p.add_argument("--docs", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from model import MT5Tokenizer

    torch.set_num_threads(1)
    path = checkpoints.checkpoint(args.shape)
    docs = checkpoints.documents(args.docs, MT5Tokenizer.from_pretrained(path))
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]["ids"]))  # as run.py batches them
    decoding = dataclasses.replace(DECODINGS["beam4-early"], max_new_tokens=args.max_new_tokens)
    ctx = Context(args.shape, path, "cpu", 1, [], args.batch_size)
    counts = {}
    for name, hypotheses in (
        ("ours-int8-dynamic-continuous", ours(path, docs, order, decoding, args.batch_size)),
        ("ct2-int8", ctranslate2_int8(ctx, docs, order, decoding)),
    ):
        counts[name] = {
            "document_steps": sum(max(len(h) for h in doc) for doc in hypotheses),
            "output_tokens": sum(len(doc[0]) for doc in hypotheses),
        }
        print(
            f"{name:30s} {counts[name]['document_steps']:6d} document-steps {counts[name]['output_tokens']:6d} tokens"
        )
    report = {
        "benchmark": "beam search steps and output tokens per engine",
        "command": " ".join(["python", "benchmarks/search_steps.py", *sys.argv[1:]]),
        "machine": run.machine(argparse.Namespace(threads=1, device="cpu")),
        "setup": {"shape": args.shape, "documents": len(docs), "decoding": decoding.hf_settings()},
        "results": counts,
    }
    run.write_report(report, args.out, "search-steps")


if __name__ == "__main__":
    main()
