"""The GPU path checked end to end in one run: parity, quantization, fine-tuning, speed, the decode step
against the bandwidth bound, the pipeline, and the load's peak memory (issue 14). The compiled decode step
(--compile-decode) is checked in three of them: its speed beside eager and transformers (bf16 and int8
weight-only), its float32 tokens against eager's (int8 weight-only), and the pipeline's own stages through it.

    python3 benchmarks/gpu_check.py --device cuda --out $OUT/gpu-check-h200.json   # all: over a 10-minute call
    python3 benchmarks/gpu_check.py --device cuda --parts quantization,load,pipeline,speed --speed-shapes small
    .venv/bin/python benchmarks/gpu_check.py --device cpu                            # the tiny shape, about a minute

Everything is built here, without a network: random checkpoints of mt5-small's and mt5-base's shapes on CUDA
(the tiny test shape on CPU) through synthetic/ and benchmarks/checkpoints.py, and the corpus's documents. Each
check is one function returning one row; a check that raises is recorded as failed with its error, and the
others still run. A check whose package is missing (ctranslate2, bitsandbytes) is skipped and says so. Ray is
never imported: the lent GPU machine has none, so the pipeline's stages run in this process (pipeline.stages,
as inside a replica), and the Ray job's figure is an estimate, labelled as one. On CPU the compiled checks are
skipped unless --compile-backend is given (eager: their code path in seconds).
Prints a table and writes one JSON; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import checkpoints  # noqa: E402
from benchmarks.engines import DECODINGS, Context, Decoding, build, padded  # noqa: E402
from benchmarks.run import agreement, machine  # noqa: E402
from synthetic.checkpoints import TINY, build_trainable_checkpoint  # noqa: E402

PASSED, FAILED, SKIPPED, NOT_BUILT = "passed", "failed", "skipped", "not built"
PARTS = ("parity", "quantization", "fine-tuning", "speed", "decode-step", "pipeline", "load")

# Ours within this many times transformers' own error against a float32 reference: the tests' argument
# (tests/model/helpers.py, ROUNDING_MARGIN). bf16 keeps 8 significant bits (unit roundoff 2^-9, a relative
# step of 2^-8 = 0.4%), so two correct bf16 implementations differ from float32 by errors of the same order,
# each rounding at slightly different places (fused q|k|v, SDPA against matmul-softmax-matmul); an absolute
# bound would depend on the logits' size and on the device's kernels, a ratio of the two errors does not.
BF16_MARGIN = 4.0
# Lowest per-position cosine of our bitsandbytes logits to transformers' with the same bitsandbytes: the same
# quantized codes on both sides (int8 identical, 4-bit up to the double quantization's 8-bit absmax, which
# test_quantize.py measures at cosine > 0.9997 on the tiny shape), so only rounding outside the kernels differs.
BNB_MIN_COSINE = 0.999

# Memory bandwidth of the devices this check is meant for, from the vendors' data sheets (bytes/s).
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12}


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: real shapes on CUDA, the tiny test shape on CPU (where mt5-small takes minutes)."""

    parity_shape: str
    speed_shapes: tuple[str, ...]
    train_shape: str
    parity_docs: int
    speed_docs: int
    batch_size: int
    max_new_tokens: int
    repeats: int
    train_steps: int
    train_batch: int
    train_input_tokens: int
    train_target_tokens: int
    # The compiled engines' speed rows: each compiles a graph per (rows, source width) bucket its decodes meet,
    # seconds apiece on a GPU, so on the first speed shape only
    compiled_shapes: tuple[str, ...]
    pipeline_docs: int  # the pipeline stages' table (two rows without text are added)
    pipeline_exact_docs: int  # its first rows, which the float32 identity check decodes (a compile per bucket)
    pipeline_batch: int
    load_shape: str  # the shape whose load's peak memory is measured


PLANS = {
    "cuda": Plan(
        "small", ("small", "base"), "small", 8, 32, 16, 64, 2, 20, 32, 128, 16, ("small",), 256, 64, 16, "base"
    ),
    # CPU trains synthetic/'s small trainable model (a 4,096-id vocabulary): 250k-id steps take seconds there
    "cpu": Plan("tiny", ("tiny",), "trainable", 4, 8, 4, 16, 1, 20, 4, 32, 8, ("tiny",), 12, 12, 4, "tiny"),
}
BASE_SHAPES = {"tiny": TINY, **checkpoints.SHAPES}


# --- the setting every check shares ---------------------------------------------------------------------


@dataclass
class Run:
    device: str  # "cuda" or "cpu"
    plan: Plan
    threads: int
    written_by_ours: bool  # transformers 5.x writes mT5 tied: then our save_pretrained writes the checkpoints
    speed: dict  # the speed checks' figures, which the pipeline estimate reads
    compile_backend: str | None  # None: the compiled checks are skipped (on CPU unless --compile-backend says)
    documents_by_shape: dict = field(default_factory=dict)  # loading the 250k-piece tokenizer takes seconds
    bf16_weight_bytes: int | None = None  # the load shape's, which the unquantized load check counts

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def shape_key(self, shape: str) -> str:
        """The checkpoint's name under benchmarks/.cache, registered with checkpoints.SHAPES so that its
        checkpoint and its CTranslate2 conversion are built and cached the way run.py's are."""
        key = f"{shape}-ours" if self.written_by_ours else shape
        checkpoints.SHAPES.setdefault(key, BASE_SHAPES[shape])
        folder = checkpoints.CACHE / f"mt5-{key}"
        if self.written_by_ours and not (folder / checkpoints.DONE).exists():
            build_with_ours(folder, BASE_SHAPES[shape])
            (folder / checkpoints.DONE).write_text(json.dumps(BASE_SHAPES[shape]))
        return key

    def context(self, shape: str, docs: list[dict], batch_size: int) -> Context:
        key = self.shape_key(shape)
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i]["ids"]))  # longest first, as run.py
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return Context(key, checkpoints.checkpoint(key), self.device, self.threads, batches, batch_size)

    def train_checkpoint(self) -> Path:
        if self.plan.train_shape != "trainable":
            return checkpoints.checkpoint(self.shape_key(self.plan.train_shape))
        folder = checkpoints.CACHE / "trainable"
        if not (folder / checkpoints.DONE).exists():
            build_trainable_checkpoint(folder, checkpoints.spiece_model())
            (folder / checkpoints.DONE).write_text("")
        return folder

    def documents(self, shape: str, count: int) -> list[dict]:
        from model import MT5Tokenizer

        if (shape, count) not in self.documents_by_shape:
            tokenizer = MT5Tokenizer.from_pretrained(checkpoints.checkpoint(self.shape_key(shape)))
            self.documents_by_shape[(shape, count)] = checkpoints.documents(count, tokenizer)
        return self.documents_by_shape[(shape, count)]

    def decoding(self, name: str) -> Decoding:
        d = DECODINGS[name]
        return Decoding(d.name, d.num_beams, self.plan.max_new_tokens, d.no_repeat_ngram_size, d.length_penalty)


def build_with_ours(folder: Path, shape: dict) -> None:
    """synthetic.checkpoints.build_checkpoint's random untied mT5, written by our save_pretrained: transformers
    5.x saves an mT5 tied whatever its config says (it reads an untied one correctly). Same recipe: lm_head rows
    past the test tokenizer's real pieces shrunk, EOS boosted, so that outputs are real pieces of varied length."""
    from model import MT5Config, MT5ForConditionalGeneration

    print(f"[gpu-check] building a random mt5 of {shape['d_model']} wide in {folder} (once)", file=sys.stderr)
    torch.manual_seed(0)
    with torch.no_grad():
        model = MT5ForConditionalGeneration(MT5Config(**shape)).init_weights()
        model.lm_head.weight[4000:] *= 0.05
        model.lm_head.weight[1] *= 2.5
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    shutil.copy(checkpoints.spiece_model(), folder / "spiece.model")


def missing(package: str) -> str | None:
    """Why a check needing `package` is skipped, or None where it can be imported."""
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (carry its wheel: benchmarks/README.md, GPU)"
    return None


def compile_skip(run: Run) -> dict | None:
    """The skipped row of a check of the compiled decode step where it does not run, else None."""
    if run.compile_backend is None:
        return {
            "status": SKIPPED,
            "reason": "the compiled decode step is checked on CUDA: on CPU inductor takes tens of seconds a bucket "
            "(benchmarks/compiled_decode.py measures it); --compile-backend eager runs this check's path here",
        }
    return None


def compiling(model, **settings):
    """`model`, whose generate() and decode streams go through the compiled decode step from now on
    (GenerationConfig.compile: what --compile-decode sets), with `settings` as further defaults."""
    model.generation_config = model.generation_config.updated(compile=True, **settings)
    return model


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far: one per decode-step bucket met (and per model)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def synchronized(run: Run) -> None:
    if run.cuda:
        torch.cuda.synchronize()


def decoder_inputs(batch: int, length: int, device: str) -> torch.Tensor:
    """Teacher-forced decoder ids: the start token, then ids of the tokenizer's real pieces."""
    ids = torch.randint(3, 4000, (batch, length), generator=torch.Generator().manual_seed(7))
    ids[:, 0] = 0
    return ids.to(device)


def forward_logits(model, ctx: Context, docs: list[dict], decoder: torch.Tensor) -> torch.Tensor:
    input_ids, mask = padded([d["ids"] for d in docs])
    with torch.inference_mode():
        out = model(input_ids=input_ids.to(ctx.device), attention_mask=mask.to(ctx.device), decoder_input_ids=decoder)
    return out.logits.float()


def release() -> None:
    """Give freed device memory back, after the caller dropped its models, before the next check loads its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- 1. parity -------------------------------------------------------------------------------------------


def parity_fp32(run: Run) -> dict:
    """Ours float32 token-identical to transformers float32, greedy and beam 4."""
    docs = run.documents(run.plan.parity_shape, run.plan.parity_docs)
    ctx = run.context(run.plan.parity_shape, docs, len(docs))
    ours, reference = build("ours-fp32", ctx, {}), build("transformers-fp32", ctx, {})
    row, same = {}, True
    for name in ("greedy", "beam4"):
        got, want = ours.run(docs, run.decoding(name)), reference.run(docs, run.decoding(name))
        row[name] = {"identical": got == want, "agreement": agreement(got, want, [])}
        same &= got == want
    del ours, reference
    release()
    summary = ", ".join(f"{n} {'identical' if row[n]['identical'] else 'DIFFERENT'}" for n in ("greedy", "beam4"))
    return {"status": PASSED if same else FAILED, "summary": summary, **row}


def parity_bf16(run: Run) -> dict:
    """Ours bfloat16 logits as close to float32 as transformers' bfloat16 logits are; greedy tokens reported."""
    if not run.cuda:
        return {"status": SKIPPED, "reason": "bfloat16 is checked on CUDA only (the CPU path runs float32)"}
    docs = run.documents(run.plan.parity_shape, run.plan.parity_docs)
    ctx = run.context(run.plan.parity_shape, docs, len(docs))
    decoder = decoder_inputs(len(docs), 16, ctx.device)
    reference32 = build("transformers-fp32", ctx, {})
    exact = forward_logits(reference32.model, ctx, docs, decoder)
    del reference32
    release()
    ours, reference = build("ours-bf16", ctx, {}), build("transformers-bf16", ctx, {})
    got, want = forward_logits(ours.model, ctx, docs, decoder), forward_logits(reference.model, ctx, docs, decoder)
    ours_error, reference_error = float((got - exact).abs().max()), float((want - exact).abs().max())
    greedy = run.decoding("greedy")
    tokens = agreement(ours.run(docs, greedy), reference.run(docs, greedy), [])
    del ours, reference
    release()
    ok = ours_error <= BF16_MARGIN * reference_error
    return {
        "status": PASSED if ok else FAILED,
        "summary": f"max |ours - transformers| bf16 logits {float((got - want).abs().max()):.3g}; error vs fp32 "
        f"ours {ours_error:.3g}, transformers {reference_error:.3g} (bound {BF16_MARGIN}x); "
        f"identical greedy tokens {tokens['tokens']:.3f}",
        "max_abs_diff_to_transformers_bf16": float((got - want).abs().max()),
        "max_abs_error_vs_fp32": {"ours": ours_error, "transformers": reference_error},
        "max_abs_logit_fp32": float(exact.abs().max()),
        "margin": BF16_MARGIN,
        "greedy_agreement": tokens,
    }


# --- 2. quantization -------------------------------------------------------------------------------------


def transformers_bitsandbytes(ctx: Context, method: str, dtype: torch.dtype):
    import transformers

    if method == "int8":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return transformers.MT5ForConditionalGeneration.from_pretrained(
        ctx.checkpoint,
        quantization_config=config,
        dtype=dtype,
        device_map={"": torch.device(ctx.device).index or 0} if ctx.device.startswith("cuda") else "cpu",
    ).eval()


def bitsandbytes_parity(run: Run, method: str) -> dict:
    """Ours through bitsandbytes against transformers through the same bitsandbytes: logits and greedy tokens."""
    reason = missing("bitsandbytes") or missing("accelerate")
    if reason:
        return {"status": SKIPPED, "reason": reason}
    from benchmarks.engines import TorchEngine, ours

    dtype = torch.bfloat16 if run.cuda else torch.float32
    docs = run.documents(run.plan.parity_shape, run.plan.parity_docs)
    ctx = run.context(run.plan.parity_shape, docs, len(docs))
    mine = ours(ctx, dtype=str(dtype).removeprefix("torch."), quantization=method)
    reference = TorchEngine(ctx, transformers_bitsandbytes(ctx, method, dtype))
    decoder = decoder_inputs(len(docs), 16, ctx.device)
    got, want = forward_logits(mine.model, ctx, docs, decoder), forward_logits(reference.model, ctx, docs, decoder)
    cosine = float(torch.nn.functional.cosine_similarity(got.flatten(0, 1), want.flatten(0, 1), dim=-1).min())
    greedy = run.decoding("greedy")
    tokens = agreement(mine.run(docs, greedy), reference.run(docs, greedy), [])
    del mine, reference
    release()
    return {
        "status": PASSED if cosine >= BNB_MIN_COSINE else FAILED,
        "summary": f"lowest logits cosine {cosine:.5f} (bound {BNB_MIN_COSINE}); identical greedy tokens "
        f"{tokens['tokens']:.3f}",
        "min_cosine": cosine,
        "greedy_agreement": tokens,
        "dtype": str(dtype),
    }


# int8 weight-only against its dequantized reference, as a share of the largest logit: in bfloat16 four bf16
# steps (each at most 2^-7 of a value), the bound tests/model/test_weight_only.py argues from the roundings the
# int8 layer makes where the reference makes others; in float32 (CPU) 2^-13, a thousand roundings of 2^-24.
WEIGHT_ONLY_BOUND = {"bfloat16": 4 * 2**-7, "float32": 2**-13}


def weight_only_parity(run: Run) -> dict:
    """Ours int8 weight-only against its dequantized reference (model/quantize.py dequantize_weight_only): the
    same model holding the weights the int8 layers multiply by, in the same dtype. Logits and tokens."""
    import copy

    from benchmarks.engines import TorchEngine, ours
    from model.quantize import dequantize_weight_only

    dtype = "bfloat16" if run.cuda else "float32"
    docs = run.documents(run.plan.parity_shape, run.plan.parity_docs)
    ctx = run.context(run.plan.parity_shape, docs, len(docs))
    mine = ours(ctx, dtype=dtype, quantization="int8-weight-only")
    reference = TorchEngine(ctx, dequantize_weight_only(copy.deepcopy(mine.model)))
    decoder = decoder_inputs(len(docs), 16, ctx.device)
    got, want = forward_logits(mine.model, ctx, docs, decoder), forward_logits(reference.model, ctx, docs, decoder)
    largest = float((got - want).abs().max())
    bound = WEIGHT_ONLY_BOUND[dtype] * float(want.abs().max())
    tokens = {
        name: agreement(mine.run(docs, run.decoding(name)), reference.run(docs, run.decoding(name)), [])
        for name in ("greedy", "beam4")
    }
    del mine, reference
    release()
    return {
        "status": PASSED if largest <= bound else FAILED,
        "summary": f"largest logit difference {largest:.4g} (bound {bound:.4g}); identical tokens greedy "
        f"{tokens['greedy']['tokens']:.3f}, beam 4 {tokens['beam4']['tokens']:.3f}",
        "largest_difference": largest,
        "bound": bound,
        "agreement": tokens,
        "dtype": dtype,
    }


def weight_only_compiled(run: Run) -> dict:
    """Ours int8 weight-only through the compiled decode step against the same model eager, in float32, greedy
    and beam 4: identical tokens. Float32 because that is where token identity is a fair test: both compute
    x @ codes * scales with exact int8 -> float32 codes, and differ only in the order of float32 sums (inductor's
    fused kernels against eager's), a relative 2^-24 per term, far below the gaps between a row's top logits;
    in bfloat16 every fused op also rounds to 8 bits in other places, so near-ties of random weights' flat
    logits flip (the speed check reports that agreement). Every document decodes max_new_tokens steps
    (min_new_tokens), so each decoding is one bucket: one compile; the pipeline check covers documents joining
    and leaving."""
    from benchmarks.engines import TorchEngine, ours

    if skipped := compile_skip(run):
        return skipped
    docs = run.documents(run.plan.parity_shape, run.plan.parity_docs)
    ctx = run.context(run.plan.parity_shape, docs, len(docs))
    steps = {"min_new_tokens": run.plan.max_new_tokens}

    def loaded():
        model = ours(ctx, dtype="float32", quantization="int8-weight-only", compile_decode=True).model
        model.generation_config = model.generation_config.updated(**steps)
        return model

    eager, compiled = TorchEngine(ctx, loaded()), TorchEngine(ctx, compiling(loaded()))
    row, same, compile_seconds = {}, True, {}
    for name in ("greedy", "beam4"):
        want = eager.run(docs, run.decoding(name))
        start = time.perf_counter()
        got = compiled.run(docs, run.decoding(name))
        compile_seconds[name] = round(time.perf_counter() - start, 1)
        row[name] = {"identical": got == want, "agreement": agreement(got, want, [])}
        same &= got == want
    del eager, compiled
    release()
    summary = ", ".join(f"{n} {'identical' if row[n]['identical'] else 'DIFFERENT'}" for n in ("greedy", "beam4"))
    return {
        "status": PASSED if same else FAILED,
        "summary": f"float32, {len(docs)} documents x {run.plan.max_new_tokens} tokens: {summary} "
        f"(first compiled runs, compiles included: {compile_seconds['greedy']} s, {compile_seconds['beam4']} s)",
        "dtype": "float32",
        "first_run_seconds": compile_seconds,
        **row,
    }


def not_built(what: str) -> dict:
    return {"status": NOT_BUILT, "reason": f"{what} is not built yet (issue 14)"}


# --- 3. fine-tuning --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune(run: Run, method: str) -> dict:
    """`train_steps` steps of pipeline.train.Trainer under a process group of one (NCCL on CUDA, gloo on CPU),
    so that it trains through DistributedDataParallel as every replica does; the model is loaded as a
    replica loads it for fine-tuning (pipeline/finetune.py: inference_settings)."""
    import torch.distributed as dist

    from model import MT5Tokenizer, load_for_inference
    from pipeline.train import TRAIN_LOG, FinetuneSettings, Trainer, prepare_for_training
    from synthetic.corpus import first_words_task

    if method == "qlora" and (reason := missing("bitsandbytes")):
        return {"status": SKIPPED, "reason": reason}
    plan, path = run.plan, run.train_checkpoint()
    examples = [(r["text"], r["summary"]) for r in first_words_task(plan.train_steps * plan.train_batch, seed=1)]
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="gpu-check-finetune-") as out:
        settings = FinetuneSettings(
            model=str(path),
            train="synthetic first_words_task (in memory)",
            output_model=out,
            method=method,
            max_steps=plan.train_steps,
            lr=1e-3,
            optimizer="adamw",
            batch_size=plan.train_batch,
            max_input_tokens=plan.train_input_tokens,
            max_target_tokens=plan.train_target_tokens,
            label_smoothing=0.0,
            save_every=plan.train_steps + 1,  # no checkpoint inside the timed steps
        )
        qlora = method == "qlora"
        model = load_for_inference(
            path,
            dtype="bfloat16" if (qlora and run.cuda) else "float32",
            device=run.device,
            quantization="nf4" if qlora else "none",
        )
        torch.manual_seed(0)
        lora = prepare_for_training(model, settings)
        backend = "nccl" if run.cuda else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            trainer = Trainer(model, MT5Tokenizer.from_pretrained(path), settings, examples, 0, 1, run.device, lora)
            result = trainer.run(resume=False)
            used_ddp = trainer.ddp is not None
        finally:
            dist.destroy_process_group()
        log = [json.loads(line) for line in (Path(out) / TRAIN_LOG).read_text().splitlines()]
    del model, trainer
    release()
    rates = [r["tokens_per_second"] for r in log[1:]] or [log[0]["tokens_per_second"]]  # the first step warms up
    first, last = result["first_loss"], result["last_loss"]
    finite = first is not None and last is not None
    memory = (
        {"peak_device_mib": round(torch.cuda.max_memory_allocated() / 2**20)}
        if run.cuda
        else {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}  # the process so far
    )
    return {
        "status": PASSED if finite and used_ddp else FAILED,
        "summary": f"{backend}, DDP {used_ddp}: loss {first} -> {last}, {statistics.median(rates):,.0f} tokens/s, "
        + ", ".join(f"{k} {v}" for k, v in memory.items()),
        "backend": backend,
        "ddp": used_ddp,
        "steps": result["steps"],
        "first_loss": first,
        "last_loss": last,
        "tokens_per_second": round(statistics.median(rates), 1),
        "skipped_steps": log[-1]["skipped_steps"],
        **memory,
    }


# --- 4. speed --------------------------------------------------------------------------------------------


def speed(run: Run, shape: str) -> dict:
    """Ours against transformers and CTranslate2 in the same dtype, interleaved as benchmarks/run.py does; on the
    plan's compiled shapes also ours through the compiled decode step (`<engine>-compiled`, --compile-decode).
    A compiled engine first decodes the whole timed workload once per decoding, untimed: the same documents decode
    the same way each time, so every bucket the timed runs meet is compiled (and captured) before them, as
    benchmarks/compiled_decode.py does. That untimed run less a timed one is its compile time."""
    if run.cuda:
        names = ["ours-bf16", "ours-int8-weight-only", "transformers-bf16", "ct2-bf16", "ct2-int8-bf16"]
        reference = "transformers-bf16"
    else:
        names, reference = ["ours-fp32", "ours-int8-weight-only", "transformers-fp32", "ct2-int8"], "transformers-fp32"
    skipped = {}
    if reason := missing("ctranslate2"):
        skipped = {n: reason for n in names if n.startswith("ct2")}
        names = [n for n in names if n not in skipped]
    compiled = {f"{n}-compiled": n for n in names if n.startswith("ours")}  # -> the eager engine it compiles
    if shape not in run.plan.compiled_shapes:
        compiled = {}
    elif run.compile_backend is None:
        skipped.update({c: compile_skip(run)["reason"] for c in compiled})
        compiled = {}
    failures = {}  # compiled engines that raised: recorded, and the row fails
    docs = run.documents(shape, run.plan.speed_docs)
    ctx = run.context(shape, docs, run.plan.batch_size)
    engines = {}
    for name in names + list(compiled):
        try:
            engines[name] = build(compiled.get(name, name), ctx, {})
            if name in compiled:
                compiling(engines[name].model)
        except Exception as error:  # a baseline that cannot load here (a CUDA library missing) is recorded
            if name == reference or name not in compiled and name.startswith("ours"):
                raise
            (failures if name in compiled else skipped)[name] = f"failed to load: {type(error).__name__}: {error}"
    names = list(engines)
    warm_docs = sorted(docs, key=lambda d: len(d["ids"]))[:4]
    warm_ctx = Context(ctx.shape, ctx.checkpoint, ctx.device, ctx.threads, [list(range(len(warm_docs)))], 4)
    decodings = [run.decoding("greedy"), run.decoding("beam4")]
    warm_seconds = {}
    for name in names:  # thread pools, allocators and kernels set up before anything is timed
        try:
            if name in compiled:
                # beam 4 first: the step's storage is the model's and grows, never shrinks (storage_for), so
                # greedy's graphs, compiled after it, are over the storage the timed runs use
                for d in sorted(decodings, key=lambda d: -d.num_beams):
                    print(f"[gpu-check]   compiling {name} {d.name} (every bucket)", file=sys.stderr, flush=True)
                    start = time.perf_counter()
                    engines[name].run(docs, d)
                    synchronized(run)
                    warm_seconds[(name, d.name)] = time.perf_counter() - start
                continue
            engine_ctx, engines[name].ctx = engines[name].ctx, warm_ctx
            for d in decodings:
                warm = Decoding(d.name, d.num_beams, 8, d.no_repeat_ngram_size, d.length_penalty)
                engines[name].run(warm_docs, warm)
            engines[name].ctx = engine_ctx
        except Exception as error:  # CTranslate2 loads its CUDA libraries at the first batch
            if name == reference or name not in compiled and name.startswith("ours"):
                raise
            traceback.print_exc()
            (failures if name in compiled else skipped)[name] = f"failed to run: {type(error).__name__}: {error}"
            del engines[name]
    names = list(engines)
    seconds = {(n, d.name): [] for n in names for d in decodings}
    outputs = {}
    graphs = graphs_compiled()
    for r in range(run.plan.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for d in decodings:
            for name in order:
                start = time.perf_counter()
                outputs[(name, d.name)] = engines[name].run(docs, d)
                seconds[(name, d.name)].append(time.perf_counter() - start)
    compiled_while_timed = graphs_compiled() - graphs
    engines.clear()
    release()
    rows = []
    for d in decodings:
        tokens = {n: sum(len(o) for o in outputs[(n, d.name)]) for n in names}
        rates = {n: [tokens[n] / s for s in seconds[(n, d.name)]] for n in names}

        def ratio(n: str, base: str, rates: dict = rates) -> float:
            return round(statistics.median(a / b for a, b in zip(rates[n], rates[base])), 3)

        first_compiled = next((n for n in names if n in compiled), None)
        for n in names:
            row = {
                "engine": n,
                "decoding": d.name,
                "docs_per_second": round(len(docs) / statistics.median(seconds[(n, d.name)]), 3),
                "tokens_per_second": round(statistics.median(rates[n]), 1),
                "vs_transformers": ratio(n, reference),
                "agreement_with_transformers": agreement(outputs[(n, d.name)], outputs[(reference, d.name)], []),
            }
            if n in compiled:
                eager = compiled[n]
                row["vs_eager"] = ratio(n, eager)
                row["compile_seconds"] = round(warm_seconds[(n, d.name)] - statistics.median(seconds[(n, d.name)]), 1)
                # bf16: fused kernels round in other places than eager's, so near-ties of random weights' flat
                # logits flip (float32 token identity is the quantization and pipeline checks' test)
                row["agreement_with_eager"] = agreement(outputs[(n, d.name)], outputs[(eager, d.name)], [])
                if n != first_compiled:
                    row[f"vs_{first_compiled}"] = ratio(n, first_compiled)
            rows.append(row)
    run.speed[shape] = rows
    ours_name = names[0]
    summary = "; ".join(
        f"{d.name}: " + ", ".join(f"{r['engine']} {r['vs_transformers']:.2f}x" for r in rows if r["decoding"] == d.name)
        for d in decodings
    )
    compiled_rows = [r for r in rows if "vs_eager" in r]
    if compiled_rows:
        summary += f"; compiled vs eager ({compiled_while_timed} compiles while timed): " + ", ".join(
            f"{r['engine']} {r['decoding']} {r['vs_eager']:.2f}x (compile {r['compile_seconds']} s, same tokens "
            f"{r['agreement_with_eager']['tokens']:.3f})"
            for r in compiled_rows
        )
    if failures:
        summary += "; FAILED: " + "; ".join(f"{n}: {e}" for n, e in failures.items())
    return {
        "status": FAILED if failures else PASSED,
        "summary": f"tokens/s vs {reference}: {summary}" + (f"; skipped: {', '.join(skipped)}" if skipped else ""),
        "documents": len(docs),
        "batch_size": run.plan.batch_size,
        "max_new_tokens": run.plan.max_new_tokens,
        "repeats": run.plan.repeats,
        "ours": ours_name,
        "reference": reference,
        "engines": rows,
        "skipped_engines": skipped,
        "failed_engines": failures,
        "compiles_while_timed": compiled_while_timed,
    }


# --- 5. the decode step against the bandwidth bound -------------------------------------------------------


def step_weight_bytes(config: dict, element_bytes: int) -> int:
    """Weight bytes one decoder step reads: each layer's self-attention q|k|v and o, cross-attention q and o
    (its k and v project the encoder states once per source, not per step), the gated feed-forward's wi_0,
    wi_1 and wo, the norms, and the output head. The embedding is a lookup of one row per token."""
    d, inner, ff = config["d_model"], config["num_heads"] * config["d_kv"], config["d_ff"]
    per_layer = 4 * d * inner + 2 * d * inner + 3 * d * ff + 3 * d
    layers = config.get("num_decoder_layers") or config["num_layers"]
    return (layers * per_layer + d + config["vocab_size"] * d) * element_bytes


def bandwidth(run: Run) -> tuple[float | None, str]:
    if not run.cuda:
        return None, "n/a on CPU: no nominal memory bandwidth is assumed"
    name = torch.cuda.get_device_name()
    for key, value in BANDWIDTH.items():
        if key in name:
            return value, f"{name}: {value / 1e12:.2f} TB/s (data sheet)"
    return None, f"{name}: no bandwidth figure known to this script"


def decode_step(run: Run, shape: str) -> dict:
    """Seconds per greedy decode step of ours (its speed dtype, `batch_size` rows), from two runs that differ
    only in steps: (t(N steps) - t(1 step)) / (N - 1), each the fastest of three. On CUDA, eager and compiled
    (model/compiled_decode.py: one CUDA graph per bucket; here one bucket, every row decoding N steps). The
    compiled step's first run compiles; the one-step run reuses its graph (its cache holds more positions)."""
    from benchmarks.engines import ours

    docs = run.documents(shape, run.plan.batch_size)
    ctx = run.context(shape, docs, run.plan.batch_size)
    dtype = "bfloat16" if run.cuda else "float32"
    model = ours(ctx, dtype=dtype).model
    input_ids, mask = padded([d["ids"] for d in docs])
    input_ids, mask = input_ids.to(ctx.device), mask.to(ctx.device)
    steps = run.plan.max_new_tokens

    outputs = {}

    def timed(model, n: int, compile: bool = False, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.inference_mode():  # min_new_tokens: no row stops early, so every run takes n steps
                outputs[compile] = model.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, compile=compile
                ).tolist()
            times.append(time.perf_counter() - start)
        return min(times)

    timed(model, 2)  # warm-up
    step = (timed(model, steps) - timed(model, 1)) / (steps - 1)
    not_on_cpu = "not run on CPU, where a compile takes tens of seconds: benchmarks/compiled_decode.py measures it"
    compiled = {"compiled": not_on_cpu}
    if run.cuda:
        compile_seconds = timed(model, steps, compile=True, repeats=1)
        compiled_step = (timed(model, steps, compile=True) - timed(model, 1, compile=True)) / (steps - 1)
        timed(model, steps)  # eager's tokens of the same steps, to compare with compiled's
        compiled = {
            "compiled_step_ms": round(compiled_step * 1e3, 3),
            "compiled_vs_eager": round(step / compiled_step, 2),
            "compile_seconds": round(compile_seconds - timed(model, steps, compile=True, repeats=1), 1),
            # bf16: the compiled kernels fuse and round in other places than eager's, so near-ties may flip
            "compiled_agreement_with_eager": agreement(outputs[True], outputs[False], []),
        }
    del model
    release()
    weights = step_weight_bytes(checkpoints.SHAPES[ctx.shape], 2 if dtype == "bfloat16" else 4)
    per_second, source = bandwidth(run)
    bound = weights / per_second if per_second else None
    row = {
        "status": PASSED,
        "dtype": dtype,
        "rows": len(docs),
        "step_ms": round(step * 1e3, 3),
        "weight_mib_per_step": round(weights / 2**20, 1),
        "achieved_gb_per_s": round(weights / step / 1e9, 1),
        "bandwidth": source,
        "bound_ms": round(bound * 1e3, 3) if bound else None,
        "fraction_of_bound": round(bound / step, 3) if bound else None,
        **compiled,
    }
    fraction = f"{row['fraction_of_bound']:.2f} of the bound ({row['bound_ms']} ms)" if bound else "bound n/a"
    row["summary"] = (
        f"{row['step_ms']} ms/step at {len(docs)} rows, {row['weight_mib_per_step']} MiB of weights "
        f"({row['achieved_gb_per_s']} GB/s): {fraction}"
    )
    if "compiled_step_ms" in row:
        compiled_fraction = f", {bound / compiled_step:.2f} of the bound" if bound else ""
        row["summary"] += (
            f"; compiled {row['compiled_step_ms']} ms/step ({row['compiled_vs_eager']}x eager{compiled_fraction}, "
            f"compiled in {row['compile_seconds']} s, identical tokens to eager "
            f"{row['compiled_agreement_with_eager']['tokens']:.3f})"
        )
    return row


# --- 6. the pipeline (an estimate: no Ray on the GPU machine) --------------------------------------------

PIPELINE_RESULTS = ROOT / "benchmarks" / "results" / "cpu-mt5-small-pipeline.json"
ESTIMATE_DOCUMENTS = 2000


def pipeline_estimate(run: Run) -> dict:
    """docs/s of a one-replica job on this device, from the engine's greedy docs/s here and the pipeline's
    overhead measured on CPU (the committed cpu-mt5-small-pipeline.json): the Ray job's docs/s without its
    replica start over the continuous engine's docs/s, plus the replica start and model load once per job."""
    shape = run.plan.speed_shapes[0]
    rows = run.speed.get(shape)
    if not rows:
        return {"status": SKIPPED, "reason": f"needs the speed check of {shape}, which did not run"}
    engine = next(r["docs_per_second"] for r in rows if r["engine"].startswith("ours") and r["decoding"] == "greedy")
    measured = json.loads(PIPELINE_RESULTS.read_text(encoding="utf-8"))
    by_engine = {r["engine"]: r for r in measured["results"] if r["decoding"] == "greedy"}
    factor = (
        by_engine["pipeline-ray"]["docs_per_second_without_startup"]
        / by_engine["ours-fp32-continuous"]["docs_per_second"]
    )
    startup = statistics.median(measured["setup"]["pipeline_ray_startup_seconds"])
    job = ESTIMATE_DOCUMENTS / (ESTIMATE_DOCUMENTS / (engine * factor) + startup)
    return {
        "status": PASSED,
        "estimate": True,
        "summary": f"ESTIMATE, 1 replica, {ESTIMATE_DOCUMENTS} documents: {job:.2f} docs/s (engine {engine} docs/s x "
        f"{factor:.3f} pipeline factor, + {startup:.1f} s start); 4 replicas at 0.25 GPU: not estimated",
        "docs_per_second": round(job, 3),
        "engine_docs_per_second": engine,
        "pipeline_factor": round(factor, 3),
        "startup_seconds": startup,
        "documents": ESTIMATE_DOCUMENTS,
        "assumptions": (
            f"factor = pipeline-ray docs/s without replica start / ours-fp32-continuous docs/s, greedy, measured on "
            f"CPU ({PIPELINE_RESULTS.name}: {measured['machine']['cpu']}); the engine figure is ours generate() on "
            f"fixed batches of {shape}; the start is the CPU replica's start and model load. Four replicas sharing "
            "a GPU contend for it in ways a CPU run cannot show: not estimated, measure with Ray"
        ),
    }


def pipeline_stages(run: Run) -> dict:
    """pipeline.stages.Summarizer as a replica runs it (tokenize -> decode on the model thread -> detokenize,
    continuous batching, no Ray), with compile_decode (--compile-decode), over a Parquet table of generated
    documents plus a null and a blank row: the speed dtype's docs/s in steady state (a second pass over the table
    by the same Summarizer) against eager, its start (load + the first pass's compiles), every row answered with a
    summary or an error, and, in float32, summaries equal to the eager stages' exactly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model import MT5Tokenizer, load_for_inference
    from pipeline.settings import SummarizeSettings
    from pipeline.stages import Summarizer

    if skipped := compile_skip(run):
        return skipped
    plan, shape = run.plan, run.plan.parity_shape
    docs = run.documents(shape, plan.pipeline_docs)
    path = checkpoints.checkpoint(run.shape_key(shape))
    tokenizer = MT5Tokenizer.from_pretrained(path)
    texts = [d["text"] for d in docs]
    texts[3:3], texts[10:10] = [None], ["  \n"]  # no text: an error and no summary, in the float32 rows too
    with tempfile.TemporaryDirectory(prefix="gpu-check-pipeline-") as folder:
        pq.write_table(
            pa.table({"id": list(range(len(texts))), "text": texts}), f"{folder}/docs.parquet", row_group_size=64
        )
        table = pq.read_table(f"{folder}/docs.parquet")
    settings = SummarizeSettings(
        model=str(path),
        quantization="none",
        max_new_tokens=plan.max_new_tokens,
        batch_size=plan.pipeline_batch,
    )  # num_beams 4 and the rest: a job's defaults

    def passes(model, compile: bool, count: int, table: pa.Table = table) -> list[dict]:
        summarizer = Summarizer(model, tokenizer, dataclasses.replace(settings, compile_decode=compile))
        out = []
        try:
            for _ in range(count):
                graphs, start = graphs_compiled(), time.perf_counter()
                result, stats = summarizer.summarize_table(table)
                synchronized(run)
                print(
                    f"[gpu-check]   stages {next(model.parameters()).dtype}, {'compiled' if compile else 'eager'}: "
                    f"{time.perf_counter() - start:.1f} s, {graphs_compiled() - graphs} graphs compiled",
                    file=sys.stderr,
                    flush=True,
                )
                out.append(
                    {
                        "seconds": time.perf_counter() - start,
                        "graphs_compiled": graphs_compiled() - graphs,
                        "summaries": result.column("summary").to_pylist(),
                        "errors": result.column("error").to_pylist(),
                        "output_tokens": stats.output_tokens,
                    }
                )
        finally:
            summarizer.close()
        return out

    speed_dtype = "bfloat16" if run.cuda else "float32"
    start = time.perf_counter()
    # as a job with --compile-decode loads it, for the eager passes too: the same model
    model = load_for_inference(path, dtype=speed_dtype, device=run.device, compile_decode=True)
    synchronized(run)
    load_seconds = time.perf_counter() - start
    first, steady = passes(model, True, 2)
    eager = passes(model, False, 1)[0]
    del model
    release()
    if speed_dtype == "float32":
        exact_compiled, exact_eager = steady, eager
    else:
        model = load_for_inference(path, dtype="float32", device=run.device, compile_decode=True)
        exact_table = table.slice(0, plan.pipeline_exact_docs + 2)
        exact_compiled, exact_eager = (
            passes(model, True, 1, exact_table)[0],
            passes(model, False, 1, exact_table)[0],
        )
        del model
        release()

    def answered(p: dict) -> bool:
        """Every row has a summary or an error, not both; the rows without text have an error."""
        pairs = list(zip(p["summaries"], p["errors"]))
        blank = [i for i, t in enumerate(texts[: len(pairs)]) if t is None or not t.strip()]
        return all((s is None) != (e is None) for s, e in pairs) and all(pairs[i][1] for i in blank)

    every_row = all(answered(p) for p in (first, steady, eager, exact_compiled, exact_eager))
    identical = exact_compiled["summaries"] == exact_eager["summaries"]
    identical &= exact_compiled["errors"] == exact_eager["errors"]
    same = sum(a == b for a, b in zip(steady["summaries"], eager["summaries"])) / len(texts)
    rows = len(texts)
    figures = {
        "documents": rows,
        "dtype": speed_dtype,
        "batch_size": plan.pipeline_batch,
        "num_beams": settings.num_beams,
        "max_new_tokens": plan.max_new_tokens,
        "docs_per_second": round(rows / steady["seconds"], 2),
        "tokens_per_second": round(steady["output_tokens"] / steady["seconds"], 1),
        "eager_docs_per_second": round(rows / eager["seconds"], 2),
        "compiled_vs_eager": round(eager["seconds"] / steady["seconds"], 2),
        "load_seconds": round(load_seconds, 1),
        "first_pass_seconds": round(first["seconds"], 1),
        "startup_seconds": round(load_seconds + first["seconds"] - steady["seconds"], 1),
        "graphs_compiled": {"first_pass": first["graphs_compiled"], "steady_pass": steady["graphs_compiled"]},
        "every_row_answered": every_row,
        "rows_with_summary": sum(s is not None for s in steady["summaries"]),
        "float32_identical_to_eager": identical,
        "float32_rows": len(exact_eager["summaries"]),
        "float32_same_summaries": round(
            statistics.mean(a == b for a, b in zip(exact_compiled["summaries"], exact_eager["summaries"])), 3
        ),
        f"{speed_dtype}_same_summaries_as_eager": round(same, 3),
    }
    return {
        "status": PASSED if every_row and identical else FAILED,
        "summary": f"{rows} rows ({speed_dtype}, beam {settings.num_beams}, batch {plan.pipeline_batch}): "
        f"{figures['docs_per_second']} docs/s steady ({figures['compiled_vs_eager']}x eager's "
        f"{figures['eager_docs_per_second']}), start {figures['startup_seconds']} s (load "
        f"{figures['load_seconds']} s + {first['graphs_compiled']} graphs compiled; {steady['graphs_compiled']} more "
        "in the steady pass); every row "
        f"answered {every_row}; float32 summaries identical to eager {identical} (first "
        f"{len(exact_eager['summaries'])} rows)",
        **figures,
    }


# --- 7. loading ----------------------------------------------------------------------------------------


def load_memory(run: Run, quantization: str) -> dict:
    """Peak GPU memory while model.inference.load_for_inference loads the plan's load shape (dtype auto: bfloat16)
    with `quantization`, against the bfloat16 model's weight bytes: figures only."""
    from model import load_for_inference

    if not run.cuda:
        return {"status": SKIPPED, "reason": "GPU memory is measured on CUDA only (torch.cuda.max_memory_allocated)"}
    if quantization in ("int8", "nf4") and (reason := missing("bitsandbytes")):
        return {"status": SKIPPED, "reason": reason}
    path = checkpoints.checkpoint(run.shape_key(run.plan.load_shape))
    release()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load_for_inference(path, dtype="auto", device=run.device, quantization=quantization)
    synchronized(run)
    seconds = time.perf_counter() - start
    peak, held = torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before
    if quantization == "none":  # the load checks run in order: this first, the quantized ones read it
        tensors = [*model.parameters(), *model.buffers()]
        run.bf16_weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    del model
    release()
    bf16_bytes = run.bf16_weight_bytes
    mib = 2**20
    figures = {
        "peak_mib": round(peak / mib, 1),
        "held_after_load_mib": round(held / mib, 1),
        "bf16_weights_mib": round(bf16_bytes / mib, 1) if bf16_bytes else None,
        "peak_vs_bf16_weights": round(peak / bf16_bytes, 3) if bf16_bytes else None,
        "load_seconds": round(seconds, 1),
    }
    versus = (
        f" = {figures['peak_vs_bf16_weights']}x the bf16 weights' {figures['bf16_weights_mib']} MiB"
        if bf16_bytes
        else ""
    )
    return {
        "status": PASSED,
        "summary": f"peak {figures['peak_mib']} MiB{versus}; {figures['held_after_load_mib']} MiB held after the "
        f"load ({figures['load_seconds']} s)",
        **figures,
    }


# --- the run ---------------------------------------------------------------------------------------------


def checks(run: Run) -> list[tuple[str, str, Callable[[], dict]]]:
    """(part, name, check) in the order they run: the cheap load checks, then the compiled pipeline stages, before
    the long speed checks, so that a run stopped at its time limit has them."""
    out = [
        ("parity", "fp32 tokens vs transformers", lambda: parity_fp32(run)),
        ("parity", "bf16 logits vs transformers", lambda: parity_bf16(run)),
        ("quantization", "bitsandbytes int8 vs transformers", lambda: bitsandbytes_parity(run, "int8")),
        ("quantization", "bitsandbytes nf4 vs transformers", lambda: bitsandbytes_parity(run, "nf4")),
        ("quantization", "int8 weight-only vs its dequantized reference", lambda: weight_only_parity(run)),
        ("quantization", "int8 weight-only compiled vs eager, float32", lambda: weight_only_compiled(run)),
        ("fine-tuning", "full, DDP world size 1", lambda: finetune(run, "full")),
        ("fine-tuning", "qlora, DDP world size 1", lambda: finetune(run, "qlora")),
    ]
    for quantization in ("none", "int8-weight-only", "nf4"):
        name = f"mt5-{run.plan.load_shape} {quantization}, peak GPU memory"
        out.append(("load", name, lambda quantization=quantization: load_memory(run, quantization)))
    out.append(("pipeline", "stages, compiled decode", lambda: pipeline_stages(run)))
    for shape in run.plan.speed_shapes:
        out.append(("speed", f"mt5-{shape} greedy and beam 4", lambda shape=shape: speed(run, shape)))
    for shape in run.plan.speed_shapes:
        out.append(("decode-step", f"mt5-{shape} vs bandwidth bound", lambda shape=shape: decode_step(run, shape)))
    out.append(("pipeline", "one replica (estimate)", lambda: pipeline_estimate(run)))
    return out


def guarded(part: str, name: str, check: Callable[[], dict]) -> dict:
    """One check's row, timed; an exception becomes a failed row with its error, and the run goes on."""
    print(f"[gpu-check] {part}: {name}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        row = check()
    except Exception as error:
        traceback.print_exc()
        row = {"status": FAILED, "error": f"{type(error).__name__}: {error}"}
    row = {"part": part, "name": name, **row, "seconds": round(time.perf_counter() - start, 1)}
    print(f"[gpu-check]   {row['status']} in {row['seconds']} s", file=sys.stderr, flush=True)
    return row


@contextlib.contextmanager
def without(package: str):
    """Imports of `package` fail inside: machine() reports ray's version by importing it, and this check must
    run, and be seen to run, without Ray."""
    present = package in sys.modules
    if not present:
        sys.modules[package] = None  # import raises ImportError
    try:
        yield
    finally:
        if not present:
            del sys.modules[package]


def versions() -> dict:
    out = {}
    for package in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "pyarrow",
        "fsspec",
        "sentencepiece",
        "safetensors",
        "triton",
        "ctranslate2",
        "bitsandbytes",
    ):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    out["cuda"] = torch.version.cuda
    return out


def print_table(report: dict) -> None:
    rows = report["rows"]
    part_w, name_w = max(len(r["part"]) for r in rows), max(len(r["name"]) for r in rows)
    print(f"\n{report['command']}\n{report['device']['name']}, torch {report['versions']['torch']}, {report['date']}")
    head = f"{'part':{part_w}s}  {'check':{name_w}s}  {'status':9s} {'seconds':>7s}  result"
    print(head)
    print("-" * len(head))
    for r in rows:
        detail = r.get("summary") or r.get("reason") or r.get("error", "")
        print(f"{r['part']:{part_w}s}  {r['name']:{name_w}s}  {r['status']:9s} {r['seconds']:7.1f}  {detail}")
        for e in r.get("engines", []):
            print(
                f"{'':{part_w + name_w + 22}s}    {e['decoding']:6s} {e['engine']:30s} "
                f"{e['tokens_per_second']:9.1f} tok/s "
                f"{e['vs_transformers']:5.2f}x  same tokens {e['agreement_with_transformers']['tokens']:.3f}"
                + (
                    f"; {e['vs_eager']:.2f}x eager, same tokens as eager {e['agreement_with_eager']['tokens']:.3f}, "
                    f"compile {e['compile_seconds']} s"
                    if "vs_eager" in e
                    else ""
                )
            )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/gpu-check-<device>.json)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (torch and CTranslate2)")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default all: {', '.join(PARTS)}); e.g. quantization,fine-tuning "
        "for a second call that carries bitsandbytes",
    )
    p.add_argument(
        "--speed-shapes",
        help="comma-separated shapes of the speed and decode-step parts (default the plan's: small,base on CUDA); "
        "e.g. small, to fit a call's time",
    )
    p.add_argument(
        "--compile-backend",
        choices=("inductor", "eager"),
        help="torch.compile backend of the compiled decode step's checks (default inductor on CUDA; on CPU they are "
        "skipped unless given: eager, dynamo's tracing without code generation, runs their code path in seconds)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu")
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu-check-{args.device}.json"
    torch.set_num_threads(args.threads)
    # float32 means float32 in the parity check: no TF32 matmuls, which round to 10 bits
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import transformers

    by_ours = int(transformers.__version__.split(".")[0]) >= 5
    import model.compiled_decode

    backend = args.compile_backend or ("inductor" if args.device == "cuda" else None)
    if backend:
        model.compiled_decode.BACKEND = backend
    plan = PLANS[args.device]
    if args.speed_shapes:
        shapes = tuple(args.speed_shapes.split(","))
        if unknown := set(shapes) - set(plan.speed_shapes):
            raise SystemExit(f"--speed-shapes: {', '.join(sorted(unknown))} not in {', '.join(plan.speed_shapes)}")
        plan = dataclasses.replace(plan, speed_shapes=shapes)
    run = Run(args.device, plan, args.threads, by_ours, {}, backend)
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    with without("ray"):
        host = machine(argparse.Namespace(threads=args.threads, device=args.device))
    host.pop("ray", None)
    report = {
        "check": "lakesum GPU check (issue 14)",
        "command": "python3 "
        + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "date": started.isoformat(timespec="seconds"),
        "device": {
            "name": host["accelerator"] or f"CPU: {host['cpu']}",
            **host,
            "bandwidth": bandwidth(run)[1],
        },
        "versions": versions(),
        "plan": asdict(run.plan),
        "checkpoints": "random, untied lm_head as real mT5, written by "
        + (
            f"our save_pretrained (transformers {transformers.__version__} would write them tied)"
            if by_ours
            else f"transformers {transformers.__version__} (synthetic.checkpoints.build_checkpoint)"
        ),
        "rows": [],
    }
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"--parts: unknown {', '.join(sorted(unknown))}; use {', '.join(PARTS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for part, name, check in checks(run):
        if part in parts:
            report["rows"].append(guarded(part, name, check))
            report["seconds"] = round(time.perf_counter() - clock, 1)
            report["ray_imported"] = sys.modules.get("ray") is not None
            # after every check: a run stopped at its time limit still leaves the rows it finished
            out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_table(report)
    print(f"[gpu-check] wrote {out} ({report['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
