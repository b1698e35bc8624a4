"""The real summarization task the quality benchmarks train on: Debian package descriptions -> their synopses.

synthetic/package_descriptions.py reads the corpus (7 languages; Latin, Cyrillic and CJK scripts). This module
turns it into what a user of jobs/finetune.py has: Parquet files with `text` and `summary` (plus `language` and
`package`), split by package, a unigram tokenizer trained on the training split in mT5's 250,000-piece layout, and
a small randomly initialised mT5 to fine-tune, all cached under benchmarks/.cache/description-task/.

    .venv/bin/python benchmarks/description_task.py      # prepare, and print the split's figures
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "benchmarks" / ".cache" / "description-task"
SPIECE_PIECES = 8000  # trained pieces; the model's vocabulary rows cover them (MODEL_VOCAB)
MODEL_VOCAB = 8192
SPIECE_LINES = 60000  # a sample of the training split: enough for 8k pieces, trained in about a minute
EVAL_PER_LANGUAGE = 200


@dataclass(frozen=True)
class Task:
    train: Path  # Parquet: text, summary, language, package; shuffled once with a fixed seed
    eval: Path  # the held-out packages, at most EVAL_PER_LANGUAGE a language
    spiece: Path  # spiece.model


def prepare() -> Task:
    """The task's files, built on first use (apt's translation lists are fetched if missing) and cached."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthetic import package_descriptions as corpus

    task = Task(CACHE / "train.parquet", CACHE / "eval.parquet", CACHE / "spiece" / "spiece.model")
    if task.train.exists() and task.eval.exists() and task.spiece.exists():
        return task
    corpus.fetch()
    rows = [
        {"text": d.document, "summary": d.summary, "language": d.language, "package": d.package}
        for d in corpus.descriptions()
    ]
    train = [r for r in rows if not corpus.held_out(r["package"])]
    random.Random(0).shuffle(train)
    held = [r for r in rows if corpus.held_out(r["package"])]
    evaluation = []
    for language in corpus.LANGUAGES:
        in_language = [r for r in held if r["language"] == language]
        evaluation += random.Random(1).sample(in_language, min(EVAL_PER_LANGUAGE, len(in_language)))
    CACHE.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(train), task.train)
    pq.write_table(pa.Table.from_pylist(evaluation), task.eval)
    _train_spiece(train, task.spiece)
    return task


def base_checkpoint(d_model: int = 256, layers: int = 2, seed: int = 0, small_head: bool = False) -> Path:
    """A randomly initialised small mT5 (our save_pretrained; transformers loads it) with the task's tokenizer.

    T5's initialisation gives an untied lm_head a standard deviation of 1, made for a model whose pretrained
    weights replace it: from scratch its first logits have a standard deviation near sqrt(d_model) (a loss of
    40-60 against ln(8192) = 9 for a uniform guess), and a short fine-tuning run spends itself shrinking them.
    `small_head` draws it with d_model^-0.5 instead, as T5 scales a tied head, so that training starts from
    near-uniform logits.
    """
    from synthetic.checkpoints import build_trainable_checkpoint

    task = prepare()
    out = CACHE / f"base-d{d_model}-l{layers}-s{seed}{'-small-head' if small_head else ''}"
    if not (out / "model.safetensors").exists():
        build_trainable_checkpoint(out, task.spiece, d_model=d_model, seed=seed, vocab_size=MODEL_VOCAB, layers=layers)
        if small_head:
            from model import MT5ForConditionalGeneration

            model = MT5ForConditionalGeneration.from_pretrained(out)
            model.lm_head.weight.data.mul_(d_model**-0.5)
            model.save_pretrained(out)
    return out


def _train_spiece(train: list[dict], path: Path) -> None:
    import sentencepiece as spm

    from synthetic.spiece import MT5_SPIECE_PIECES, pad_to_mt5_size, train_unigram

    lines = [line for r in train[:SPIECE_LINES] for line in (r["summary"], *r["text"].split("\n"))]
    serialized = pad_to_mt5_size(train_unigram(lines, vocab_size=SPIECE_PIECES))
    processor = spm.SentencePieceProcessor(model_proto=serialized)
    if processor.get_piece_size() != MT5_SPIECE_PIECES:
        raise RuntimeError(f"spiece has {processor.get_piece_size()} pieces, expected {MT5_SPIECE_PIECES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialized)


def main() -> None:
    import pyarrow.parquet as pq

    task = prepare()
    figures = {}
    for name, path in (("train", task.train), ("eval", task.eval)):
        table = pq.read_table(path)
        languages = table.column("language").to_pylist()
        figures[name] = {language: languages.count(language) for language in sorted(set(languages))}
    print(json.dumps({"task": {k: str(v) for k, v in task.__dict__.items()}, "rows": figures}, indent=1))


if __name__ == "__main__":
    main()
