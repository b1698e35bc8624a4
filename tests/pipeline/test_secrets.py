"""No secret written anywhere: canaries planted in the model URI, the input URI and --storage-options, then every
file the job wrote (output, `_lakesum/`, Ray's logs of the driver and replicas) and everything it printed is
searched for them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipeline.driver import run
from pipeline.errors import InputError
from pipeline.settings import SummarizeSettings
from synthetic.corpus import documents, write_shards

CANARY = "canary-7f3e9b21"
SETTINGS = dict(num_beams=1, max_new_tokens=4, rows_per_unit=10, batch_size=4)


def _session_files() -> list[Path]:
    import ray

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    return [p for p in session.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".json", ".txt")]


@pytest.mark.slow
def test_canary_secrets_appear_in_no_file_the_job_writes_and_in_nothing_it_prints(
    s3_then_ray, tiny_checkpoint, tmp_path, capfd
):
    fs, bucket, options = s3_then_ray
    options = {**options, "secret": f"{CANARY}-options"}  # moto takes any secret; the job must not show it
    fs = type(fs)(**options)
    local = tmp_path / "corpus"
    for path in write_shards(local, documents(20, seed=31), files=2, row_group_size=10):
        fs.put_file(str(path), f"{bucket}/corpus/{path.relative_to(local).as_posix()}")
    model = f"file://{tiny_checkpoint}?token={CANARY}-model"
    printed = io.StringIO()

    report = run(
        SummarizeSettings(model=model, **SETTINGS),
        f"s3://{bucket}/corpus",
        f"s3://{bucket}/out",
        replicas=1,
        storage_options=options,
        out=printed,
        progress_every=0.5,
    )
    assert report.success and report.stats.rows == 20
    with pytest.raises(InputError) as error:  # a failing run: its message names the input, not its token
        run(
            SummarizeSettings(model=model, **SETTINGS),
            f"s3://{bucket}/nowhere/?token={CANARY}-input",
            f"s3://{bucket}/out2",
            replicas=1,
            storage_options=options,
            out=printed,
        )

    fs.invalidate_cache()
    written = {name: fs.cat_file(name) for name in fs.find(f"{bucket}/out/") + fs.find(f"{bucket}/out2/")}
    assert "_lakesum/manifest.json" in " ".join(written) and "_lakesum/report.json" in " ".join(written)
    logs = _session_files()
    assert logs, "Ray's session logs were not found where this test looks"
    captured = capfd.readouterr()
    for where, text in [
        ("the job's lines", printed.getvalue()),
        ("stdout", captured.out),
        ("stderr", captured.err),
        ("the error", str(error.value)),
        *((name, data.decode(errors="replace")) for name, data in written.items()),
        *((str(p), p.read_text(errors="replace")) for p in logs),
    ]:
        assert CANARY not in text, f"a canary secret is in {where}"
