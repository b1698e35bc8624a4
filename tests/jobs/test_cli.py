"""The jobs' flags: every setting has one, its default is the library's, and the settings are built from them."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from jobs import cli
from jobs import finetune as finetune_job
from jobs import summarize as summarize_job
from pipeline.driver import run
from pipeline.finetune import finetune
from pipeline.placement import Placement
from pipeline.settings import SummarizeSettings
from pipeline.train import FinetuneSettings

JOBS = [
    (summarize_job, SummarizeSettings, run, ["--model", "m", "--input", "i", "--output", "o"]),
    (finetune_job, FinetuneSettings, finetune, ["--model", "m", "--train", "t", "--output-model", "o"]),
]


@pytest.mark.parametrize("job,settings_class,function,required", JOBS, ids=["summarize", "finetune"])
def test_every_setting_has_a_flag_whose_default_is_the_librarys(job, settings_class, function, required):
    args = job.build_parser().parse_args(required)
    for field in dataclasses.fields(settings_class):
        assert hasattr(args, field.name), f"no flag sets {settings_class.__name__}.{field.name}"
        if field.default is not dataclasses.MISSING:
            assert getattr(args, field.name) == field.default, field.name
    for name, parameter in inspect.signature(function).parameters.items():
        if hasattr(args, name) and parameter.default is not inspect.Parameter.empty:
            assert getattr(args, name) == parameter.default, name


def test_summarize_flags_build_the_settings_and_the_runs_arguments():
    parser = summarize_job.build_parser()
    args = parser.parse_args(
        [
            "--model",
            "m",
            "--input",
            "i",
            "--output",
            "o",
            "--num-beams",
            "2",
            "--id-column",
            "",
            "--length-penalty",
            "0.6",
            "--overwrite",
            "--progress-every",
            "2",
        ]
    )
    settings = cli.settings_from(SummarizeSettings, args, id_column=args.id_column or None)
    assert settings == SummarizeSettings(model="m", num_beams=2, id_column=None, length_penalty=0.6)
    arguments = cli.arguments_for(run, args)
    assert arguments["overwrite"] is True and arguments["progress_every"] == 2.0 and arguments["replicas"] == 1
    assert "settings" not in arguments and "input_url" not in arguments


def test_placement_flags_reach_the_placement_with_the_librarys_defaults():
    parser = summarize_job.build_parser()
    required = ["--model", "m", "--input", "i", "--output", "o"]
    assert cli.settings_from(Placement, parser.parse_args(required)) == Placement()
    args = parser.parse_args(
        [
            *required,
            "--device",
            "cuda",
            "--gpus-per-replica",
            "0.25",
            "--accelerator-type",
            "H100",
            "--placement-timeout",
            "30",
            "--tokenize-workers",
            "3",
        ]
    )
    placement = cli.settings_from(Placement, args)
    assert placement == Placement(
        device="cuda", gpus_per_replica=0.25, accelerator_type="H100", placement_timeout=30, tokenize_workers=3
    )
    auto = parser.parse_args([*required, "--tokenize-workers", "auto"])
    assert cli.settings_from(Placement, auto).tokenize_workers is None  # auto, the default
    assert "device" not in cli.arguments_for(run, args)  # placement travels as one object, not as run()'s arguments


def test_only_the_summarize_job_offers_tokenize_workers():
    """Fine-tuning replicas tokenize in their own thread (pipeline/finetune.py): the flag would mean nothing there."""
    assert "--tokenize-workers" in summarize_job.build_parser().format_help()
    assert "--tokenize-workers" not in finetune_job.build_parser().format_help()
    with pytest.raises(SystemExit):
        finetune_job.build_parser().parse_args(
            ["--model", "m", "--train", "t", "--output-model", "o", "--tokenize-workers", "2"]
        )


def test_finetune_flags_build_the_settings_with_switches_and_optional_numbers():
    args = finetune_job.build_parser().parse_args(
        [
            "--model",
            "m",
            "--train",
            "t",
            "--output-model",
            "o",
            "--gradient-checkpointing",
            "--max-steps",
            "3",
            "--resume",
        ]
    )
    settings = cli.settings_from(FinetuneSettings, args)
    assert settings.gradient_checkpointing is True and settings.max_steps == 3 and settings.lr == 5e-4
    assert cli.arguments_for(finetune, args) == {"replicas": 1, "resume": True, "cpus_per_replica": 1}


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--replicas", "0"], "--replicas: must be >= 1, got 0"),
        (["--replica-timeout", "-1"], "--replica-timeout: must be >= 0, got -1"),
        (["--tokenize-workers", "-1"], "--tokenize-workers: must be >= 0, got -1"),
        (["--tokenize-workers", "many"], "--tokenize-workers: invalid count or auto value: 'many'"),
    ],
)
def test_out_of_range_flags_are_usage_errors_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        summarize_job.main(["--model", "m", "--input", "i", "--output", "o", *flags])
    assert exit.value.code == cli.USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--gpus-per-replica", "1.5"], "--gpus-per-replica above 1 must be a whole number, got 1.5"),
        (["--device", "cpu", "--accelerator-type", "T4"], "--accelerator-type T4 asks for GPUs, and --device cpu"),
    ],
)
def test_placements_ray_could_never_make_are_usage_errors_naming_the_flag(flags, message, capsys):
    assert summarize_job.main(["--model", "m", "--input", "i", "--output", "o", *flags]) == cli.USAGE
    assert message in capsys.readouterr().err


def test_the_summarize_job_parses_its_flags_without_importing_torch(torch_imported_by):
    """torch takes about 0.8 s to import. The job's flags, the driver and its planning need none of it, so the job
    starts Ray while torch imports beside it for the model check (jobs/summarize.py); a module-level import of
    torch anywhere on the driver's path puts those 0.8 s back before Ray starts."""
    child = (
        "import jobs.summarize as job\n"
        "job.build_parser().parse_args(['--model', 'm', '--input', 'i', '--output', 'o'])\n"
    )
    assert torch_imported_by(child) == []
