"""The fine-tuning driver: check everything, start replicas, train them as one process group, evaluate.

The replicas are the summarization pipeline's own actors: after training they hold the new weights
and summarize the evaluation set with them, with nothing reloaded from disk.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import ray

from model import MT5ForConditionalGeneration, MT5Tokenizer

from .driver import EventLog, start_replicas
from .errors import OutputError, PlacementError
from .placement import DEFAULT_PLACEMENT, Placement
from .settings import SummarizeSettings
from .train import TRAIN_LOG, FinetuneSettings, TrainingError, check_resume, latest_checkpoint, load_examples


def inference_settings(settings: FinetuneSettings, on_gpu: bool) -> SummarizeSettings:
    """How the replicas load the base model: float32 master weights for full and LoRA training (bf16
    autocast on GPU), a 4-bit NF4 base for QLoRA; evaluation decodes with beam search up to the target length."""
    qlora = settings.method == "qlora"
    return SummarizeSettings(
        model=settings.model,
        text_column=settings.text_column,
        id_column=None,
        dtype="bfloat16" if (qlora and on_gpu) else "float32",
        quantization="nf4" if qlora else "none",
        max_input_tokens=settings.max_input_tokens,
        max_new_tokens=settings.max_target_tokens,
        num_beams=4,
        max_batch_tokens=max(16384, settings.max_input_tokens),
    )


def finetune(
    settings: FinetuneSettings,
    *,
    replicas: int,
    resume: bool = False,
    cpus_per_replica: int = 1,
    placement: Placement = DEFAULT_PLACEMENT,
    out=sys.stderr,
) -> dict:
    """Train, save the final model, evaluate. The caller owns ray.init(). Raises InputError / ModelLoadError /
    OutputError (a --resume that would not continue the checkpoint's run) / PlacementError (fewer replicas
    placed than asked) before any replica trains, and TrainingError when training diverges."""
    # Everything that can be wrong is found before any replica trains.
    MT5ForConditionalGeneration.check_pretrained(settings.model)
    MT5Tokenizer.from_pretrained(settings.model)
    train_rows = len(load_examples(settings.train, settings.text_column, settings.summary_column))
    evaluation = load_examples(settings.eval, settings.text_column, settings.summary_column) if settings.eval else None
    output = Path(settings.output_model)
    if resume and (checkpoint := latest_checkpoint(output)) is not None:
        check_resume(checkpoint, settings, replicas)
    quantization = "nf4" if settings.method == "qlora" else "none"
    # the replicas tokenize their training and evaluation text in their own thread: no CPU asked to tokenize
    placement = dataclasses.replace(placement, tokenize_workers=0)
    placement.check(quantization)
    log = EventLog(out)
    target = placement.choose(cpus_per_replica, quantization, log)
    output.mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    actors = start_replicas(
        inference_settings(settings, target.device == "cuda"),
        settings.train,
        str(output),
        None,
        replicas,
        cpus_per_replica,
        placement=placement,
        target=target,
        log=log,
    )
    try:
        if len(actors) < replicas:
            # Fewer ranks would change the global batch (and a --resume's world size): stop rather than train
            # another run than the one asked for.
            raise PlacementError(
                f"{len(actors)} of {replicas} replicas were placed within --placement-timeout "
                f"({placement.placement_timeout:g} s); fine-tuning needs all of them: ask for fewer --replicas, "
                "or wait longer"
            )
        address, port = ray.get(actors[0].train_address.remote())
        pending = [
            actor.train.remote(settings, rank, len(actors), address, port, resume) for rank, actor in enumerate(actors)
        ]
        _follow_log(pending, output / TRAIN_LOG, out)
        try:
            results = ray.get(pending)
        except ray.exceptions.RayTaskError as err:
            # Every replica raises the same TrainingError (they decide from all-reduced flags): the caller gets
            # its message, not a remote traceback.
            if isinstance(err.cause, (TrainingError, OutputError)):
                raise err.cause from None
            raise
        report = {
            "train_rows": train_rows,
            "replicas": len(actors),
            "seconds": round(time.monotonic() - start, 2),
            **results[0],
            "settings": dataclasses.asdict(settings),
        }
        if evaluation:
            report["eval"] = evaluate(actors, evaluation, output)
        print(json.dumps({k: v for k, v in report.items() if k != "settings"}), file=out, flush=True)
    finally:  # a failed run must not leave replicas holding the cluster's CPUs or GPUs
        for actor in actors:
            ray.kill(actor)
    return report


def evaluate(actors, examples: list[tuple[str, str]], output: Path) -> dict:
    """Summarize the evaluation set on the trained replicas and score it; writes <output>/eval.json."""
    from .evaluate import rouge

    texts = [text for text, _ in examples]
    share = -(-len(texts) // len(actors))
    parts = ray.get(
        [actor.summarize_texts.remote(texts[i * share : (i + 1) * share]) for i, actor in enumerate(actors)]
    )
    predictions = [p or "" for part in parts for p in part]
    references = [summary for _, summary in examples]
    scores = rouge(predictions, references)
    scores["exact_match"] = 100.0 * sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(texts)
    scores["rows"] = len(texts)
    (output / "eval.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def _follow_log(pending, log: Path, out) -> None:
    """A progress line from rank 0's train_log.jsonl while the replicas train."""
    tty = hasattr(out, "isatty") and out.isatty()
    shown = None
    while True:
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=2.0)
        if log.exists():
            lines = log.read_text(encoding="utf-8").splitlines()
            if lines and lines[-1] != shown:
                shown = lines[-1]
                try:
                    record = json.loads(shown)
                except json.JSONDecodeError:
                    record = None  # a line being written
                if record:
                    loss = (
                        "skipped: loss or gradient not finite"
                        if record.get("skipped")
                        else f"loss {record['loss']:.4f}"
                    )
                    line = (
                        f"[finetune] step {record['step']}  {loss}  lr {record['lr']:.2e}  "
                        f"{record['tokens_per_second']:.0f} tokens/s"
                    )
                    print(line, end="\r" if tty else "\n", file=out, flush=True)
        if len(done) == len(pending):
            if tty:
                print(file=out)
            return
