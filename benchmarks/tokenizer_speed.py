"""Tokenizing and detokenizing speed on real multilingual text, against what one GPU replica would need.

    .venv/bin/python benchmarks/tokenizer_speed.py --out benchmarks/results/tokenizer-speed.json
    .venv/bin/python benchmarks/tokenizer_speed.py --baseline e8f754c --out ...  # and the tokenizer of that commit
    .venv/bin/python benchmarks/tokenizer_speed.py --pipeline-workers 0,1,2 --out ...  # the pipeline's stage

A replica tokenizes the next documents and detokenizes the last summaries on its CPU while the accelerator
decodes. This measures characters per second on one core, for
- ours: model.tokenizer.MT5Tokenizer (`tok(docs)`, `tok.batch_decode(ids, skip_special_tokens=True)`);
- transformers: T5TokenizerFast on the same spiece.model (the 250,100 ids of mT5's layout), Rust `tokenizers`;
- sentencepiece: SentencePieceProcessor.encode / decode on the raw text (not the same ids on all text: see
  model/tokenizer.py), num_threads=1;
on Django's translations in 99 languages (synthetic/real_text.py), cut into documents of --doc-chars, with a
unigram model trained on that text (--vocab-size pieces, padded to mT5's 250,000 as the test fixture is). Per
script family and in all. "cold": a tokenizer just loaded, its word cache empty, one pass over the documents (the
cache fills as it goes, as in a replica's first documents); "warm": the same documents again.

CPU seconds (time.process_time) of this one thread, the best of --repeats, not wall time: the machine these ran
on is shared, and wall time there is noisy. Rust and sentencepiece are kept to one thread (RAYON_NUM_THREADS=1,
num_threads=1), and process time would count any other thread too.

The GPU side is a roofline, not a measurement (see `gpu_need`), beside CTranslate2's published GPU figures.

--pipeline-workers measures instead the pipeline's tokenize stage itself (`pipeline_stage`): Summarizer.stream over
the documents as an Arrow table, with no model behind it, tokenizing in the replica's thread (0) or in a pool of
that many worker processes (pipeline/tokenize_pool.py). Wall time, since the work is in other processes: chars/s
of the stage; the CPU seconds left to the replica's own thread per M characters; and M chars/s per core busy, from
the CPU time of the replica and its workers (reaped workers' rusage, less what starting a pool costs).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported: one thread, as ours has
os.environ["RAYON_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "benchmarks" / ".cache" / "tokenizer-speed"

# A language's family is the script of most of its letters
FAMILIES = {
    "LATIN": "latin",
    "CYRILLIC": "cyrillic",
    **dict.fromkeys(["CJK", "HIRAGANA", "KATAKANA", "THAI", "KHMER", "LAO", "MYANMAR"], "cjk-thai (unspaced)"),
    **dict.fromkeys(
        ["ARABIC", "DEVANAGARI", "BENGALI", "GURMUKHI", "GUJARATI", "ORIYA", "TAMIL", "TELUGU", "KANNADA"]
        + ["MALAYALAM", "SINHALA"],
        "arabic-indic",
    ),
}


def family(messages: list[str]) -> str:
    scripts = collections.Counter(
        unicodedata.name(c, "?").split()[0] for message in messages[:300] for c in message if c.isalpha()
    )
    return FAMILIES.get(scripts.most_common(1)[0][0], "other (Greek, Hebrew, Hangul, ...)")


def corpus(doc_chars: int) -> dict[str, list[str]]:
    """family -> documents of doc_chars characters: each language's messages joined, then cut."""
    from synthetic.real_text import django_translations

    documents = collections.defaultdict(list)
    for messages in django_translations().values():
        text = " ".join(messages)
        documents[family(messages)] += [text[start : start + doc_chars] for start in range(0, len(text), doc_chars)]
    return dict(sorted(documents.items()))


def spiece_dir(vocab_size: int) -> Path:
    """A unigram model trained on all of Django's translations, in mT5's layout; cached."""
    from synthetic.real_text import django_translations
    from synthetic.spiece import pad_to_mt5_size, train_unigram

    directory = CACHE / f"django-{vocab_size}"
    if not (directory / "spiece.model").exists():
        lines = [message for messages in django_translations().values() for message in messages]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "spiece.model").write_bytes(pad_to_mt5_size(train_unigram(lines, vocab_size=vocab_size)))
    return directory


def tokenizer_at(revision: str):
    """MT5Tokenizer as model/tokenizer.py was at a git revision (imported as a module of the model package)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:model/tokenizer.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = CACHE / f"tokenizer_{revision}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    import model

    spec = importlib.util.spec_from_file_location(f"model._tokenizer_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = model.__name__
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.MT5Tokenizer


def engines(directory: Path, baseline: str | None) -> dict:
    """name -> (load: () -> tokenizer, encode: (tok, docs) -> ids, decode: (tok, ids) -> texts)."""
    import sentencepiece as spm
    import transformers

    from model.tokenizer import MT5Tokenizer

    fast_dir = CACHE / f"{directory.name}-fast"  # tokenizer.json saved once: loads in a second, not a conversion
    if not (fast_dir / "tokenizer.json").exists():
        transformers.T5TokenizerFast.from_pretrained(str(directory), legacy=True).save_pretrained(str(fast_dir))
    model_file = str(directory / "spiece.model")
    found = {
        "ours": (
            lambda: MT5Tokenizer.from_pretrained(directory),
            lambda tok, docs: tok(docs)["input_ids"],
            lambda tok, ids: tok.batch_decode(ids, skip_special_tokens=True),
        ),
        "transformers-fast": (
            lambda: transformers.T5TokenizerFast.from_pretrained(str(fast_dir)),
            lambda tok, docs: tok(docs)["input_ids"],
            lambda tok, ids: tok.batch_decode(ids, skip_special_tokens=True),
        ),
        "sentencepiece": (
            lambda: spm.SentencePieceProcessor(model_file=model_file),
            lambda tok, docs: tok.encode(docs, num_threads=1),  # no </s>: it has no control pieces to skip
            lambda tok, ids: tok.decode(ids, num_threads=1),
        ),
    }
    if baseline:
        cls = tokenizer_at(baseline)
        found[f"ours@{baseline}"] = (lambda: cls.from_pretrained(directory), *found["ours"][1:])
    return found


def cpu_seconds(work, *args) -> tuple[float, object]:
    start = time.process_time()
    result = work(*args)
    return time.process_time() - start, result


def measure(engines: dict, documents: dict[str, list[str]], repeats: int) -> tuple[list[dict], dict[str, list]]:
    """Rows of chars/s per tokenizer and family, and in all (cold, warm, decode); each tokenizer's ids of all
    documents. The tokenizers take turns within each repeat, so that other load on the machine hits each alike."""
    rows, ids = [], {}
    everything = [document for family_docs in documents.values() for document in family_docs]
    for group, docs in [*documents.items(), ("all", everything)]:
        chars = sum(map(len, docs))
        seconds = {name: {"cold": [], "warm": [], "decode": []} for name in engines}
        texts = {}
        for _ in range(repeats):
            for name, (load, encode, decode) in engines.items():
                tok = load()
                cold, ids[name] = cpu_seconds(encode, tok, docs)
                seconds[name]["cold"].append(cold)
                seconds[name]["warm"].append(cpu_seconds(encode, tok, docs)[0])
                decoded, texts[name] = cpu_seconds(decode, tok, ids[name])
                seconds[name]["decode"].append(decoded)
        for name in engines:
            best = {kind: min(values) for kind, values in seconds[name].items()}
            tokens = sum(map(len, ids[name]))
            rows.append(
                {
                    "tokenizer": name,
                    "family": group,
                    "documents": len(docs),
                    "chars": chars,
                    "tokens": tokens,
                    "encode_cold_mchars_per_s": round(chars / best["cold"] / 1e6, 3),
                    "encode_warm_mchars_per_s": round(chars / best["warm"] / 1e6, 3),
                    "decode_mchars_per_s": round(sum(map(len, texts[name])) / best["decode"] / 1e6, 3),
                    "decode_mtokens_per_s": round(tokens / best["decode"] / 1e6, 3),
                    "seconds": seconds[name],
                }
            )
            print(
                f"{name:>22} {group:>36} cold {rows[-1]['encode_cold_mchars_per_s']:6.2f}  warm "
                f"{rows[-1]['encode_warm_mchars_per_s']:6.2f}  decode {rows[-1]['decode_mchars_per_s']:6.2f} M chars/s",
                flush=True,
            )
    return rows, ids


# Seconds the tokenize workers are given to start (import torch, unpickle the tokenizer: about 10 s on a loaded
# 2-core machine) before the stage is timed: a replica starts them once, while its model loads.
START_SECONDS = 20


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pipeline_stage(directory: Path, documents: list[str], workers: list[int], repeats: int) -> list[dict]:
    """Rows of the tokenize stage's chars/s (wall) with each count of workers, cold (workers and tokenizer just
    started) and warm (the same documents again), best of `repeats`; the workers take turns within each repeat."""
    import types

    import pyarrow as pa
    import torch

    from model.generate import GenerationConfig
    from model.tokenizer import MT5Tokenizer
    from pipeline.settings import SummarizeSettings
    from pipeline.stages import Stats, Summarizer

    table = pa.table({"text": documents})
    chars = sum(map(len, documents))
    no_model = types.SimpleNamespace(generation_config=GenerationConfig(), device=torch.device("cpu"))
    settings = SummarizeSettings(model="none")  # the job's defaults: 512 input tokens, windows of 256 rows
    seconds = {n: {"cold": [], "warm": [], "caller_cpu_cold": [], "all_cpu_both": []} for n in workers}
    ids: dict[int, list] = {}
    for _ in range(repeats):
        for n in workers:
            # the workers' CPU is counted once they are reaped (close): a pool started and closed at once gives
            # what starting costs, taken off the CPU of the pool that tokenized
            start_cpu = children_cpu()
            if n:
                Summarizer(no_model, MT5Tokenizer.from_pretrained(directory), settings, n).close()
            start_cpu = children_cpu() - start_cpu
            before_cpu, caller_cpu = children_cpu(), 0.0
            summarizer = Summarizer(no_model, MT5Tokenizer.from_pretrained(directory), settings, n)
            kept: list = []
            # the stage alone: a window's ids are kept rather than sent to a model
            summarizer._submit = lambda window: window
            summarizer._finish = lambda window, kept=kept: (kept.append(window.ids) or table.slice(0, 0), window.stats)
            try:
                if summarizer._pool is not None:  # started: the workers have loaded torch and the tokenizer
                    summarizer._pool.encode([""]).result()
                    time.sleep(START_SECONDS)
                for kind in ("cold", "warm"):
                    kept.clear()
                    wall, cpu = time.perf_counter(), time.process_time()
                    for _ in summarizer.stream(table.to_batches(), Stats()):
                        pass
                    seconds[n][kind].append(time.perf_counter() - wall)
                    caller_cpu += time.process_time() - cpu
                    if kind == "cold":
                        seconds[n]["caller_cpu_cold"].append(time.process_time() - cpu)
                ids[n] = [row for window in kept for _, row in sorted(window.items())]
            finally:
                summarizer.close()
            seconds[n]["all_cpu_both"].append(caller_cpu + children_cpu() - before_cpu - start_cpu)
    rows = []
    for n in workers:
        best = {kind: min(values) for kind, values in seconds[n].items()}
        rows.append(
            {
                "tokenize_workers": n,
                "documents": len(documents),
                "chars": chars,
                "same_ids_as_0_workers": ids[n] == ids[workers[0]] if workers[0] == 0 else None,
                "stage_cold_mchars_per_s": round(chars / best["cold"] / 1e6, 3),
                "stage_warm_mchars_per_s": round(chars / best["warm"] / 1e6, 3),
                "caller_cpu_s_per_mchars_cold": round(best["caller_cpu_cold"] / (chars / 1e6), 3),
                # the replica's and its workers' CPU, cold and warm passes together: M chars/s per core busy
                "per_core_mchars_per_s_both": round(2 * chars / best["all_cpu_both"] / 1e6, 3),
                "seconds": seconds[n],
            }
        )
        print(
            f"{n} workers: cold {rows[-1]['stage_cold_mchars_per_s']:6.2f}  "
            f"warm {rows[-1]['stage_warm_mchars_per_s']:6.2f} M chars/s (wall); the replica's thread "
            f"{rows[-1]['caller_cpu_s_per_mchars_cold']:.2f} CPU s per M chars; all processes "
            f"{rows[-1]['per_core_mchars_per_s_both']:.2f} M chars/s per core (cold and warm)",
            flush=True,
        )
    return rows


# Decoder weights read per step, in parameters: per layer self-attention and cross-attention (q, k, v, o:
# 4 x d_model x inner) and the gated feed-forward (3 x d_model x d_ff), plus the untied head (vocab x d_model).
SHAPES = {
    "mt5-small": dict(d_model=512, inner=384, d_ff=1024, decoder_layers=8, vocab=250_112),
    "mt5-base": dict(d_model=768, inner=768, d_ff=2048, decoder_layers=12, vocab=250_112),
}


def gpu_need(doc_chars: int, new_tokens: int, source_tokens: int, bandwidth: float, bytes_per_param: int) -> list:
    """Documents/s of one replica if each decode step only read its weights (bf16) at `bandwidth` bytes/s: an upper
    bound (the encoder, the cross-attention keys and values and the launches all cost more). Also the bound with
    the cross-attention keys and values read too (source_tokens per row), which batch size does not amortize."""
    rows = []
    for shape, s in SHAPES.items():
        per_layer = 2 * 4 * s["d_model"] * s["inner"] + 3 * s["d_model"] * s["d_ff"]
        params = s["decoder_layers"] * per_layer + s["vocab"] * s["d_model"]
        step = params * bytes_per_param / bandwidth
        kv_per_row = s["decoder_layers"] * source_tokens * s["inner"] * 2 * bytes_per_param
        for batch in (64, 256):
            docs = batch / (new_tokens * step)
            docs_kv = batch / (new_tokens * (params * bytes_per_param + batch * kv_per_row) / bandwidth)
            rows.append(
                {
                    "shape": shape,
                    "batch": batch,
                    "weights_gb_per_step": round(params * bytes_per_param / 1e9, 3),
                    "step_us": round(step * 1e6, 1),
                    "docs_per_s_weights_only": round(docs),
                    "mchars_per_s_weights_only": round(docs * doc_chars / 1e6, 1),
                    "docs_per_s_with_cross_kv": round(docs_kv),
                    "mchars_per_s_with_cross_kv": round(docs_kv * doc_chars / 1e6, 1),
                }
            )
    return rows


# CTranslate2's README (3.6.0 benchmark): a Transformer-base En->De model (OpenNMT-py WMT14), beam 4, batch 32, on an
# NVIDIA A10G (600 GB/s): 10,990.7 target tokens/s in float16, 8,567.2 in int8.
CT2_PUBLISHED = {"gpu": "A10G", "bandwidth_gb_per_s": 600, "model": "Transformer-base", "tokens_per_s_fp16": 10990.7}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc-chars", type=int, default=2000)
    p.add_argument("--vocab-size", type=int, default=32_000, help="pieces trained on the corpus before padding")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokenizers", default="ours,transformers-fast,sentencepiece")
    p.add_argument("--baseline", help="also time model/tokenizer.py as of this git revision")
    p.add_argument("--new-tokens", type=int, default=64, help="summary length, for the GPU roofline")
    p.add_argument("--bandwidth-tb-s", type=float, default=4.8, help="H200: 4.8 TB/s (H100 SXM: 3.35)")
    p.add_argument(
        "--pipeline-workers", help="comma-separated tokenize worker counts: time the pipeline's stage (only that)"
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    from tests.environment import cpu

    documents = corpus(args.doc_chars)
    directory = spiece_dir(args.vocab_size)
    if args.pipeline_workers:
        everything = [document for family_docs in documents.values() for document in family_docs]
        load_average = os.getloadavg()
        rows = pipeline_stage(directory, everything, [int(n) for n in args.pipeline_workers.split(",")], args.repeats)
        model, flags = cpu()
        report = {
            "benchmark": "the pipeline's tokenize stage, chars/s (wall), by tokenize worker processes",
            "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": model, "simd": flags, "cores": os.cpu_count(), "python": sys.version.split()[0]},
            "load_average": [load_average, os.getloadavg()],
            "note": "wall time: the workers' CPU is not this process's; on a shared machine it is as loaded as it was",
            "results": rows,
        }
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"wrote {args.out}", file=sys.stderr)
        return
    found = engines(directory, args.baseline)
    names = args.tokenizers.split(",") + ([f"ours@{args.baseline}"] if args.baseline else [])
    load_average = os.getloadavg()
    rows, ids = measure({name: found[name] for name in names}, documents, args.repeats)
    # documents whose ids differ from transformers' (sentencepiece's with </s> appended, as T5's tokenizer does)
    expected = ids.get("transformers-fast")
    parity = {
        name: sum(a != b for a, b in zip([s + [1] for s in got] if name == "sentencepiece" else got, expected))
        for name, got in ids.items()
        if expected is not None
    }

    chars_per_token = sum(r["chars"] for r in rows if r["family"] == "all") / sum(
        r["tokens"] for r in rows if r["family"] == "all"
    )
    need = gpu_need(
        args.doc_chars,
        args.new_tokens,
        min(512, round(args.doc_chars / chars_per_token)),
        args.bandwidth_tb_s * 1e12,
        2,
    )
    ct2_h200_tokens = (
        CT2_PUBLISHED["tokens_per_s_fp16"] * args.bandwidth_tb_s * 1000 / CT2_PUBLISHED["bandwidth_gb_per_s"]
    )
    ct2_docs = ct2_h200_tokens / args.new_tokens
    ours_all = {r["tokenizer"]: r for r in rows if r["family"] == "all"}
    verdict = []
    for name, r in ours_all.items():
        for label, chars_needed in [
            ("ctranslate2 published, scaled to this bandwidth", ct2_docs * args.doc_chars),
            *[
                (f"{n['shape']} batch {n['batch']} weights-only roofline", n["mchars_per_s_weights_only"] * 1e6)
                for n in need
            ],
            *[
                (
                    f"{n['shape']} batch {n['batch']} roofline with cross-attention kv",
                    n["mchars_per_s_with_cross_kv"] * 1e6,
                )
                for n in need
            ],
        ]:
            verdict.append(
                {
                    "tokenizer": name,
                    "gpu": label,
                    "mchars_per_s_needed": round(chars_needed / 1e6, 2),
                    "cores_needed_cold": round(chars_needed / (r["encode_cold_mchars_per_s"] * 1e6), 2),
                    "cores_needed_warm": round(chars_needed / (r["encode_warm_mchars_per_s"] * 1e6), 2),
                }
            )
    print(f"\ndocuments of {sum(map(len, documents.values()))} whose ids differ from transformers': {parity}")
    print(f"chars per token: {chars_per_token:.2f}")
    for n in need:
        print(n)
    print(f"CTranslate2 published (A10G fp16, beam 4) scaled to {args.bandwidth_tb_s} TB/s: {ct2_docs:.0f} docs/s")
    for v in verdict:
        print(v)

    model, flags = cpu()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    report = {
        "benchmark": "tokenizer chars/s on one core (CPU time), Django's translations, vs one GPU replica's need",
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": model,
            "simd": flags,
            "cores": os.cpu_count(),
            "lscpu_flags": next(
                (line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), []
            ),
            "python": sys.version.split()[0],
            "packages": {m: __import__(m).__version__ for m in ("transformers", "tokenizers", "sentencepiece")},
            "note": "2 cores shared with other jobs: CPU time of one thread, best of the repeats; wall time was noisy",
        },
        "load_average": [load_average, os.getloadavg()],
        "setup": {
            "doc_chars": args.doc_chars,
            "vocab_size_trained": args.vocab_size,
            "pieces": 250_000,
            "repeats": args.repeats,
            "documents_per_family": {f: len(d) for f, d in documents.items()},
        },
        "documents_with_ids_other_than_transformers": parity,
        "chars_per_token": round(chars_per_token, 3),
        "results": rows,
        "gpu_need": {
            "bandwidth_tb_s": args.bandwidth_tb_s,
            "new_tokens": args.new_tokens,
            "bf16": True,
            "roofline": need,
            "ctranslate2_published": {**CT2_PUBLISHED, "scaled_docs_per_s": round(ct2_docs)},
        },
        "cores_needed": verdict,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
