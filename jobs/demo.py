"""make demo: summarize a small multilingual sample corpus with jobs/summarize.py on a local Ray.

  python jobs/demo.py                      # XL-Sum's multilingual mT5 from the hub, or an offline demo model
  python jobs/demo.py --model DIR          # any checkpoint: directory, fsspec URI or hub id
  python jobs/demo.py --finetune           # offline: fine-tune a small model on a learnable task, then summarize
  lakesum-demo ...                         # the same: the console script `pip install .` puts on PATH

If the hub cannot be reached, the demo says so in one line and builds a small random checkpoint
instead: its "summaries" are arbitrary text that shows the machinery, and they are labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Fail fast instead of retrying an unreachable hub for minutes (huggingface_hub reads these when imported).
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")

import pyarrow.dataset as pads  # noqa: E402
import torch  # noqa: E402

from jobs.finetune import main as finetune  # noqa: E402
from jobs.summarize import main as summarize  # noqa: E402
from model import ModelLoadError, MT5Config, MT5ForConditionalGeneration  # noqa: E402
from model.checkpoint import resolve_checkpoint  # noqa: E402
from synthetic.checkpoints import build_trainable_checkpoint  # noqa: E402
from synthetic.corpus import documents, first_words_finetune_flags, first_words_task, write_shards  # noqa: E402
from synthetic.spiece import build_spiece_model  # noqa: E402

XLSUM = "csebuetnlp/mT5_multilingual_XLSum"
RANDOM_LABEL = "(random demo weights: arbitrary text, not a summary)"


def build_demo_checkpoint(out_dir: Path) -> Path:
    """A small random mT5 with a sentencepiece vocabulary trained on generated multilingual text."""
    if (out_dir / "model.safetensors").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    build_spiece_model(out_dir)
    config = MT5Config(
        vocab_size=250112,
        d_model=128,
        d_kv=32,
        num_heads=4,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        tie_word_embeddings=False,
        dropout_rate=0.0,
    )
    torch.manual_seed(0)
    model = MT5ForConditionalGeneration(config).init_weights()
    with torch.no_grad():
        # The vocabulary is padded to mT5's 250,000 pieces with private-use filler: keep random weights
        # from picking filler, so the arbitrary text is at least made of real words.
        model.lm_head.weight[_first_filler_piece(out_dir / "spiece.model") :] *= 0.05
    model.save_pretrained(out_dir)
    return out_dir


def _first_filler_piece(spiece: Path) -> int:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece))
    return next(i for i in range(sp.get_piece_size()) if ord(sp.id_to_piece(i)[0]) >= 0xF0000)


def write_sample_corpus(root: Path) -> Path:
    """Two Hive partitions of short news-like documents in six scripts."""
    if not root.exists():
        docs = documents(48, seed=7, max_sentences=6)
        write_shards(root, docs, files=2, row_group_size=12, partition="batch")
    return root


def finetune_walkthrough(out: Path) -> int:
    """Fine-tune a small random mT5 on "summary = the first two words", then summarize with it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = out / "trainable-model"
    if not (base / "model.safetensors").exists():
        base.mkdir(parents=True, exist_ok=True)
        build_trainable_checkpoint(base, build_spiece_model(out / "spiece"))
    data = out / "task"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(first_words_task(6000, seed=1)), data / "train.parquet")
    held_out = first_words_task(80, seed=9)
    pq.write_table(pa.Table.from_pylist(held_out), data / "eval.parquet")
    # What a user would summarize: documents, with the expected answer under another name.
    docs = data / "docs"
    docs.mkdir(exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist([{"id": r["id"], "text": r["text"], "expected": r["summary"]} for r in held_out]),
        docs / "part-0.parquet",
    )
    tuned = out / "tuned-model"
    status = finetune(
        [
            "--model",
            str(base),
            "--train",
            str(data / "train.parquet"),
            "--eval",
            str(data / "eval.parquet"),
            "--output-model",
            str(tuned),
            *first_words_finetune_flags(steps=800, log_every=20),
        ]
    )
    if status != 0:
        return status
    status = summarize(
        [
            "--model",
            str(tuned),
            "--input",
            str(docs),
            "--output",
            str(out / "tuned-summaries"),
            "--max-input-tokens",
            "32",
            "--max-new-tokens",
            "8",
            "--overwrite",
            "--progress-every",
            "5",
        ]
    )
    if status == 0:
        rows = pq.read_table(out / "tuned-summaries" / "part-0.parquet").to_pylist()
        scores = json.loads((tuned / "eval.json").read_text())
        print(f"\nfine-tuned model: {tuned}\nheld-out scores: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))
        for row in rows[:8]:
            print(f"  {row['summary']!r:36} expected {row['expected']!r}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"checkpoint (default: {XLSUM}, or an offline demo model)")
    parser.add_argument("--output", default="demo_out", help="folder for the corpus, model and summaries")
    parser.add_argument("--finetune", action="store_true", help="the fine-tune-then-summarize walk-through")
    args = parser.parse_args(argv)
    out = Path(args.output)
    if args.finetune:
        return finetune_walkthrough(out)

    model, label = args.model, ""
    if model is None:
        try:
            resolve_checkpoint(XLSUM)
            model = XLSUM
        except ModelLoadError:
            print(
                f"[demo] {XLSUM} is not reachable from here (no hub access): using an offline demo "
                f"checkpoint with random weights",
                file=sys.stderr,
            )
            model, label = str(build_demo_checkpoint(out / "demo-model")), RANDOM_LABEL
    corpus = write_sample_corpus(out / "corpus")
    status = summarize(
        [
            "--model",
            model,
            "--input",
            str(corpus),
            "--output",
            str(out / "summaries"),
            "--replicas",
            "1",
            "--max-new-tokens",
            "32",
            "--no-repeat-ngram-size",
            "2",
            "--progress-every",
            "5",
            "--overwrite",
        ]
    )
    if status == 0:
        table = pads.dataset(out / "summaries", format="parquet", partitioning="hive").to_table()
        print(f"\n{table.num_rows} documents summarized into {out / 'summaries'} {label}")
        for row in table.slice(0, 6).to_pylist():
            print(f"  {row['id']} [{row['lang']}] {row['summary']!r}")
    return status


if __name__ == "__main__":
    sys.exit(main())
