"""The engines the benchmark compares, each behind one method: run(docs, decoding) -> outputs in input order.

Engine-only runners (ours, transformers, CTranslate2) get the same documents in the same batches of token
ids and return generated token ids: everything after the decoder start token, up to and including EOS
when the model emitted one (padding dropped). The pipeline runners get the documents' text, as a user's
job would, and return summary text.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

EOS, PAD = 1, 0


@dataclass(frozen=True)
class Decoding:
    """One decoding setting, shared by every engine. XL-Sum's: no_repeat_ngram_size 2, length_penalty 0.6."""

    name: str
    num_beams: int
    max_new_tokens: int = 64
    no_repeat_ngram_size: int = 2
    length_penalty: float = 0.6
    early_stopping: bool = False
    min_new_tokens: int = 0  # max_new_tokens: every output runs to the cap (run.py --to-cap)

    def hf_settings(self) -> dict:
        """generate() keywords for ours and transformers: no forced minimum length unless min_new_tokens."""
        settings = dict(
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
        )
        if self.min_new_tokens:
            settings["min_new_tokens"] = self.min_new_tokens
        return settings


# beam4 is transformers' default rule (early_stopping=False: a source is done when no running beam can
# beat its worst finished one). CTranslate2 has one rule, a source is done once num_beams hypotheses have
# finished (patience 1), which is transformers' early_stopping=True: beam4-early compares like with like.
DECODINGS = {
    "greedy": Decoding("greedy", 1),
    "beam4": Decoding("beam4", 4),
    "beam4-early": Decoding("beam4-early", 4, early_stopping=True),
}


@dataclass
class Context:
    """What every engine is built from: the checkpoint, the device, the batches."""

    shape: str
    checkpoint: Path
    device: str
    threads: int
    batches: list[list[int]]  # document indices, batch by batch (the same for every engine-only runner)
    batch_size: int


def generated_ids(row: list[int]) -> list[int]:
    """Drop the decoder start token; keep up to the first EOS (included); a row without EOS ran to the cap."""
    row = row[1:]
    return row[: row.index(EOS) + 1] if EOS in row else row


def padded(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), longest), PAD, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for n, row in enumerate(ids):
        input_ids[n, : len(row)] = torch.tensor(row)
        mask[n, : len(row)] = 1
    return input_ids, mask


class TorchEngine:
    """A model with a transformers-style generate(): ours or transformers'."""

    output = "ids"

    def __init__(self, ctx: Context, model):
        self.ctx, self.model = ctx, model

    def run(self, docs: list[dict], decoding: Decoding) -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(docs)
        for batch in self.ctx.batches:
            input_ids, mask = padded([docs[i]["ids"] for i in batch])
            with torch.inference_mode():
                result = self.model.generate(
                    input_ids=input_ids.to(self.ctx.device),
                    attention_mask=mask.to(self.ctx.device),
                    **decoding.hf_settings(),
                )
            for i, row in zip(batch, result.cpu().tolist()):
                out[i] = generated_ids(row)
        return out

    def peak_device_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.ctx.device.startswith("cuda") else None


class ContinuousEngine(TorchEngine):
    """Our model with continuous batching (model/decode.py), as the pipeline runs it: the documents
    stream in, in the batches' order, at most batch_size documents at once, and a finished document's
    slot takes the next one. With `compile`, through the compiled decode step (model/compiled_decode.py)."""

    def __init__(self, ctx: Context, model, compile: bool = False):
        super().__init__(ctx, model)
        self.compile = compile

    def run(self, docs: list[dict], decoding: Decoding) -> list[list[int]]:
        from model.decode import generate_stream

        config = self.model.generation_config.updated(**decoding.hf_settings(), compile=self.compile)
        stream = ((i, docs[i]["ids"]) for batch in self.ctx.batches for i in batch)
        out: list[list[int] | None] = [None] * len(docs)
        rows = self.ctx.batch_size * decoding.num_beams
        with torch.inference_mode():
            for i, ids in generate_stream(self.model, stream, config, max_rows=rows):
                out[i] = generated_ids(ids)
        return out


def ours(
    ctx: Context,
    dtype: str = "float32",
    quantization: str = "none",
    vocabulary: int | None = None,
    compile_decode: bool = False,
) -> TorchEngine:
    """Our model as a job loads it; `vocabulary`: keep only that many output ids (see RESTRICTED_VOCAB);
    `compile_decode`: as a job with --compile-decode loads it."""
    from model import load_for_inference

    kept = None if vocabulary is None else range(vocabulary)
    # passed only when set: before_after_issue15.py's NAME@REV engines load revisions that predate it
    extra = {"compile_decode": True} if compile_decode else {}
    return TorchEngine(
        ctx,
        load_for_inference(
            ctx.checkpoint, dtype=dtype, device=ctx.device, quantization=quantization, kept_ids=kept, **extra
        ),
    )


# The restricted output vocabulary of the `…-vocab32k` engines: the first 32,768 ids stand in for "the
# pieces of the languages you summarize" (real mT5 text in a handful of languages uses some tens of
# thousands of its 250k pieces; the benchmark's random-weight model and test tokenizer have no real
# languages to draw them from). Speed only: its quality is measured on a trained model by quality.py.
RESTRICTED_VOCAB = 32768


def transformers_engine(ctx: Context, dtype: str = "float32") -> TorchEngine:
    from transformers import MT5ForConditionalGeneration

    model = MT5ForConditionalGeneration.from_pretrained(ctx.checkpoint, dtype=getattr(torch, dtype)).eval()
    return TorchEngine(ctx, model.to(ctx.device))


class CTranslate2Engine:
    """CTranslate2's translator over the benchmark's batches, one translate_batch each. With `parallel_batches`,
    its way of using several threads for throughput instead: inter_threads translators of one thread each, and
    every document in one translate_batch that it splits into batches (sorted by length first) and runs on those
    translators at once. Each batch holds batch_size / threads documents, so that batch_size are decoded at once in
    all, as our decode streams share out the engine's batch_size (model/decode.py cpu_streams)."""

    output = "ids"

    def __init__(self, ctx: Context, compute_type: str, parallel_batches: bool = False):
        import ctranslate2

        from benchmarks.checkpoints import ct2_model

        self.ctx, self.parallel_batches = ctx, parallel_batches
        folder = ct2_model(ctx.shape)
        device = "cuda" if ctx.device.startswith("cuda") else "cpu"
        self.translator = ctranslate2.Translator(
            str(folder),
            device=device,
            compute_type=compute_type,
            inter_threads=ctx.threads if parallel_batches else 1,
            intra_threads=1 if parallel_batches else ctx.threads if device == "cpu" else 0,
        )
        # The converter writes the vocabulary in id order; ids past the real pieces repeat extra ids, so the
        # reverse map keeps each token's first id (generation never reaches those padding rows).
        self.vocab = json.loads((folder / "shared_vocabulary.json").read_text(encoding="utf-8"))
        self.ids = {}
        for i, token in enumerate(self.vocab):
            self.ids.setdefault(token, i)

    def run(self, docs: list[dict], decoding: Decoding) -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(docs)
        batches = [[i for batch in self.ctx.batches for i in batch]] if self.parallel_batches else self.ctx.batches
        for batch in batches:
            # Our ids already end with </s>; CTranslate2 adds nothing to a T5 source (add_source_eos false).
            source = [[self.vocab[t] for t in docs[i]["ids"]] for i in batch]
            results = self.translator.translate_batch(
                source,
                max_batch_size=-(-self.ctx.batch_size // self.ctx.threads) if self.parallel_batches else 0,
                beam_size=decoding.num_beams,
                length_penalty=decoding.length_penalty,
                no_repeat_ngram_size=decoding.no_repeat_ngram_size,
                max_decoding_length=decoding.max_new_tokens,
                min_decoding_length=decoding.min_new_tokens,
                return_end_token=True,
                return_scores=False,
            )
            for i, result in zip(batch, results):
                out[i] = [self.ids[t] for t in result.hypotheses[0]]
        return out

    def peak_device_bytes(self) -> int | None:
        return None


class PipelineEngine:
    """pipeline.stages.Summarizer in this process: tokenize -> continuous batching -> detokenize,
    on the model thread, with the same model object as ours-fp32 when both run."""

    output = "text"

    def __init__(self, ctx: Context, model=None):
        from model import MT5Tokenizer

        self.ctx = ctx
        self.model = model or ours(ctx).model
        self.tokenizer = MT5Tokenizer.from_pretrained(ctx.checkpoint)

    def settings(self, decoding: Decoding):
        from pipeline.settings import SummarizeSettings

        if decoding.min_new_tokens:
            raise ValueError("the pipeline's settings have no minimum length: run --to-cap without pipeline engines")

        # float32 everywhere, so that end-to-end compares with ours-fp32 (the job's auto is bfloat16 on GPU)
        return SummarizeSettings(
            model=str(self.ctx.checkpoint),
            dtype="float32",
            max_new_tokens=decoding.max_new_tokens,
            num_beams=decoding.num_beams,
            no_repeat_ngram_size=decoding.no_repeat_ngram_size,
            length_penalty=decoding.length_penalty,
            batch_size=self.ctx.batch_size,
        )

    def run(self, docs: list[dict], decoding: Decoding) -> list[str]:
        import pyarrow as pa

        from pipeline.stages import Summarizer

        summarizer = Summarizer(self.model, self.tokenizer, self.settings(decoding))
        try:
            table = pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]})
            out, _ = summarizer.summarize_table(table)
        finally:
            summarizer.close()
        return out.column("summary").to_pylist()

    def peak_device_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.ctx.device.startswith("cuda") else None


class RayPipelineEngine(PipelineEngine):
    """jobs/summarize.py's path: pipeline.driver.run on a local Ray, one replica with every core.

    Each run is a whole job: plan, replica start and model load, read, summarize, commit. The time to
    start the replica and load the model is measured apart (`startup_seconds`) so it can be subtracted.
    """

    def __init__(self, ctx: Context, model=None):
        import ray

        self.ctx = ctx
        self.workdir = Path(tempfile.mkdtemp(prefix="lakesum-bench-"))
        atexit.register(shutil.rmtree, self.workdir, ignore_errors=True)
        self.runs = 0
        self.startup: list[float] = []
        if not ray.is_initialized():  # a Ray of its own, even where another one runs on this machine
            ray.init(
                address="local",
                num_cpus=ctx.threads,
                num_gpus=1 if ctx.device.startswith("cuda") else 0,
                include_dashboard=False,
                logging_level="error",
                log_to_driver=False,
            )

    def run(self, docs: list[dict], decoding: Decoding) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.driver import run

        self.runs += 1
        source = self.workdir / f"input-{self.runs}"
        source.mkdir()
        pq.write_table(
            pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]}), source / "docs.parquet"
        )
        output = self.workdir / f"output-{self.runs}"
        with open(os.devnull, "w") as quiet:
            report = run(
                self.settings(decoding),
                str(source),
                str(output),
                replicas=1,
                cpus_per_replica=self.ctx.threads,
                progress_every=3600.0,
                out=quiet,
            )
        if not report.success:
            raise RuntimeError(f"the pipeline failed: {report.failed}")
        table = pq.read_table(output / "docs.parquet")
        return table.column("summary").to_pylist()

    def measure_startup(self) -> float:
        """Seconds for an empty-ish job (one one-word document, one new token): replica start, model load, commit."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.driver import run

        self.runs += 1
        source = self.workdir / f"input-{self.runs}"
        source.mkdir()
        pq.write_table(pa.table({"id": ["x"], "text": ["x"]}), source / "docs.parquet")
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet:
            run(
                self.settings(Decoding("startup", 1, max_new_tokens=1)),
                str(source),
                str(self.workdir / f"output-{self.runs}"),
                replicas=1,
                cpus_per_replica=self.ctx.threads,
                progress_every=3600.0,
                out=quiet,
            )
        return time.perf_counter() - start

    def peak_device_bytes(self) -> int | None:
        return None


# name -> (devices it runs on, builder). `shared` lets the in-process pipeline reuse ours-fp32's model.
ENGINES = {
    "ours-fp32": (("cpu", "cuda"), lambda ctx, shared: ours(ctx)),
    "ours-bf16": (("cpu", "cuda"), lambda ctx, shared: ours(ctx, dtype="bfloat16")),
    "ours-int8-dynamic": (("cpu",), lambda ctx, shared: ours(ctx, quantization="int8-dynamic")),
    "ours-fp32-vocab32k": (("cpu", "cuda"), lambda ctx, shared: ours(ctx, vocabulary=RESTRICTED_VOCAB)),
    "ours-int8-dynamic-vocab32k": (
        ("cpu",),
        lambda ctx, shared: ours(ctx, quantization="int8-dynamic", vocabulary=RESTRICTED_VOCAB),
    ),
    "ours-fp32-continuous": (
        ("cpu", "cuda"),
        lambda ctx, shared: ContinuousEngine(
            ctx, shared["ours-fp32"].model if "ours-fp32" in shared else ours(ctx).model
        ),
    ),
    "ours-fp32-compiled": (
        ("cpu", "cuda"),
        lambda ctx, shared: ContinuousEngine(ctx, ours(ctx, compile_decode=True).model, compile=True),
    ),
    "ours-bf16-continuous": (("cuda",), lambda ctx, shared: ContinuousEngine(ctx, ours(ctx, dtype="bfloat16").model)),
    "ours-bf16-compiled": (
        ("cuda",),
        lambda ctx, shared: ContinuousEngine(ctx, ours(ctx, dtype="bfloat16", compile_decode=True).model, compile=True),
    ),
    "ours-int8-dynamic-continuous": (
        ("cpu",),
        lambda ctx, shared: ContinuousEngine(ctx, ours(ctx, quantization="int8-dynamic").model),
    ),
    "ours-int8-dynamic-vocab32k-continuous": (
        ("cpu",),
        lambda ctx, shared: ContinuousEngine(
            ctx, ours(ctx, quantization="int8-dynamic", vocabulary=RESTRICTED_VOCAB).model
        ),
    ),
    # in the dtype a job runs in there (--dtype auto): float32 on CPU, bfloat16 on a GPU with it
    "ours-int8-weight-only": (
        ("cpu", "cuda"),
        lambda ctx, shared: ours(ctx, dtype="auto", quantization="int8-weight-only"),
    ),
    "ours-bf16-int8-weight-only": (
        ("cpu",),
        lambda ctx, shared: ours(ctx, dtype="bfloat16", quantization="int8-weight-only"),
    ),
    "ours-bnb-int8": (("cpu", "cuda"), lambda ctx, shared: ours(ctx, quantization="int8")),
    "ours-bnb-nf4": (("cpu", "cuda"), lambda ctx, shared: ours(ctx, quantization="nf4")),
    "transformers-fp32": (("cpu", "cuda"), lambda ctx, shared: transformers_engine(ctx)),
    "transformers-bf16": (("cuda",), lambda ctx, shared: transformers_engine(ctx, "bfloat16")),
    "ct2-fp32": (("cpu",), lambda ctx, shared: CTranslate2Engine(ctx, "float32")),
    "ct2-int8": (("cpu",), lambda ctx, shared: CTranslate2Engine(ctx, "int8")),
    "ct2-int8-parallel-batches": (("cpu",), lambda ctx, shared: CTranslate2Engine(ctx, "int8", parallel_batches=True)),
    "ct2-bf16": (("cuda",), lambda ctx, shared: CTranslate2Engine(ctx, "bfloat16")),
    "ct2-int8-bf16": (("cuda",), lambda ctx, shared: CTranslate2Engine(ctx, "int8_bfloat16")),
    "pipeline": (
        ("cpu", "cuda"),
        lambda ctx, shared: PipelineEngine(ctx, shared["ours-fp32"].model if "ours-fp32" in shared else None),
    ),
    "pipeline-ray": (("cpu", "cuda"), lambda ctx, shared: RayPipelineEngine(ctx)),
}

# --engines accepts these group names; each expands to the members that run on the device.
GROUPS = {
    "ours": ["ours-fp32", "ours-bf16", "ours-int8-dynamic", "ours-int8-weight-only"],
    "vocab": ["ours-fp32-vocab32k", "ours-int8-dynamic-vocab32k"],
    "continuous": ["ours-fp32-continuous", "ours-int8-dynamic-continuous", "ours-int8-dynamic-vocab32k-continuous"],
    # the compiled decode step, and the eager continuous engine it replaces in bf16. The first run of a decoding
    # compiles its buckets, which run.py's warm-up (shorter outputs) does not all meet: benchmarks/compiled_decode.py
    # times the step without compiles
    "compiled": ["ours-fp32-compiled", "ours-bf16-continuous", "ours-bf16-compiled"],
    "bnb": ["ours-bnb-int8", "ours-bnb-nf4"],
    "transformers": ["transformers-fp32", "transformers-bf16"],
    "ct2": ["ct2-fp32", "ct2-int8", "ct2-bf16", "ct2-int8-bf16"],
    "pipeline": ["pipeline", "pipeline-ray"],
}

# The references of the ratio columns, per device.
BASELINES = {"cpu": ("transformers-fp32", "ct2-int8"), "cuda": ("transformers-bf16", "ct2-bf16")}


def expand(names: list[str], device: str) -> list[str]:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    out: list[str] = []
    for name in names:
        if name in GROUPS:
            members = [m for m in GROUPS[name] if kind in ENGINES[m][0]]
        elif name in ENGINES:
            if kind not in ENGINES[name][0]:
                raise SystemExit(f"engine {name!r} does not run on {device}")
            members = [name]
        else:
            raise SystemExit(
                f"unknown engine {name!r}; use a group ({', '.join(GROUPS)}) or one of {', '.join(ENGINES)}"
            )
        out += [m for m in members if m not in out]
    if "ours-fp32" not in out:  # the reference of token agreement
        out.insert(0, "ours-fp32")
    return out


def build(name: str, ctx: Context, shared: dict):
    return ENGINES[name][1](ctx, shared)
