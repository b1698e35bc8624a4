"""Random mT5 checkpoints of the real models' shapes, their CTranslate2 conversions, and the documents.

Everything is built locally (no hub), once, under benchmarks/.cache/ (git-ignored):

    .cache/spiece/spiece.model          the test suite's mT5-shaped sentencepiece model (250,000 pieces)
    .cache/mt5-small/                   config.json, model.safetensors, generation_config.json, spiece.model
    .cache/mt5-small-ct2/               the same checkpoint converted by CTranslate2 (float32 weights;
                                        int8 / bfloat16 are chosen at load time with compute_type)

The checkpoints are written by transformers' save_pretrained through the test fixture's builder, which
shrinks lm_head rows past the tokenizer's real pieces and boosts EOS, so that outputs are real pieces
of varied length rather than one arbitrary id repeated 64 times.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthetic.checkpoints import MT5_SMALL, build_checkpoint  # noqa: E402
from synthetic.corpus import documents as corpus_documents  # noqa: E402
from synthetic.spiece import build_spiece_model  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"

SHAPES = {
    # d_model 512, d_ff 1024, 8+8 layers, 6 heads of 64 (inner 384 != d_model), vocab 250,112, untied, gated-gelu
    "small": MT5_SMALL,
    # d_model 768, d_ff 2048, 12+12 layers, 12 heads of 64
    "base": dict(MT5_SMALL, d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
}

# A file written last, so that a build killed half-way is redone rather than used.
DONE = ".complete"


def spiece_model() -> Path:
    folder = CACHE / "spiece"
    if not (folder / DONE).exists():
        build_spiece_model(folder)
        (folder / DONE).write_text("")
    return folder / "spiece.model"


def checkpoint(shape: str) -> Path:
    """The Hugging Face checkpoint directory of a random mT5 of this shape, built on first use."""
    folder = CACHE / f"mt5-{shape}"
    if not (folder / DONE).exists():
        if folder.exists():
            shutil.rmtree(folder)
        print(f"[bench] building a random mt5-{shape} checkpoint in {folder} (once)", file=sys.stderr, flush=True)
        build_checkpoint(folder, SHAPES[shape], spiece_model())
        (folder / DONE).write_text(json.dumps(SHAPES[shape]))
    return folder


def ct2_model(shape: str) -> Path:
    """The checkpoint converted for CTranslate2, in float32; quantized at load time with compute_type."""
    folder = CACHE / f"mt5-{shape}-ct2"
    if not (folder / DONE).exists():
        import ctranslate2

        source = checkpoint(shape)
        if folder.exists():
            shutil.rmtree(folder)
        print(f"[bench] converting mt5-{shape} for CTranslate2 in {folder} (once)", file=sys.stderr, flush=True)
        ctranslate2.converters.TransformersConverter(str(source)).convert(str(folder), quantization="float32")
        (folder / DONE).write_text("")
    return folder


def documents(count: int, tokenizer, *, min_tokens: int = 50, max_tokens: int = 500, seed: int = 5) -> list[dict]:
    """`count` generated documents in nine languages whose token counts spread over [min_tokens, max_tokens].

    The corpus gives 1 to 40 sentences per document (about 12 tokens each); documents outside the range
    are skipped, so lengths are roughly uniform over it, as news articles of varied length are.
    """
    out: list[dict] = []
    batch_seed = seed
    while len(out) < count:
        for doc in corpus_documents(4 * count, seed=batch_seed, max_sentences=40):
            ids = tokenizer.encode(doc["text"])
            if min_tokens <= len(ids) <= max_tokens:
                out.append({**doc, "ids": ids})
                if len(out) == count:
                    break
        batch_seed += 1000
    random.Random(seed).shuffle(out)
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="build the benchmark checkpoints (run.py builds them on first use too)")
    p.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["small"])
    p.add_argument("--ct2", action="store_true", help="also convert them for CTranslate2")
    args = p.parse_args()
    for shape in args.shape:
        print(checkpoint(shape))
        if args.ct2:
            print(ct2_model(shape))
