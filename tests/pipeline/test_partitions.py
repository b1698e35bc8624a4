"""--partition-filter: scheduled runs that summarize only the new partitions of a lake, into one output."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.driver import run
from pipeline.errors import InputError
from pipeline.partitions import parse_filter, partitions_of
from pipeline.settings import SummarizeSettings
from tests.fixtures.corpus import documents

SETTINGS = dict(num_beams=1, max_new_tokens=4, rows_per_unit=50, batch_size=8)


@pytest.mark.parametrize("text,partitions,expected", [
    ("date>=2026-11-02", {"date": "2026-11-02"}, True),
    ("date>=2026-11-02", {"date": "2026-11-01"}, False),
    ("date=2026-11-01,lang=en", {"date": "2026-11-01", "lang": "en"}, True),
    ("date=2026-11-01,lang=en", {"date": "2026-11-01", "lang": "hi"}, False),
    ("hour<10", {"hour": "9"}, True),  # numbers compare as numbers, not strings
    ("date!=2026-11-01", {"lang": "en"}, False),  # a shard without the key does not match
])
def test_conditions(text, partitions, expected):
    assert all(c.holds(partitions) for c in parse_filter(text)) is expected


def test_unreadable_filter_is_an_input_error():
    with pytest.raises(InputError, match="cannot read 'yesterday'"):
        parse_filter("date>=2026-11-01,yesterday")
    assert partitions_of("date=2026-11-01/lang=en/part-0.parquet") == {"date": "2026-11-01", "lang": "en"}


def test_nightly_runs_add_new_partitions_to_one_output(ray_local, tiny_checkpoint, tmp_path):
    lake = tmp_path / "lake"
    for n, day in enumerate(["2026-11-01", "2026-11-02", "2026-11-03"]):
        (lake / f"date={day}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(documents(6, seed=n)), lake / f"date={day}" / "part-0.parquet")
    out = tmp_path / "out"
    settings = SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS)
    first = run(settings, str(lake), str(out), replicas=1, partition_filter="date<=2026-11-01")
    assert first.success and first.stats.rows == 6
    second = run(settings, str(lake), str(out), replicas=1, partition_filter="date>=2026-11-02")
    assert second.success and second.stats.rows == 12
    manifest = json.loads((out / "_lakesum" / "manifest.json").read_text())
    assert len(manifest["units"]) == 3
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 18 and len(set(table.column("id").to_pylist())) == 18
    assert (out / "_SUCCESS").exists()
    with pytest.raises(InputError, match="matches --partition-filter"):
        run(settings, str(lake), str(out), replicas=1, partition_filter="date>=2027-01-01")
