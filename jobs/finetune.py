"""Fine-tune mT5 on the summarization replicas: full, LoRA or QLoRA, data-parallel, resumable.

  ray job submit --working-dir . -- python jobs/finetune.py --model google/mt5-small \\
      --train s3://lake/train/ --eval s3://lake/dev/ --output-model /shared/models/mt5-news --replicas 4
  python jobs/finetune.py ...         # connects to RAY_ADDRESS, or starts a local Ray
  lakesum-finetune ...                # the same: the console script `pip install .` puts on PATH

The final model is a Hugging Face checkpoint (config.json, model.safetensors, generation_config.json,
spiece.model, tokenizer_config.json) that transformers and jobs/summarize.py load. The output folder
must be on storage every replica can write (a local path for one machine, a shared mount otherwise).
Exit status: 0 on success; 2 for usage errors, found before any training (bad flags, missing columns, empty
targets, no files, a --resume whose settings or --replicas differ from the checkpoint's); 1 when training
fails, among them a diverged run (--max-nonfinite-steps skipped steps in a row, or non-finite weights;
nothing non-finite is saved).
"""

from __future__ import annotations

import sys
from functools import partial

from jobs import cli
from jobs.ray_address import joined_ray
from model.errors import ModelLoadError
from pipeline.errors import InputError, OutputError, PlacementError
from pipeline.finetune import finetune
from pipeline.optim import OPTIMIZERS
from pipeline.placement import Placement
from pipeline.train import METHODS, FinetuneSettings, TrainingError


def build_parser():
    p = cli.parser(__doc__)
    setting = partial(cli.add_flag, p, source=FinetuneSettings)  # a flag for a field of the settings
    setting("--model", help="base checkpoint: directory, fsspec URI or hub id")
    setting("--train", help="training shards (directory, glob or file) with text and summary")
    setting("--eval", help="evaluation shards: summarized after training, ROUGE to <output-model>/eval.json")
    setting("--output-model", help="where the fine-tuned checkpoint is written")
    cli.add_replica_flags(p, finetune)
    cli.add_placement_flags(p)
    setting("--method", choices=METHODS)
    setting("--epochs")
    setting("--max-steps", help="overrides --epochs")
    setting("--lr")
    setting("--optimizer", choices=OPTIMIZERS)
    setting("--weight-decay")
    setting("--batch-size", help="per replica and micro-batch")
    setting("--grad-accum")
    setting("--warmup-steps")
    setting("--max-grad-norm")
    setting("--label-smoothing")
    setting("--max-input-tokens")
    setting("--max-target-tokens")
    setting("--text-column")
    setting("--summary-column")
    setting("--dtype", help="auto (bf16 autocast on GPU, float32 on CPU), float32, bfloat16")
    setting("--gradient-checkpointing")
    setting("--lora-rank")
    setting("--lora-alpha")
    setting("--lora-dropout")
    setting("--seed")
    setting("--save-every", help="steps between resumable checkpoints")
    setting("--log-every")
    setting(
        "--max-nonfinite-steps",
        help="a step with a non-finite loss or gradient is skipped; this many in a row stop the run",
    )
    cli.add_flag(p, "--resume", finetune, help="continue from the latest checkpoint in --output-model")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = cli.settings_from(FinetuneSettings, args)
        placement = cli.settings_from(Placement, args)
        placement.check("nf4" if settings.method == "qlora" else "none")  # before Ray starts
    except (ValueError, PlacementError) as err:
        cli.error(parser, err)
        return cli.USAGE

    with joined_ray():
        try:
            finetune(settings, placement=placement, **cli.arguments_for(finetune, args))
        except (InputError, ModelLoadError, OutputError, PlacementError) as err:
            cli.error(parser, err)
            return cli.USAGE
        except TrainingError as err:
            cli.error(parser, err)
            return cli.FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
