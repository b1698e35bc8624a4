"""make demo: summarize a small multilingual sample corpus with jobs/summarize.py on a local Ray.

  python jobs/demo.py                      # XL-Sum's multilingual mT5 from the hub, or an offline demo model
  python jobs/demo.py --model DIR          # any checkpoint: directory, fsspec URI or hub id

If the hub cannot be reached, the demo says so in one line and builds a small random checkpoint
instead: its "summaries" are arbitrary text that shows the machinery, and they are labelled so.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Fail fast instead of retrying an unreachable hub for minutes.
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow.dataset as pads  # noqa: E402
import torch  # noqa: E402

from model import MT5Config, MT5ForConditionalGeneration, ModelLoadError  # noqa: E402
from model.checkpoint import resolve_checkpoint  # noqa: E402

XLSUM = "csebuetnlp/mT5_multilingual_XLSum"
RANDOM_LABEL = "(random demo weights: arbitrary text, not a summary)"


def build_demo_checkpoint(out_dir: Path) -> Path:
    """A small random mT5 with a sentencepiece vocabulary trained on generated multilingual text."""
    from tests.fixtures.spiece import build_spiece_model

    if (out_dir / "model.safetensors").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    build_spiece_model(out_dir)
    config = MT5Config(vocab_size=250112, d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2,
                       num_decoder_layers=2, tie_word_embeddings=False, dropout_rate=0.0)
    torch.manual_seed(0)
    model = MT5ForConditionalGeneration(config).init_weights()
    with torch.no_grad():
        # The vocabulary is padded to mT5's 250,000 pieces with private-use filler: keep random weights
        # from picking filler, so the arbitrary text is at least made of real words.
        model.lm_head.weight[_first_filler_piece(out_dir / "spiece.model"):] *= 0.05
    model.save_pretrained(out_dir)
    return out_dir


def _first_filler_piece(spiece: Path) -> int:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece))
    return next(i for i in range(sp.get_piece_size()) if ord(sp.id_to_piece(i)[0]) >= 0xF0000)


def write_sample_corpus(root: Path) -> Path:
    """Two Hive partitions of short news-like documents in six scripts."""
    from tests.fixtures.corpus import documents, write_shards

    if not root.exists():
        docs = documents(48, seed=7, max_sentences=6)
        write_shards(root, docs, files=2, row_group_size=12, partition="batch")
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"checkpoint (default: {XLSUM}, or an offline demo model)")
    parser.add_argument("--output", default="demo_out", help="folder for the corpus, model and summaries")
    args = parser.parse_args()
    out = Path(args.output)

    model, label = args.model, ""
    if model is None:
        try:
            resolve_checkpoint(XLSUM)
            model = XLSUM
        except ModelLoadError:
            print(f"[demo] {XLSUM} is not reachable from here (no hub access): using an offline demo "
                  f"checkpoint with random weights", file=sys.stderr)
            model, label = str(build_demo_checkpoint(out / "demo-model")), RANDOM_LABEL
    corpus = write_sample_corpus(out / "corpus")

    from jobs.summarize import main as summarize

    status = summarize(["--model", model, "--input", str(corpus), "--output", str(out / "summaries"),
                        "--replicas", "1", "--max-new-tokens", "32", "--no-repeat-ngram-size", "2",
                        "--progress-every", "5", "--overwrite"])
    if status == 0:
        table = pads.dataset(out / "summaries", format="parquet", partitioning="hive").to_table()
        print(f"\n{table.num_rows} documents summarized into {out / 'summaries'} {label}")
        for row in table.slice(0, 6).to_pylist():
            print(f"  {row['id']} [{row['lang']}] {row['summary']!r}")
    return status


if __name__ == "__main__":
    sys.exit(main())
