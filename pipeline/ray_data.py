"""A Ray Data adapter, for users who already run Ray Data pipelines:

    import ray
    from ray.data import ActorPoolStrategy
    from pipeline.ray_data import SummarizeBatches
    from pipeline.settings import SummarizeSettings

    ds = ray.data.read_parquet("s3://lake/docs/")
    ds = ds.map_batches(SummarizeBatches, fn_constructor_kwargs={"settings": SummarizeSettings(model="...")},
                        compute=ActorPoolStrategy(size=4), num_gpus=1, batch_format="pyarrow", batch_size=1024)
    ds.write_parquet("s3://lake/summaries/")

Each actor holds one replica and runs the same stages as jobs/summarize.py (continuous batching,
length bucketing, input order restored) on each batch: every column but the text is carried through,
and `summary` and `error` are added. Exactly-once output and resume are Ray Data's to give here
(at-least-once); jobs/summarize.py gives them on its own. The model loads as a replica's does
(pipeline/replica.py load_model); `storage_options`, in fn_constructor_kwargs beside the settings, open
the settings' output_vocabulary sample.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from .replica import load_model
from .settings import SummarizeSettings
from .stages import Summarizer


class SummarizeBatches:
    def __init__(self, settings: SummarizeSettings, storage_options: dict | None = None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(settings, device, storage_options)
        self.summarizer = Summarizer(model, tokenizer, settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out, _ = self.summarizer.summarize_table(batch)
        return out
