"""Fine-tune mT5 on the summarization replicas: full, LoRA or QLoRA, data-parallel, resumable.

  ray job submit --working-dir . -- python jobs/finetune.py --model google/mt5-small \\
      --train s3://lake/train/ --eval s3://lake/dev/ --output-model /shared/models/mt5-news --replicas 4
  python jobs/finetune.py ...         # connects to RAY_ADDRESS, or starts a local Ray

The final model is a Hugging Face checkpoint (config.json, model.safetensors, generation_config.json,
spiece.model, tokenizer_config.json) that transformers and jobs/summarize.py load. The output folder
must be on storage every replica can write (a local path for one machine, a shared mount otherwise).
Exit status: 0 on success; 2 for usage errors, found before any training (bad flags, missing columns, empty
targets, no files, a --resume whose settings or --replicas differ from the checkpoint's); 1 when training
fails, among them a diverged run (--max-nonfinite-steps skipped steps in a row, or non-finite weights;
nothing non-finite is saved).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.errors import ModelLoadError  # noqa: E402
from pipeline.errors import InputError, OutputError  # noqa: E402
from pipeline.optim import OPTIMIZERS  # noqa: E402
from pipeline.train import METHODS, FinetuneSettings, TrainingError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base checkpoint: directory, fsspec URI or hub id")
    p.add_argument("--train", required=True, help="training shards (directory, glob or file) with text and summary")
    p.add_argument("--eval", help="evaluation shards: summarized after training, ROUGE to <output-model>/eval.json")
    p.add_argument("--output-model", required=True, help="where the fine-tuned checkpoint is written")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cpus-per-replica", type=int, default=1)
    p.add_argument("--method", choices=METHODS, default="full")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adafactor")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8, help="per replica and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--max-input-tokens", type=int, default=512)
    p.add_argument("--max-target-tokens", type=int, default=84)
    p.add_argument("--text-column", default="text")
    p.add_argument("--summary-column", default="summary")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on GPU, float32 on CPU), float32, bfloat16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--max-nonfinite-steps", type=int, default=8,
                   help="a step with a non-finite loss or gradient is skipped; this many in a row stop the run")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("replicas", "cpus_per_replica", "resume")}
    try:
        settings = FinetuneSettings(**fields)
        if args.replicas < 1:
            raise ValueError("--replicas must be >= 1")
    except ValueError as err:
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return 2

    import ray

    from jobs.ray_address import ray_address
    from pipeline.finetune import finetune

    ray.init(address=ray_address(), logging_level="warning")
    try:
        finetune(settings, replicas=args.replicas, resume=args.resume, cpus_per_replica=args.cpus_per_replica)
    except (InputError, ModelLoadError, OutputError) as err:
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
