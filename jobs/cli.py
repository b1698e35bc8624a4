"""The jobs' command line: flags whose default lives in the library, and the settings and arguments built from them.

A flag for a field of a settings dataclass (`--max-new-tokens` for SummarizeSettings.max_new_tokens) or for a
parameter of the function a job calls (`--progress-every` for pipeline.driver.run) takes the field's default and
type: each default is written once, in the library, and a flag of the same name reaches it. Both jobs parse,
build their settings and call the library the same way.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing

from pipeline.placement import DEVICES, Placement
from pipeline.tokenize_pool import AUTO_MAX_WORKERS

# Exit statuses: 0 success, FAILED when the work ran and some of it failed, USAGE when something was found wrong
# before any work (flags, input, model, output).
FAILED = 1
USAGE = 2


def parser(description: str) -> argparse.ArgumentParser:
    """The job's parser; `description` is the job's docstring, shown by --help as written."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_flag(parser: argparse.ArgumentParser, flag: str, source, **kwargs) -> None:
    """Add `flag` for the parameter of `source` (a settings dataclass or a function) that it names: `--max-new-tokens`
    sets `max_new_tokens` (or `dest`, where the names differ). Its default is the parameter's (none: the flag is
    required), and so is its type: a bool becomes an on-switch, `int | None` an int. `kwargs` are argparse's (help,
    choices, metavar, type)."""
    name = kwargs.pop("dest", None) or flag.removeprefix("--").replace("-", "_")
    parameter = inspect.signature(source, eval_str=True).parameters[name]
    if parameter.default is inspect.Parameter.empty:
        kwargs["required"] = True
    else:
        kwargs["default"] = parameter.default
    kind = _plain_type(parameter.annotation)
    if kind is bool:
        kwargs.setdefault("action", "store_true")
    elif kind in (int, float):
        kwargs.setdefault("type", kind)
    parser.add_argument(flag, dest=name, **kwargs)


def add_replica_flags(parser: argparse.ArgumentParser, source) -> None:
    """--replicas and --cpus-per-replica, as both jobs take them; `source` is the function the job calls."""
    parser.add_argument(
        "--replicas",
        type=at_least(1),
        default=1,
        help="model replicas (--gpus-per-replica GPUs, or --cpus-per-replica cores, each)",
    )
    add_flag(parser, "--cpus-per-replica", source, help="CPU cores per replica on CPU")


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of pipeline.placement.Placement but --tokenize-workers (add_tokenize_flag): where replicas run, what
    each asks for, and how long to wait."""
    add_flag(
        parser,
        "--device",
        Placement,
        choices=DEVICES,
        help="auto: GPUs if the cluster shows any when the job starts, else CPU; cuda: wait for GPUs (an "
        "autoscaling cluster), never fall back to CPU; cpu: ask for no GPU",
    )
    add_flag(parser, "--gpus-per-replica", Placement, help="GPUs per replica; a fraction shares one (0.25: four a GPU)")
    add_flag(
        parser,
        "--accelerator-type",
        Placement,
        metavar="TYPE",
        help="only GPUs of this Ray accelerator type (A100, H100, L4, T4, ...: ray.util.accelerators)",
    )
    add_flag(
        parser,
        "--placement-timeout",
        Placement,
        metavar="SECONDS",
        help="replicas not placed with their model loaded by then are dropped, with a warning; none placed: exit 2",
    )


def add_tokenize_flag(parser: argparse.ArgumentParser) -> None:
    """--tokenize-workers (Placement.tokenize_workers): summarizing only; fine-tuning replicas tokenize in their own
    thread and ask Ray for no CPU to tokenize."""
    add_flag(
        parser,
        "--tokenize-workers",
        Placement,
        type=at_least_or_auto(0),
        metavar="N",
        help="processes that tokenize for each replica, each a CPU more asked of Ray (0: the replica's own thread). "
        "auto (default): 0 on CPU, where the cores run the model; on a GPU, the replica's share of its node's CPUs "
        f"less two (its own thread, and one for Ray Data and the driver), at most {AUTO_MAX_WORKERS}",
    )


def settings_from(settings_class, args: argparse.Namespace, **overrides):
    """`settings_class` built from the flags of its fields, and `overrides`. Raises ValueError for values it refuses."""
    names = inspect.signature(settings_class).parameters
    return settings_class(**{**{name: getattr(args, name) for name in names if hasattr(args, name)}, **overrides})


def arguments_for(function, args: argparse.Namespace) -> dict:
    """The keyword arguments of `function` that flags of the same name set."""
    return {name: getattr(args, name) for name in inspect.signature(function).parameters if hasattr(args, name)}


def at_least(minimum: float, kind=int):
    """An argparse type: `kind`, refused below `minimum`."""

    def parse(text: str):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message for a value it cannot parse
    return parse


def at_least_or_auto(minimum: int):
    """An argparse type: "auto" as None, else an int refused below `minimum`."""
    count = at_least(minimum)

    def parse(text: str):
        return None if text == "auto" else count(text)

    parse.__name__ = "count or auto"
    return parse


def error(parser: argparse.ArgumentParser, err: Exception) -> None:
    print(f"{parser.prog}: error: {err}", file=sys.stderr)


def _plain_type(annotation):
    """int for `int` and for `int | None`; the annotation itself otherwise."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else annotation
    return annotation
