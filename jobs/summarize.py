"""Summarize a data lake's Parquet / Arrow shards with mT5 on Ray.

  ray job submit --working-dir . -- python jobs/summarize.py --model DIR_OR_HUB_ID --input s3://lake/docs/ --output s3://lake/summaries/
  python jobs/summarize.py ...        # connects to RAY_ADDRESS, or starts a local Ray
  lakesum-summarize ...               # the same: the console script `pip install .` puts on PATH

The script imports the installed project, or the checkout that `ray job submit --working-dir .` puts first on
the job's PYTHONPATH.

Exit status: 0 when every unit committed, 1 when some failed (each named on stderr), 2 for usage errors
(bad flags, missing columns, a broken model, an output written with other settings, an output another run
is writing, a setting the device cannot run, no replica placed within --placement-timeout).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import threading
from functools import partial

from jobs import cli
from jobs.ray_address import joined_ray
from model.errors import ModelLoadError
from pipeline.driver import run
from pipeline.errors import InputError, OutputError, PlacementError
from pipeline.placement import Placement
from pipeline.settings import DTYPES, QUANTIZATIONS, SummarizeSettings


def build_parser():
    p = cli.parser(__doc__)
    setting = partial(cli.add_flag, p, source=SummarizeSettings)  # a flag for a field of the settings
    argument = partial(cli.add_flag, p, source=run)  # a flag for an argument of run()
    setting("--model", help="checkpoint directory, fsspec URI or hub id")
    setting(
        "--revision",
        help="for a hub id: a branch, tag or commit (default: main); resolved to one commit that "
        "every replica loads, recorded in the manifest",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="a directory, a glob, or several paths of .parquet / .arrow / .feather shards",
    )
    p.add_argument("--output", required=True, help="output directory (local, s3://, gs://, memory://, ...)")
    setting("--text-column")
    setting("--id-column", help="carried through and used in messages; '' for none")
    cli.add_replica_flags(p, run)
    cli.add_placement_flags(p)
    cli.add_tokenize_flag(p)
    setting("--batch-size", help="most documents decoded at once (continuous batching)")
    setting("--max-batch-tokens", help="documents x longest input, decoded at once")
    setting("--rows-per-unit", help="rows per work unit (big files are split)")
    setting(
        "--compile-decode",
        help="decode through the compiled step (torch.compile; CUDA graphs on a GPU): the same summaries, faster "
        "where the eager step is launch-bound; each replica compiles first",
    )
    setting("--max-input-tokens")
    setting("--max-new-tokens")
    setting("--num-beams")
    setting("--no-repeat-ngram-size", help="default: the checkpoint's generation config")
    setting("--length-penalty", help="default: the checkpoint's generation config")
    setting("--prefix", help="text put before every document (e.g. 'summarize: ')")
    setting(
        "--dtype",
        choices=DTYPES,
        help="auto: bfloat16 on a GPU that has it, else float16 (wo kept in float32); float32 on CPU",
    )
    setting(
        "--quantization",
        choices=QUANTIZATIONS,
        help="auto: on GPU the fastest of none (bfloat16), int8-weight-only and nf4 whose weights and decoding fit a "
        "replica's share of GPU memory, none on CPU (chosen once, logged, recorded in the manifest); "
        "int8-weight-only: int8 weights dequantized inside each matmul (GPU or CPU); int8, nf4, fp4: bitsandbytes "
        "(GPU or CPU); int8-dynamic: torch's int8 matmuls, CPU and float32 only (--device auto then runs on CPU)",
    )
    setting(
        "--output-vocabulary",
        metavar="PATH",
        help="a UTF-8 text file in the languages you summarize (local or fsspec URI): summaries use only the "
        "pieces it tokenizes to; faster, at some cost in quality",
    )
    argument(
        "--partition-filter",
        help="only shards whose Hive folders match, e.g. 'date>=2026-11-01,lang=en' (scheduled runs)",
    )
    argument("--overwrite", help="replace an output written with other settings")
    argument(
        "--dry-run",
        help="print what the run would do (units to run, redo, skip and remove, with row counts) "
        "and exit 0 without touching the output",
    )
    argument(
        "--lease-timeout",
        metavar="SECONDS",
        help="one run writes an output at a time; a run silent this long (killed) has its lease taken over by the next",
    )
    argument(
        "--storage-options",
        type=json.loads,
        help="JSON passed to fsspec (credentials are better left to the environment)",
    )
    argument("--progress-every", help="seconds between progress lines")
    argument(
        "--replica-timeout",
        type=cli.at_least(0, float),
        metavar="SECONDS",
        help="a replica that summarizes no row for this long is killed and its units go out again (0: never)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object per line on stderr, for log pipelines",
    )
    return p


def import_early(module: str) -> None:
    """Import `module` ahead of its first use. A failure is left to that use, which reports it where the job
    handles errors, rather than a second traceback from this thread."""
    with contextlib.suppress(Exception):
        importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = cli.settings_from(SummarizeSettings, args, id_column=args.id_column or None)
        placement = cli.settings_from(Placement, args)
        placement.check(settings.quantization)  # before Ray starts
    except (ValueError, PlacementError) as err:
        cli.error(parser, err)
        return cli.USAGE

    inputs = args.input[0] if len(args.input) == 1 else args.input
    # The driver's model check needs torch, about 0.8 s to import; Ray's start-up mostly waits on the processes
    # it starts, so torch imports beside it rather than after it.
    threading.Thread(target=import_early, args=("model.mt5",), daemon=True).start()
    with joined_ray():
        try:
            report = run(
                settings,
                inputs,
                args.output,
                **cli.arguments_for(run, args),
                placement=placement,
                json_logs=args.log_format == "json",
            )
        except (InputError, OutputError, ModelLoadError, PlacementError) as err:
            cli.error(parser, err)
            return cli.USAGE
    return 0 if report.success else cli.FAILED


if __name__ == "__main__":
    sys.exit(main())
