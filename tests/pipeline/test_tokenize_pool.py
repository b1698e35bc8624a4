"""Tokenizing in worker processes: the same ids, summaries, errors and statistics as in the replica's own thread, on
real text and on the rows that go wrong; a killed worker loses no row; and what a replica asks Ray for them."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pyarrow as pa
import pytest

from model import MT5ForConditionalGeneration, MT5Tokenizer
from pipeline.placement import Placement, cpus_per_gpu
from pipeline.settings import SummarizeSettings
from pipeline.stages import Summarizer, _ModelThread
from pipeline.stats import Stats
from pipeline.tokenize_pool import ATTEMPTS, AUTO_MAX_WORKERS, TokenizePool

# Small windows (batch_size 2: windows of 16 rows, and row groups of 3 rows make windows of 3), so that several
# are in the pool at once; max_input_tokens 64, so that the real documents are cut and truncated.
SETTINGS = dict(num_beams=1, max_new_tokens=4, batch_size=2, max_input_tokens=64, max_batch_tokens=256)
ROW_GROUP = 3


class SlowTokenizer(MT5Tokenizer):
    """Takes a fifth of a second a call, in the workers too (it is pickled to them): windows are still being
    tokenized when a worker is killed."""

    def __call__(self, texts, **kwargs):
        time.sleep(0.2)
        return super().__call__(texts, **kwargs)


class DyingTokenizer(MT5Tokenizer):
    """Kills the worker process that runs it; tokenizes in the test's own process."""

    def __call__(self, texts, **kwargs):
        if multiprocessing.parent_process() is not None:
            os._exit(1)
        return super().__call__(texts, **kwargs)


class FailingTokenizer(MT5Tokenizer):
    def __call__(self, texts, **kwargs):
        raise ValueError(f"cannot tokenize {len(texts)} texts")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def table():
    """Documents of 40 to 3,000 characters from Django's translations in 12 languages and 6 scripts, then the rows
    that go wrong or get cut: null, empty, blank, not UTF-8, and long (spaced, unspaced)."""
    real_text = pytest.importorskip("synthetic.real_text")
    try:
        languages = real_text.django_translations()
    except ImportError:
        pytest.skip("needs django, whose translations are the real text")
    texts: list[bytes | None] = []
    for n, language in enumerate(["ar", "de", "el", "fr", "hi", "ja", "ko", "pl", "ru", "th", "uk", "zh_Hans"]):
        text = " ".join(languages[language])
        for length in (40 + 97 * n, 800 + 181 * n, 3000):
            texts.append(text[length : 2 * length].encode())
    texts += [
        None,
        b"",
        b" \n\t ",
        "un café noir".encode("latin-1"),  # é as the byte 0xe9: not UTF-8
        " ".join(languages["fr"] * 40)[:400_000].encode(),  # over-long, spaced
        "".join(languages["zh_Hans"] * 40).replace(" ", "")[:400_000].encode(),  # over-long, no space to cut at
    ]
    column = pa.array(texts, pa.binary()).cast(pa.string(), safe=False)  # Arrow keeps the bad UTF-8 as is
    return pa.table({"id": list(range(len(texts))), "text": column})


def _summarize(model, tokenizer, checkpoint, table, workers, monkeypatch, batches=None):
    """The output table, the Stats, the (row, ids) every window sent the model in order, how many tokenizer calls
    ran in this process, and the closed summarizer. `batches(summarizer)`: the input, the table's row groups if
    None."""
    sent, here = [], []
    submit = _ModelThread.submit

    def recording_submit(self, rows, window_rows):
        sent.append(rows)
        return submit(self, rows, window_rows)

    def counted_encode(tokenizer, texts):
        here.append(len(texts))
        return tokenizer(texts)["input_ids"]

    monkeypatch.setattr(_ModelThread, "submit", recording_submit)
    monkeypatch.setattr("pipeline.stages.encode_with", counted_encode)  # the workers' own encode_with is not this
    summarizer = Summarizer(model, tokenizer, SummarizeSettings(model=str(checkpoint), **SETTINGS), workers)
    stats = Stats()
    try:
        read = batches(summarizer) if batches else table.to_batches(max_chunksize=ROW_GROUP)
        out = list(summarizer.stream(read, stats))
    finally:
        summarizer.close()
    monkeypatch.undo()
    return pa.Table.from_batches(out), stats, sent, len(here), summarizer


def _same_stats(a: Stats, b: Stats) -> None:
    a.model_seconds = b.model_seconds = 0.0  # the one that is a time
    assert a == b


def test_two_workers_give_the_same_ids_summaries_errors_and_stats_on_real_text_and_edge_rows(
    model, tiny_checkpoint, table, monkeypatch
):
    tokenizer = MT5Tokenizer.from_pretrained(tiny_checkpoint)
    here_out, here_stats, here_sent, here_calls, _ = _summarize(
        model, tokenizer, tiny_checkpoint, table, 0, monkeypatch
    )
    pool_out, pool_stats, pool_sent, pool_calls, _ = _summarize(
        model, tokenizer, tiny_checkpoint, table, 2, monkeypatch
    )

    assert here_calls > 0 and pool_calls == 0  # the pool tokenized every window
    assert pool_sent == here_sent  # the same ids, window by window, in the same order
    assert pool_out.equals(here_out)
    _same_stats(pool_stats, here_stats)
    # the reference itself is what it should be: the edge rows' errors, the long rows cut and truncated
    errors = here_out.column("error").to_pylist()
    assert errors[-6:-3] == ["empty text: nothing to summarize"] * 3 and "0xe9 at offset 6" in errors[-3]
    assert errors[:-6] == [None] * (len(errors) - 6) and errors[-2:] == [None, None]
    assert here_stats.empty == 3 and here_stats.failed_rows == 1 and here_stats.truncated >= 2 + 12


def test_a_killed_worker_is_replaced_and_its_windows_tokenized_again(model, tiny_checkpoint, table, monkeypatch):
    """A worker is killed (SIGKILL) while the pool holds windows: the pool starts again, every window comes out
    with the ids, summaries, errors and statistics of a run in the replica's own thread, and close() stops the
    workers."""
    slow = SlowTokenizer.from_pretrained(tiny_checkpoint)
    reference, reference_stats, reference_sent, _, _ = _summarize(model, slow, tiny_checkpoint, table, 0, monkeypatch)

    killed = []

    def batches_then_a_kill(summarizer):
        for n, batch in enumerate(table.to_batches(max_chunksize=ROW_GROUP)):
            if n == 3:  # three windows are in the pool, a fifth of a second each
                killed.append(summarizer._pool.pids()[0])
                os.kill(killed[0], signal.SIGKILL)
            yield batch
        killed.extend(summarizer._pool.pids())  # the new pool's, or the broken one's if it is not replaced yet

    out, stats, sent, _, summarizer = _summarize(
        model, slow, tiny_checkpoint, table, 2, monkeypatch, batches=batches_then_a_kill
    )
    assert killed and summarizer._pool.restarts >= 1
    assert sent == reference_sent and out.equals(reference)
    _same_stats(stats, reference_stats)
    for pid in killed:  # closed with the summarizer: no worker left
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_window_that_kills_every_worker_is_tokenized_in_the_caller_and_errors_reach_it(tiny_checkpoint):
    """A window whose worker dies each time is sent to ATTEMPTS pools, then tokenized in the caller: not lost. A
    tokenizer's error in a worker is raised to the caller, as it would be in the caller's own thread."""
    dying = DyingTokenizer.from_pretrained(tiny_checkpoint)
    pool = TokenizePool(dying, 1)
    try:
        texts = ["un café noir", "ein Haus am See"]
        assert pool.encode(texts).result(timeout=120) == dying(texts)["input_ids"]
        assert pool.restarts == ATTEMPTS  # each pool that broke replaced, the last one for the windows to come
    finally:
        pool.close()
    failing = TokenizePool(FailingTokenizer.from_pretrained(tiny_checkpoint), 1)
    try:
        with pytest.raises(ValueError, match="cannot tokenize 2 texts"):  # the worker's error, as here
            failing.encode(["a", "b"]).result(timeout=120)
    finally:
        failing.close()


# --- what a replica asks Ray for ------------------------------------------------------------------------------

GPU_CLUSTER = {"CPU": 32.0, "GPU": 8.0}


@pytest.mark.parametrize(
    "placement,node_cpus_per_gpu,num_cpus",
    [
        (Placement(), 4.0, 3),  # auto: 4 CPUs a GPU, one for the replica's thread, one for Ray Data: 2 workers
        (Placement(), 26.0, 1 + AUTO_MAX_WORKERS),  # a big GPU node: capped
        (Placement(gpus_per_replica=0.25), 4.0, 1),  # a quarter of a GPU: a CPU, no worker
        (Placement(), None, 1),  # no GPU node to look at yet (autoscaling): none
        (Placement(tokenize_workers=0), 26.0, 1),
        (Placement(tokenize_workers=6), 2.0, 7),  # asked for: asked of Ray whatever the nodes
    ],
)
def test_a_gpu_replica_asks_ray_for_a_cpu_per_tokenize_worker(placement, node_cpus_per_gpu, num_cpus):
    target = placement.target(GPU_CLUSTER, cpus_per_replica=2, node_cpus_per_gpu=node_cpus_per_gpu)
    assert target.device == "cuda" and target.options["num_cpus"] == num_cpus
    assert target.tokenize_workers == num_cpus - 1  # what the replica is handed: the CPUs asked beyond its own
    assert (f"{num_cpus - 1} CPU(s) to tokenize" in target.reason) == (num_cpus > 1)


def test_a_cpu_replica_tokenizes_in_its_own_thread_unless_asked():
    assert Placement(device="cpu").target(GPU_CLUSTER, 4, node_cpus_per_gpu=26.0).options == {"num_cpus": 4}
    asked = Placement(device="cpu", tokenize_workers=2).target(GPU_CLUSTER, 4)
    assert asked.options == {"num_cpus": 6} and "4 CPU core(s) per replica and 2 to tokenize" in asked.reason
    assert asked.tokenize_workers == 2


def test_cpus_per_gpu_is_the_fewest_of_the_live_gpu_nodes():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0}},  # a CPU node (the head)
        {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0}},
        {"Alive": True, "Resources": {"CPU": 48.0, "GPU": 4.0}},
        {"Alive": False, "Resources": {"CPU": 2.0, "GPU": 2.0}},  # gone
    ]
    assert cpus_per_gpu(nodes) == 8.0
    assert cpus_per_gpu(nodes[:1]) is None


@pytest.mark.parametrize("device,gpus", [("cpu", 0), ("auto", 1)], ids=["cpu", "gpu"])
def test_the_workers_the_placement_counted_reach_each_replicas_summarizer(tiny_checkpoint, tmp_path, device, gpus):
    """The Summarizer of a replica started by the driver, and of a Ray Data actor, runs the tokenize workers its
    Target counted (and asked Ray a CPU each for), none where it counted none. "gpu": a Ray declaring a GPU, so the
    target is cuda (the replica runs on CPU torch; its workers are the placement's all the same)."""
    from pipeline.driver import start_replicas
    from pipeline.ray_data import SummarizeBatches, map_batches_options
    from tests.pipeline.helpers import FAST, local_ray

    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    quiet = lambda *args, **fields: None  # noqa: E731
    with local_ray(num_gpus=gpus) as ray:
        for workers in (0, 1):
            placement = Placement(device=device, tokenize_workers=workers, placement_timeout=60)
            (actor,) = start_replicas(settings, "i", str(tmp_path), None, 1, 1, placement=placement, log=quiet)
            try:
                assert ray.get(actor.where.remote())["tokenize_workers"] == workers
            finally:
                ray.kill(actor)
            options = map_batches_options(settings, placement, log=quiet)
            assert options["num_cpus"] == 1 + workers
            batches = SummarizeBatches(**options["fn_constructor_kwargs"])  # in this process: Ray Data's actor
            try:
                pool = batches.summarizer._pool
                assert (pool.workers if pool else 0) == workers
            finally:
                batches.summarizer.close()


def test_a_replica_given_a_cpu_to_tokenize_summarizes_as_one_without(tiny_checkpoint, tmp_path):
    """--tokenize-workers 1 on CPU: the replica asks Ray for a CPU more, starts a worker (spawn, inside the Ray
    actor) and writes the summaries that a replica tokenizing in its own thread writes."""
    import io

    from pipeline.driver import run
    from synthetic.corpus import documents, write_shards
    from tests.pipeline.helpers import FAST, local_ray, read_output

    docs = documents(12, seed=4)
    write_shards(tmp_path / "in", docs, files=1, row_group_size=4)
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    outputs, logs = {}, {}
    with local_ray():
        for workers in (0, 1):
            logs[workers] = io.StringIO()
            placement = Placement(device="cpu", tokenize_workers=workers)
            out = tmp_path / f"out-{workers}"
            report = run(settings, str(tmp_path / "in"), str(out), replicas=1, placement=placement, out=logs[workers])
            assert report.success
            outputs[workers] = read_output(out).sort_by("id").select(["id", "summary", "error"])
    assert "1 CPU core(s) per replica and 1 to tokenize" in logs[1].getvalue().splitlines()[0]
    assert outputs[1].equals(outputs[0]) and outputs[0].column("summary").null_count == 0
