"""Summarize a data lake's Parquet / Arrow shards with mT5 on Ray.

  ray job submit --working-dir . -- python jobs/summarize.py --model DIR_OR_HUB_ID --input s3://lake/docs/ --output s3://lake/summaries/
  python jobs/summarize.py ...        # connects to RAY_ADDRESS, or starts a local Ray

Exit status: 0 when every unit committed, 1 when some failed (each named on stderr), 2 for usage errors
(bad flags, missing columns, a broken model, an output written with other settings, an output another run
is writing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.errors import ModelLoadError  # noqa: E402
from pipeline.driver import DEFAULT_REPLICA_TIMEOUT  # noqa: E402
from pipeline.errors import InputError, OutputError  # noqa: E402
from pipeline.lease import DEFAULT_TIMEOUT as DEFAULT_LEASE_TIMEOUT  # noqa: E402
from pipeline.settings import DTYPES, QUANTIZATIONS, SummarizeSettings  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="summarize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory, fsspec URI or hub id")
    p.add_argument("--revision", default=None,
                   help="for a hub id: a branch, tag or commit (default: main); resolved to one commit that every "
                        "replica loads, recorded in the manifest")
    p.add_argument("--input", required=True, nargs="+",
                   help="a directory, a glob, or several paths of .parquet / .arrow / .feather shards")
    p.add_argument("--output", required=True, help="output directory (local, s3://, gs://, memory://, ...)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default="id", help="carried through and used in messages; '' for none")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (one GPU, or --cpus-per-replica cores, each)")
    p.add_argument("--cpus-per-replica", type=int, default=1, help="CPU cores per replica when there is no GPU")
    p.add_argument("--batch-size", type=int, default=32, help="most documents decoded at once (continuous batching)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="documents x longest input, decoded at once")
    p.add_argument("--rows-per-unit", type=int, default=20000, help="rows per work unit (big files are split)")
    p.add_argument("--max-input-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=84)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="default: the checkpoint's generation config")
    p.add_argument("--length-penalty", type=float, default=None, help="default: the checkpoint's generation config")
    p.add_argument("--prefix", default="", help="text put before every document (e.g. 'summarize: ')")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="int8, nf4, fp4: bitsandbytes (GPU or CPU); int8-dynamic: torch's int8 matmuls, CPU and "
                        "float32 only")
    p.add_argument("--output-vocabulary", default=None, metavar="PATH",
                   help="a UTF-8 text file in the languages you summarize (local or fsspec URI): summaries use only "
                        "the pieces it tokenizes to; faster, at some cost in quality")
    p.add_argument("--partition-filter", default=None,
                   help="only shards whose Hive folders match, e.g. 'date>=2026-11-01,lang=en' (scheduled runs)")
    p.add_argument("--overwrite", action="store_true", help="replace an output written with other settings")
    p.add_argument("--dry-run", action="store_true",
                   help="print what the run would do (units to run, redo, skip and remove, with row counts) and exit "
                        "0 without touching the output")
    p.add_argument("--lease-timeout", type=float, default=DEFAULT_LEASE_TIMEOUT, metavar="SECONDS",
                   help="one run writes an output at a time; a run silent this long (killed) has its lease taken "
                        "over by the next")
    p.add_argument("--storage-options", type=json.loads, default=None,
                   help="JSON passed to fsspec (credentials are better left to the environment)")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--replica-timeout", type=float, default=DEFAULT_REPLICA_TIMEOUT, metavar="SECONDS",
                   help="a replica that summarizes no row for this long is killed and its units go out again "
                        "(0: never)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object per line on stderr, for log pipelines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = SummarizeSettings(
            model=args.model, revision=args.revision, text_column=args.text_column, id_column=args.id_column or None, prefix=args.prefix,
            dtype=args.dtype, quantization=args.quantization, output_vocabulary=args.output_vocabulary,
            max_input_tokens=args.max_input_tokens,
            max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
            no_repeat_ngram_size=args.no_repeat_ngram_size, length_penalty=args.length_penalty,
            batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, rows_per_unit=args.rows_per_unit)
        if args.replicas < 1:
            raise ValueError("--replicas must be >= 1")
        if args.replica_timeout < 0:
            raise ValueError("--replica-timeout must be >= 0 seconds (0: never)")
    except ValueError as err:
        print(f"summarize.py: error: {err}", file=sys.stderr)
        return 2

    import ray

    from jobs.ray_address import ray_address
    from pipeline.driver import run

    inputs = args.input[0] if len(args.input) == 1 else args.input
    # The job owns Ray's lifecycle: join RAY_ADDRESS (set by `ray job submit`), this machine's cluster,
    # or start a local Ray.
    ray.init(address=ray_address(), logging_level="warning")
    try:
        report = run(settings, inputs, args.output, replicas=args.replicas, overwrite=args.overwrite,
                     storage_options=args.storage_options, cpus_per_replica=args.cpus_per_replica,
                     progress_every=args.progress_every, partition_filter=args.partition_filter,
                     json_logs=args.log_format == "json", dry_run=args.dry_run, lease_timeout=args.lease_timeout,
                     replica_timeout=args.replica_timeout)
    except (InputError, OutputError, ModelLoadError) as err:
        print(f"summarize.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    return 0 if report.success else 1


if __name__ == "__main__":
    sys.exit(main())
