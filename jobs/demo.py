"""make demo: summarize a few multilingual sample documents with our mT5.

  python jobs/demo.py --model google/mt5-small     # any checkpoint: directory, fsspec URI or hub id
  python jobs/demo.py                               # offline: builds a small random demo checkpoint first

A random checkpoint shows the machinery (loading, tokenizing, beam search, decoding), not summaries:
its output is arbitrary text until the model is fine-tuned.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import MT5Config, MT5ForConditionalGeneration, MT5Tokenizer  # noqa: E402

SAMPLE_DOCUMENTS = [
    "The city council approved a new budget on Tuesday that increases spending on public transport and "
    "schools, while cutting administrative costs by ten percent over the next two years.",
    "Le gouvernement a annoncé mardi un plan pour rénover les écoles du pays, avec un budget de deux "
    "milliards d'euros sur cinq ans.",
    "Правительство объявило о новой программе поддержки малого бизнеса, которая начнёт действовать в "
    "следующем месяце.",
    "सरकार ने मंगलवार को देश भर के स्कूलों के नवीनीकरण के लिए एक नई योजना की घोषणा की।",
    "أعلنت الحكومة يوم الثلاثاء عن خطة جديدة لتجديد المدارس في جميع أنحاء البلاد.",
    "政府は火曜日、全国の学校を改修する新しい計画を発表した。",
]


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
    model.save_pretrained(out_dir)
    return out_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory, fsspec URI or hub id (default: a random demo model)")
    parser.add_argument("--output", default="demo_out", help="where the demo checkpoint is built")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    source = args.model or build_demo_checkpoint(Path(args.output) / "model")
    tokenizer = MT5Tokenizer.from_pretrained(source)
    model = MT5ForConditionalGeneration.from_pretrained(source)
    start = time.perf_counter()
    batch = tokenizer(SAMPLE_DOCUMENTS, max_length=512, truncation=True, padding=True, return_tensors="pt")
    out = model.generate(**batch, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                         no_repeat_ngram_size=2, length_penalty=0.6)
    summaries = tokenizer.batch_decode(out, skip_special_tokens=True)
    elapsed = time.perf_counter() - start
    for doc, summary in zip(SAMPLE_DOCUMENTS, summaries):
        print(f"- {doc[:70]}...\n  -> {summary!r}")
    print(f"{len(summaries)} documents in {elapsed:.2f}s with {source}"
          + ("" if args.model else " (random weights: arbitrary text until fine-tuned)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
