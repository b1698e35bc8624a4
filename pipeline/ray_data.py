"""A Ray Data adapter, for users who already run Ray Data pipelines:

    import ray
    from ray.data import ActorPoolStrategy
    from pipeline.placement import Placement
    from pipeline.ray_data import SummarizeBatches, map_batches_options
    from pipeline.settings import SummarizeSettings

    settings = SummarizeSettings(model="...")
    ds = ray.data.read_parquet("s3://lake/docs/")
    ds = ds.map_batches(SummarizeBatches, compute=ActorPoolStrategy(size=4), batch_size=1024,
                        **map_batches_options(settings, Placement(gpus_per_replica=0.25)))
    ds.write_parquet("s3://lake/summaries/")

map_batches_options gives the actor class's constructor arguments and each actor's resources as the job's
replicas ask for them (pipeline/placement.py: --device, --gpus-per-replica, --accelerator-type; the device line
it logs says what it chose and why). Ray Data places its actor pool itself, so --placement-timeout has no
part here.

Each actor holds one replica and runs the same stages as jobs/summarize.py (continuous batching,
length bucketing, input order restored) on each batch: every column but the text is carried through,
and `summary` and `error` are added. Exactly-once output and resume are Ray Data's to give here
(at-least-once); jobs/summarize.py gives them on its own. The model loads as a replica's does
(pipeline/replica.py load_model); `storage_options` open the settings' output_vocabulary sample.
"""

from __future__ import annotations

import pyarrow as pa

from . import fit
from .driver import EventLog
from .placement import DEFAULT_PLACEMENT, Placement, torch_device
from .replica import load_model
from .settings import SummarizeSettings
from .stages import Summarizer


class SummarizeBatches:
    def __init__(
        self,
        settings: SummarizeSettings,
        storage_options: dict | None = None,
        device: str = "auto",
        tokenize_workers: int = 0,
    ):
        """`device`: Placement.device; "cuda" makes an actor that torch gives no CUDA device fail.
        `tokenize_workers`: Target.tokenize_workers, the processes that tokenize, one of the actor's CPUs each."""
        import ray

        device = torch_device(device, ray.get_gpu_ids())
        model, tokenizer = load_model(settings, device, storage_options)
        self.summarizer = Summarizer(model, tokenizer, settings, tokenize_workers)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out, _ = self.summarizer.summarize_table(batch)
        return out


def map_batches_options(
    settings: SummarizeSettings,
    placement: Placement = DEFAULT_PLACEMENT,
    storage_options: dict | None = None,
    cpus_per_replica: int = 1,
    log: EventLog | None = None,
) -> dict:
    """Keyword arguments of Dataset.map_batches for SummarizeBatches: its constructor's, the batch format, and
    each actor's num_cpus, num_gpus and accelerator_type, chosen on the Ray the caller joined."""
    log = log or EventLog()
    target = placement.choose(cpus_per_replica, settings.quantization, log)
    settings = fit.resolved(settings, target.device, placement, storage_options, log)  # once, for every actor
    return dict(
        fn_constructor_kwargs={
            "settings": settings,
            "storage_options": storage_options,
            "device": placement.device,
            "tokenize_workers": target.tokenize_workers,
        },
        batch_format="pyarrow",
        **target.options,
    )
