"""--output-vocabulary through the job: summaries use only the sample's pieces; a missing file or another
sample is answered before any work."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest

from model import MT5ForConditionalGeneration, MT5Tokenizer
from model.vocabulary import restrict_vocabulary
from pipeline.driver import run
from pipeline.errors import InputError, OutputError
from pipeline.settings import SummarizeSettings
from pipeline.vocabulary import kept_ids
from synthetic.corpus import documents, write_shards

SETTINGS = dict(
    num_beams=2, max_new_tokens=8, rows_per_unit=20, batch_size=8, max_input_tokens=64, max_batch_tokens=512
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = documents(24, seed=5, max_sentences=3)
    root = tmp_path_factory.mktemp("corpus")
    write_shards(root, docs, files=2, row_group_size=8)
    return root, docs


@pytest.fixture
def sample(tmp_path):
    """A user's sample text: English and German documents, one a line."""
    path = tmp_path / "sample.txt"
    path.write_text(
        "\n".join(d["text"] for d in documents(60, seed=7, max_sentences=2) if d["lang"] in ("en", "de")),
        encoding="utf-8",
    )
    return path


def test_summaries_use_only_the_pieces_of_the_sample(ray_local, corpus, tiny_checkpoint, sample, tmp_path):
    root, docs = corpus
    settings = SummarizeSettings(model=str(tiny_checkpoint), output_vocabulary=str(sample), **SETTINGS)
    report = run(settings, str(root), str(tmp_path / "out"), replicas=1, progress_every=5)
    assert report.success and report.stats.rows == len(docs)
    summaries = {
        r["id"]: r["summary"] for r in pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    }

    # What the restricted model generates in this process, whose ids we can see.
    tokenizer = MT5Tokenizer.from_pretrained(tiny_checkpoint)
    kept = kept_ids(tokenizer, sample.read_text(encoding="utf-8"))
    model = restrict_vocabulary(MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), kept)
    batch = tokenizer([d["text"] for d in docs], max_length=64, truncation=True, padding=True, return_tensors="pt")
    out = model.generate(**batch, **settings.generation())
    assert set(out.flatten().tolist()) <= kept | {0, 1}
    assert len(kept) < 1000  # a real restriction: the tokenizer has 250,100 pieces
    for doc, summary in zip(docs, tokenizer.batch_decode(out, skip_special_tokens=True)):
        assert summaries[doc["id"]] == summary, doc["id"]


def test_another_sample_behind_the_same_path_is_refused_like_other_settings(
    ray_local, corpus, tiny_checkpoint, sample, tmp_path
):
    root, _ = corpus
    settings = SummarizeSettings(
        model=str(tiny_checkpoint), output_vocabulary=str(sample), **{**SETTINGS, "max_new_tokens": 2}
    )
    assert run(settings, str(root), str(tmp_path / "out"), replicas=1).success
    sample.write_text(sample.read_text(encoding="utf-8") + "\nэто река озеро город", encoding="utf-8")
    with pytest.raises(OutputError, match="output_vocabulary_hash.*--overwrite"):
        run(settings, str(root), str(tmp_path / "out"), replicas=1)


def test_a_missing_or_empty_sample_fails_before_any_work(ray_local, corpus, tiny_checkpoint, tmp_path):
    root, _ = corpus
    missing = tmp_path / "nowhere.txt"
    settings = SummarizeSettings(model=str(tiny_checkpoint), output_vocabulary=str(missing), **SETTINGS)
    with pytest.raises(InputError, match=r"--output-vocabulary .*nowhere\.txt: no such file"):
        run(settings, str(root), str(tmp_path / "out"), replicas=1)
    missing.write_text(" \n", encoding="utf-8")
    with pytest.raises(InputError, match=r"--output-vocabulary .*nowhere\.txt is empty"):
        run(settings, str(root), str(tmp_path / "out"), replicas=1)
    assert not (tmp_path / "out").exists()


def test_the_flags_reach_the_settings_and_int8_dynamic_refuses_half_precision(tiny_checkpoint, tmp_path, capsys):
    from jobs.summarize import build_parser, main

    args = build_parser().parse_args(
        [
            "--model",
            "m",
            "--input",
            "i",
            "--output",
            "o",
            "--output-vocabulary",
            "s3://bucket/sample.txt",
            "--quantization",
            "int8-dynamic",
        ]
    )
    assert (args.output_vocabulary, args.quantization) == ("s3://bucket/sample.txt", "int8-dynamic")
    assert (
        main(
            [
                "--model",
                str(tiny_checkpoint),
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path / "out"),
                "--quantization",
                "int8-dynamic",
                "--dtype",
                "bfloat16",
            ]
        )
        == 2
    )
    assert "--quantization int8-dynamic computes in float32" in capsys.readouterr().err
    common = ["--model", str(tiny_checkpoint), "--input", str(tmp_path), "--output", str(tmp_path / "out")]
    assert main([*common, "--quantization", "int8-dynamic", "--compile-decode"]) == 2
    assert "--compile-decode does not run with --quantization int8-dynamic" in capsys.readouterr().err
