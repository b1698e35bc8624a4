"""What int8-dynamic, bitsandbytes and output-vocabulary restriction cost in quality, on a TRAINED model.

Random weights give near-flat logits, so agreement measured on them says nothing about summaries. This
script fine-tunes a small mT5 with our own fine-tuning job (jobs/finetune.py, the `--finetune` demo's
recipe, longer: "summary = the document's first two words" in seven languages, 3,000 steps, about 4
minutes on one thread) once, caches it under benchmarks/.cache/, and on held-out documents compares
every setting with float32:

- agreement with float32 under the same decoding: whole sequences identical, and tokens identical
  position by position (over the longer of the two sequences);
- ROUGE-1/2/L (pipeline/evaluate.py, multilingual) and exact match against the references.

The restricted output vocabulary is derived from the training targets' text (what a user would pass to
--output-vocabulary: a sample of text in the languages they summarize), not from the held-out set.

  python benchmarks/quality.py --docs 2000 --out benchmarks/results/quality-first-words.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from synthetic.corpus import first_words_finetune_flags  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"

# The demo's recipe (jobs/demo.py finetune_walkthrough) with more data and steps, on one CPU thread (about 4 min).
RECIPE = dict(
    train_rows=20000,
    train_seed=1,
    words=2,
    d_model=128,
    model_seed=0,
    finetune=[*first_words_finetune_flags(steps=3000, log_every=50), "--save-every", "1000"],
)
HELD_OUT_SEED = 9


def training_rows() -> list[dict]:
    from synthetic.corpus import first_words_task

    return first_words_task(RECIPE["train_rows"], seed=RECIPE["train_seed"], words=RECIPE["words"])


def trained_model() -> Path:
    """The fine-tuned checkpoint for RECIPE, built by jobs/finetune.py on first use and cached."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.finetune import main as finetune
    from synthetic.checkpoints import build_trainable_checkpoint
    from synthetic.spiece import build_spiece_model

    key = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    root = CACHE / f"quality-{key}"
    tuned = root / "tuned"
    if (tuned / "model.safetensors").exists() and (tuned / "eval.json").exists():
        return tuned
    base = root / "base"
    build_trainable_checkpoint(
        base, build_spiece_model(root / "spiece"), d_model=RECIPE["d_model"], seed=RECIPE["model_seed"]
    )
    pq.write_table(pa.Table.from_pylist(training_rows()), root / "train.parquet")
    # a small evaluation set for eval.json; the benchmark's own held-out set is scored below
    from synthetic.corpus import first_words_task

    pq.write_table(
        pa.Table.from_pylist(first_words_task(40, seed=HELD_OUT_SEED + 1, words=RECIPE["words"])), root / "eval.parquet"
    )
    start = time.perf_counter()
    os.environ["RAY_ADDRESS"] = "local"  # a Ray of its own, even where another one runs on this machine
    status = finetune(
        [
            "--model",
            str(base),
            "--train",
            str(root / "train.parquet"),
            "--eval",
            str(root / "eval.parquet"),
            "--output-model",
            str(tuned),
            "--cpus-per-replica",
            "1",
            *RECIPE["finetune"],
        ]
    )
    if status != 0:
        raise SystemExit(f"fine-tuning failed (exit {status})")
    print(f"trained in {time.perf_counter() - start:.0f} s: {tuned}", file=sys.stderr)
    return tuned


# --- the settings compared ----------------------------------------------------------------------------

DECODINGS = {"greedy": dict(num_beams=1), "beam4": dict(num_beams=4, no_repeat_ngram_size=2, length_penalty=0.6)}
MAX_NEW_TOKENS = 8  # the recipe's --max-target-tokens


def build(checkpoint: Path, setting: str, kept: set[int]):
    """The model for one setting, loaded as a job loads it (model.load_for_inference)."""
    from model import load_for_inference
    from model import quantize as quantization

    method = {"fp32": "none", "vocab": "none", "bnb-int8": "int8", "bnb-nf4": "nf4"}.get(setting, "int8-dynamic")
    kept_ids = kept if setting.startswith("vocab") else None
    # What int8-dynamic leaves in float32: int8-dynamic+wo is the measurement behind model/quantize.py's
    # DYNAMIC_KEEP_UNQUANTIZED; int8-dynamic-head-kept keeps lm_head too (as quantize's skip=("lm_head",)).
    keep = {"int8-dynamic+wo": (), "int8-dynamic-head-kept": ("wo", "lm_head")}.get(
        setting, quantization.DYNAMIC_KEEP_UNQUANTIZED
    )
    # int8-dynamic-wo-float32: `wo` in float32 even where int8-dynamic holds it in bfloat16 (native_bfloat16).
    native = (lambda: False) if setting == "int8-dynamic-wo-float32" else quantization.native_bfloat16
    with patched(quantization, "DYNAMIC_KEEP_UNQUANTIZED", keep), patched(quantization, "native_bfloat16", native):
        return load_for_inference(checkpoint, dtype="float32", quantization=method, kept_ids=kept_ids)


# int8-dynamic+wo and int8-dynamic-head-kept: what quantizing `wo` too, or keeping lm_head in float32, changes;
# int8-dynamic-wo-float32: what holding `wo` in bfloat16 changes, on a CPU where int8-dynamic does.
SETTINGS = (
    "fp32",
    "int8-dynamic",
    "int8-dynamic-wo-float32",
    "int8-dynamic+wo",
    "int8-dynamic-head-kept",
    "bnb-int8",
    "bnb-nf4",
    "vocab",
    "vocab+int8-dynamic",
)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def generate(
    model,
    tokenizer,
    texts: list[str],
    decoding: dict,
    batch_size: int,
    *,
    max_input_tokens: int = 32,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[list[int]]:
    """Generated ids per document: after the decoder start, up to and including </s>. The defaults are the
    recipe's truncation and target length (benchmarks/quality_descriptions.py passes its own)."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            max_length=max_input_tokens,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            rows = model.generate(**batch, max_new_tokens=max_new_tokens, **decoding).tolist()
        for row in rows:
            row = row[1:]
            out.append(row[: row.index(1) + 1] if 1 in row else row)
    return out


def scores(ids: list[list[int]], reference_ids: list[list[int]], texts: list[str], references: list[str]) -> dict:
    from pipeline.evaluate import rouge

    matched = sum(sum(a == b for a, b in zip(o, r)) for o, r in zip(ids, reference_ids))
    total = sum(max(len(o), len(r)) for o, r in zip(ids, reference_ids))
    return {
        "sequence_agreement": sum(o == r for o, r in zip(ids, reference_ids)) / len(ids),
        "token_agreement": matched / max(total, 1),
        **{k: round(v, 2) for k, v in rouge(texts, references).items()},
        "exact_match": round(100 * sum(t.strip() == r.strip() for t, r in zip(texts, references)) / len(texts), 2),
    }


def main(argv=None) -> None:
    from benchmarks.run import machine, write_report
    from model import MT5Tokenizer
    from model import quantize as quantization
    from model.vocabulary import kept_ids_from_text
    from synthetic.corpus import first_words_task

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--docs",
        type=int,
        default=500,
        help="held-out documents generated (Chinese and Japanese ones are dropped: no words to take)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="results JSON, e.g. benchmarks/results/quality-first-words.json")
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help="comma-separated, fp32 first (the reference the others are compared with); default: all",
    )
    args = parser.parse_args(argv)
    settings = args.settings.split(",")
    if settings[0] != "fp32" or not set(settings) <= set(SETTINGS):
        parser.error(f"--settings: fp32 first, then any of {', '.join(SETTINGS[1:])}")
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)

    checkpoint = trained_model()
    tokenizer = MT5Tokenizer.from_pretrained(checkpoint)
    held_out = first_words_task(args.docs, seed=HELD_OUT_SEED, words=RECIPE["words"])
    texts, references = [r["text"] for r in held_out], [r["summary"] for r in held_out]
    # What a user would pass as --output-vocabulary: text in the languages summarized, here the training targets.
    kept = kept_ids_from_text(tokenizer, [r["summary"] for r in training_rows()])

    results, reference = [], {}
    for setting in settings:
        model = build(checkpoint, setting, kept)
        for name, decoding in DECODINGS.items():
            start = time.perf_counter()
            ids = generate(model, tokenizer, texts, decoding, args.batch_size)
            seconds = time.perf_counter() - start
            reference.setdefault(name, ids)
            summaries = tokenizer.batch_decode(ids, skip_special_tokens=True)
            row = {
                "setting": setting,
                "decoding": name,
                **scores(ids, reference[name], summaries, references),
                "seconds": round(seconds, 2),
            }
            results.append(row)
            print(
                f"[quality] {setting:22} {name:6} "
                + "  ".join(f"{k} {v}" for k, v in row.items() if k not in ("setting", "decoding")),
                file=sys.stderr,
            )
        del model

    report = {
        "benchmark": "lakesum quality of int8-dynamic, bitsandbytes and output-vocabulary restriction",
        "command": "python "
        + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(argparse.Namespace(threads=args.threads, device="cpu")),
        "setup": {
            "recipe": RECIPE,
            "held_out": {"documents": len(texts), "seed": HELD_OUT_SEED},
            "training_eval": json.loads((checkpoint / "eval.json").read_text()),
            "vocab_size": json.loads((checkpoint / "config.json").read_text())["vocab_size"],
            "restricted_vocabulary": len(kept | {0, 1}),
            "int8_dynamic_wo": "bfloat16" if quantization.native_bfloat16() else "float32",
            "max_new_tokens": MAX_NEW_TOKENS,
            "decodings": DECODINGS,
            "agreement": "with fp32 under the same decoding; tokens: same id at the same position, over the "
            "longer sequence",
        },
        "results": results,
    }
    print_table(report)
    write_report(report, args.out, "quality")


def print_table(report: dict) -> None:
    setup = report["setup"]
    print(
        f"\n{report['command']}\n{report['machine']['cpu']}, {report['machine']['threads']} thread(s), "
        f"torch {report['machine']['torch']}, {report['date']}"
    )
    print(
        f"{setup['held_out']['documents']} held-out documents; vocabulary {setup['vocab_size']}, restricted to "
        f"{setup['restricted_vocabulary']} (the training targets' pieces)\n"
    )
    print("| setting | decoding | same sequence as fp32 | same tokens as fp32 | ROUGE-1 | ROUGE-L | exact match |")
    print("|---|---|---|---|---|---|---|")
    for r in report["results"]:
        print(
            f"| {r['setting']} | {r['decoding']} | {100 * r['sequence_agreement']:.1f}% | "
            f"{100 * r['token_agreement']:.1f}% | {r['rouge1']:.1f} | {r['rougeL']:.1f} | {r['exact_match']:.1f} |"
        )


if __name__ == "__main__":
    main()
