"""Where replicas run: the device the job chooses, GPU shares, and a job that never hangs on replicas it cannot place.

The Ray tests declare a GPU that the machine need not have (ray.init(num_gpus=1)): Ray places by its resources,
and a replica given that GPU runs on CPU torch unless --device cuda asked for CUDA.
"""

from __future__ import annotations

import io
import subprocess

import pytest
import torch

from jobs import cli
from jobs import summarize as summarize_job
from pipeline.driver import run, start_replicas
from pipeline.errors import PlacementError
from pipeline.placement import Placement
from pipeline.settings import SummarizeSettings
from synthetic.corpus import documents, write_shards
from tests.pipeline.helpers import FAST, assert_every_row_once, job_command, local_job_env, local_ray, read_output

# Seconds a replica gets to be placed and load the tiny model: enough on a busy 2-core machine, and short, since
# the unplaced replica's test waits all of it.
PLACEMENT_TIMEOUT = 20.0
GPU_CLUSTER = {"CPU": 8.0, "GPU": 2.0, "accelerator_type:T4": 1.0}
CPU_CLUSTER = {"CPU": 8.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 documents in 2 files: 4 units of 10 rows."""
    docs = documents(40, seed=3)
    root = tmp_path_factory.mktemp("corpus")
    write_shards(root, docs, files=2, row_group_size=5)
    return root, docs


@pytest.fixture(scope="module")
def ray_with_one_gpu():
    """A local Ray of two CPUs that declares one GPU."""
    with local_ray(num_gpus=1) as ray:
        yield ray


# --- the choice, without Ray --------------------------------------------------------------------------------


def test_auto_asks_for_gpus_only_where_the_cluster_shows_them_and_says_why():
    on_gpus = Placement().target(GPU_CLUSTER, cpus_per_replica=4)
    assert on_gpus.device == "cuda" and on_gpus.options == {"num_cpus": 1, "num_gpus": 1.0}
    assert on_gpus.describe().startswith("device: cuda (the cluster shows 2 GPU(s)")

    on_cpus = Placement().target(CPU_CLUSTER, cpus_per_replica=4)
    assert on_cpus.device == "cpu" and on_cpus.options == {"num_cpus": 4}
    assert "shows no GPU" in on_cpus.describe() and "--device cuda" in on_cpus.describe()

    int8 = Placement().target(GPU_CLUSTER, cpus_per_replica=4, quantization="int8-dynamic")
    assert int8.device == "cpu" and "CPU only" in int8.reason


def test_cuda_waits_for_gpus_the_cluster_lacks_and_cpu_asks_for_none():
    shared = Placement(device="cuda", gpus_per_replica=0.25, accelerator_type="A100").target(CPU_CLUSTER, 4)
    assert shared.options == {"num_cpus": 1, "num_gpus": 0.25, "accelerator_type": "A100"}
    assert "no A100 node is on the cluster now" in shared.reason
    assert Placement(device="cpu").target(GPU_CLUSTER, 2).options == {"num_cpus": 2}


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(device="gpu"), "--device 'gpu': use one of auto, cuda, cpu"),
        (dict(gpus_per_replica=0), "--gpus-per-replica must be > 0"),
        (dict(gpus_per_replica=1.5), "above 1 must be a whole number"),
        (dict(placement_timeout=0), "--placement-timeout must be > 0"),
        (dict(accelerator_type="t4"), "Ray spells it 'T4'"),
        (dict(device="cpu", accelerator_type="T4"), "--device cpu"),
    ],
)
def test_placement_refuses_what_ray_could_never_place(fields, message):
    with pytest.raises(ValueError, match=message):
        Placement(**fields)


def test_int8_dynamic_with_device_cuda_is_a_usage_error_before_ray_starts(capsys):
    import ray

    argv = ["--model", "m", "--input", "i", "--output", "o", "--quantization", "int8-dynamic", "--device", "cuda"]
    assert summarize_job.main(argv) == cli.USAGE
    assert "--quantization int8-dynamic runs on CPU only" in capsys.readouterr().err
    assert not ray.is_initialized()
    with pytest.raises(PlacementError, match="CPU only"):
        settings = SummarizeSettings(model="m", quantization="int8-dynamic")
        run(settings, "i", "o", replicas=1, placement=Placement(device="cuda"))


# --- on a Ray that declares one GPU ---------------------------------------------------------------------------


def test_more_replicas_than_gpus_finish_on_the_placed_one_with_a_warning(
    ray_with_one_gpu, corpus, tiny_checkpoint, tmp_path
):
    root, docs = corpus
    printed = io.StringIO()
    placement = Placement(gpus_per_replica=1, placement_timeout=PLACEMENT_TIMEOUT)
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    report = run(settings, str(root), str(tmp_path / "out"), replicas=2, placement=placement, out=printed)
    assert report.success and report.committed == report.units == 4
    assert_every_row_once(read_output(tmp_path / "out"), docs)
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("[lakesum] device: cuda (the cluster shows 1 GPU(s); 1 GPU per replica)"), lines
    assert any("WARNING: 1 of 2 replicas not placed within" in line and "running with 1" in line for line in lines)
    # the GPU torch cannot see is run on CPU under auto
    assert any("1 replica(s) placed: 1 on cpu float32" in line for line in lines), lines


def test_half_a_gpu_each_places_two_replicas_on_one_gpu(ray_with_one_gpu, tiny_checkpoint, tmp_path):
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    placement = Placement(gpus_per_replica=0.5, placement_timeout=PLACEMENT_TIMEOUT)
    actors = start_replicas(settings, "i", str(tmp_path), None, 2, 1, placement=placement, log=_quiet)
    try:
        assert len(actors) == 2
        assert ray_with_one_gpu.available_resources().get("GPU", 0) == 0  # both shares of the one GPU are held
    finally:
        for actor in actors:
            ray_with_one_gpu.kill(actor)


def test_device_cpu_asks_a_gpu_cluster_for_no_gpu(ray_with_one_gpu, tiny_checkpoint, tmp_path):
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    placement = Placement(device="cpu", placement_timeout=PLACEMENT_TIMEOUT)
    actors = start_replicas(settings, "i", str(tmp_path), None, 1, 1, placement=placement, log=_quiet)
    try:
        assert len(actors) == 1
        assert ray_with_one_gpu.available_resources().get("GPU", 0) == 1
        assert ray_with_one_gpu.get(actors[0].where.remote())["device"] == "cpu"
    finally:
        ray_with_one_gpu.kill(actors[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine whose torch sees no CUDA device")
def test_device_cuda_fails_clearly_where_torch_sees_no_cuda(ray_with_one_gpu, corpus, tiny_checkpoint, tmp_path):
    root, _ = corpus
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    placement = Placement(device="cuda", placement_timeout=PLACEMENT_TIMEOUT)
    with pytest.raises(PlacementError, match="none of the 1 replica.*started.*torch sees no CUDA device"):
        run(settings, str(root), str(tmp_path / "out"), replicas=1, placement=placement, out=io.StringIO())


def test_ray_data_actors_take_the_jobs_placement(ray_with_one_gpu, tiny_checkpoint):
    import pyarrow as pa
    from ray.data import ActorPoolStrategy

    from pipeline.ray_data import SummarizeBatches, map_batches_options

    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    options = map_batches_options(settings, Placement(gpus_per_replica=0.5), log=_quiet)
    assert {k: v for k, v in options.items() if k != "fn_constructor_kwargs"} == {
        "batch_format": "pyarrow",
        "num_cpus": 1,
        "num_gpus": 0.5,
    }
    table = pa.table({"id": list(range(6)), "text": [f"document {i} about a lake" for i in range(6)]})
    ds = ray_with_one_gpu.data.from_arrow(table)
    rows = ds.map_batches(SummarizeBatches, compute=ActorPoolStrategy(size=1), batch_size=3, **options).take_all()
    assert sorted(row["id"] for row in rows) == list(range(6)) and all(row["summary"] is not None for row in rows)


# --- the job, on a Ray without GPUs ---------------------------------------------------------------------------


def test_device_cuda_on_a_ray_without_gpus_exits_2_after_the_placement_timeout(corpus, tiny_checkpoint, tmp_path):
    root, _ = corpus
    cmd = job_command(tiny_checkpoint, root, tmp_path / "out", "--device", "cuda", "--placement-timeout", "3")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=local_job_env())
    assert done.returncode == cli.USAGE, done.stderr
    ours = [line for line in done.stderr.splitlines() if line.startswith("[lakesum]")]
    assert ours[0].startswith("[lakesum] device: cuda (--device cuda: replicas wait for GPUs"), done.stderr
    assert "none of the 1 replica(s) was placed within --placement-timeout 3 s" in done.stderr
    assert "'num_gpus': 1.0" in done.stderr and "the cluster has CPU" in done.stderr


def _quiet(event: str, text: str, **fields) -> None:
    pass


class _DiesWhileLoading:
    """A replica whose process dies `deaths` times while it loads its model (SIGKILLed, out of memory, its node
    lost): Ray restarts it. (A death inside the constructor Ray already hides: it restarts the creation and the
    call waits for it.)"""

    def __init__(self, marker: str, deaths: int = 1, load_seconds: float = 0.0):
        self.marker, self.deaths, self.load_seconds = marker, deaths, load_seconds

    def placed(self) -> None:
        pass

    def where(self) -> dict:
        import os
        import time
        from pathlib import Path

        time.sleep(self.load_seconds)
        died = Path(self.marker).read_text() if Path(self.marker).exists() else ""
        if len(died) < self.deaths:
            Path(self.marker).write_text(died + "x")
            os._exit(1)  # the process dies, as a kill would: no exception for Ray to report
        return {"device": "cpu", "dtype": "float32"}


def _placed(ray, tmp_path, timeout: float, **replica) -> bool:
    """Whether a _DiesWhileLoading replica is placed within `timeout` (killed after: its CPU is the next test's)."""
    from pipeline.placement import Target, wait_until_placed

    actor = ray.remote(_DiesWhileLoading).options(max_restarts=-1, max_task_retries=0, num_cpus=1)
    replica = actor.remote(str(tmp_path / "deaths"), **replica)
    try:
        return wait_until_placed([replica], Target("cpu", "test", {"num_cpus": 1}), timeout, _quiet) == [replica]
    finally:
        ray.kill(replica, no_restart=True)


def test_a_replica_that_dies_while_loading_is_asked_again_not_dropped(ray_with_one_gpu, tmp_path):
    assert _placed(ray_with_one_gpu, tmp_path, 60, deaths=1)
    assert (tmp_path / "deaths").read_text() == "x"  # it did die once


def test_a_model_load_longer_than_the_placement_timeout_is_waited_for(ray_with_one_gpu, tmp_path):
    """--placement-timeout bounds the wait for resources, not the model's download and load."""
    assert _placed(ray_with_one_gpu, tmp_path, 20, deaths=0, load_seconds=22)


def test_a_replica_that_dies_at_every_load_is_given_up(ray_with_one_gpu, tmp_path):
    """Ray restarts it forever (max_restarts=-1), so the wait counts the deaths rather than hang."""
    with pytest.raises(PlacementError, match="none of the 1 replica.*died 4 times while loading the model"):
        _placed(ray_with_one_gpu, tmp_path, 60, deaths=10)
