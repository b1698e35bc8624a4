"""The replica: a Ray actor holding one model replica, pinned to a GPU or to CPU cores.

It summarizes work units end to end (read -> stages -> commit) and runs two units at a time, so that
one unit's reading and writing overlap the other's inference on the shared model thread. A transient storage
error is retried here with backoff (pipeline/retry.py), without summarizing anything twice; the rows each unit
has summarized so far answer the driver's heartbeat, from a thread of its own.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator

import pyarrow as pa
import torch

from model import MT5Tokenizer, load_for_inference
from model.checkpoint import resolve_checkpoint
from model.inference import inference_dtype
from model.packed import pack_for_cpu
from model.storage import open_filesystem

from . import fit, vocabulary
from .commit import OutputLocation
from .errors import InputError
from .metrics import PipelineMetrics
from .placement import torch_device
from .retry import Replayable, is_transient, read_resuming, with_retries
from .settings import SummarizeSettings
from .stages import Summarizer, output_schema
from .stats import Stats
from .units import WorkUnit, ensure_unchanged, resolve_unit

# Units a replica runs at once: two keep the model busy across unit boundaries.
UNITS_PER_REPLICA = 2
# The concurrency group of Replica.heartbeat: a thread of its own, so that it answers while units keep the others.
HEARTBEAT_GROUP = "heartbeat"


def load_model(settings: SummarizeSettings, device: str, storage_options: dict | None = None):
    """The model as the settings ask (model.load_for_inference) and its tokenizer. `storage_options` open a
    checkpoint URI (s3://, gs://, ...) and the --output-vocabulary sample, whose pieces are the kept ids."""
    # resolved once, so that the tokenizer and the weights come from the same local copy or hub commit
    directory = resolve_checkpoint(settings.model, revision=settings.revision, storage_options=storage_options)
    tokenizer = MT5Tokenizer.from_pretrained(directory)
    kept = None
    if settings.output_vocabulary:
        kept = vocabulary.kept_ids(tokenizer, vocabulary.read_sample(settings.output_vocabulary, storage_options))
    quantization = fit.on_this_device(settings, directory, device)  # the driver has resolved auto already
    model = load_for_inference(
        directory,
        dtype=settings.dtype,
        device=device,
        quantization=quantization,
        kept_ids=kept,
        compile_decode=settings.compile_decode,
    )
    return model, tokenizer


class Replica:
    def __init__(
        self,
        settings: SummarizeSettings,
        input_url: str,
        output_url: str,
        storage_options: dict | None,
        cpu_threads: int,
        generation: int | None = None,
        device: str = "auto",
        tokenize_workers: int = 0,
    ):
        """`device`: the job's --device; "cuda" makes a replica that torch gives no CUDA device fail.
        `tokenize_workers`: the processes that tokenize for it, as its placement chose them and asked Ray CPUs for
        (Target.tokenize_workers)."""
        import ray  # the actor runs inside Ray; the module stays importable without a cluster

        self.device = torch_device(device, ray.get_gpu_ids())
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads)
        self.dtype = str(inference_dtype(settings.dtype, self.device))  # before the load: a GPU without bf16 fails
        # The model loads on first use, not here: the driver's placement wait (pipeline/placement.py) then tells a
        # replica waiting for resources from one loading its model. A replica that Ray restarts loads it again.
        self._model_settings = (settings, storage_options)
        self.tokenize_workers = tokenize_workers
        self._summarizer: Summarizer | None = None
        self._load_lock = threading.Lock()
        self.fs, _ = open_filesystem(input_url, storage_options, error=InputError)
        # the run's lease generation: a unit of a run that lost its lease is never published
        self.location = OutputLocation(output_url, storage_options, generation=generation)
        self._retries_lock = threading.Lock()
        self._retries_reported = 0  # of the location's own retries (its markers), handed on in unit results
        self.text_column = settings.text_column
        self.metrics = PipelineMetrics()
        self.rows_done: dict[str, int] = {}  # attempt -> rows summarized so far, for each unit in flight

    def placed(self) -> None:
        """Answers as soon as Ray has placed the replica, before its model is loaded."""

    def where(self) -> dict:
        """Where the replica runs, once its model is loaded, and how many processes tokenize for it."""
        pool = self.summarizer._pool  # loads the model
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.device,
            "dtype": self.dtype,
            "tokenize_workers": pool.workers if pool is not None else 0,
        }

    @property
    def summarizer(self) -> Summarizer:
        """The model and its tokenizer, loaded on first use (by one of the threads that ask at once)."""
        with self._load_lock:
            if self._summarizer is None:
                settings, storage_options = self._model_settings
                model, tokenizer = load_model(settings, self.device, storage_options)
                self._summarizer = Summarizer(model, tokenizer, settings, self.tokenize_workers)
        return self._summarizer

    def heartbeat(self) -> dict[str, int]:
        """Rows summarized so far by each unit in flight, by attempt. The driver calls it in HEARTBEAT_GROUP: rows
        that stop growing mean a hung replica, and its progress line counts them before their unit commits."""
        return self.rows_done.copy()  # one C call: atomic beside the unit threads that update it

    def _location_retries_since_last(self) -> int:
        """The retries the output location made for its own files (commit markers) since the last unit result:
        shared by the units running side by side, so each is handed on once."""
        with self._retries_lock:
            new = self.location.storage_retries - self._retries_reported
            self._retries_reported = self.location.storage_retries
        return new

    def process(self, unit: WorkUnit, schema: pa.Schema | None, attempt: str) -> dict:
        """Summarize one unit and commit it; returns its statistics and the storage retries it took.

        `schema`: the input's, as the driver read it; None for a unit planned from the listing (a small file),
        whose footer is read here: its rows, its schema and its columns' check (units.resolve_unit)."""
        start = time.perf_counter()
        stats = Stats()
        retried: list[BaseException] = []
        self.rows_done[attempt] = 0
        try:
            settings = self._model_settings[0]
            unit, schema = resolve_unit(self.fs, unit, schema, self.text_column, settings.id_column)
            read = read_resuming(self.fs, unit, on_retry=retried.append)
            out = Replayable(self._counted(self.summarizer.stream(read, stats), attempt))
            schema = output_schema(schema, self.text_column)
            # write_unit publishes only if the unit comes out with as many rows as its footer promised, and its
            # input is still the file the plan listed. A write that fails on a transient error starts over from
            # the output kept in memory; one whose input failed (out.intact is False) has nothing to start over from.
            unchanged = lambda: ensure_unchanged(self.fs, unit)  # noqa: E731
            with_retries(
                lambda: self.location.write_unit(unit, schema, out, attempt=attempt, unchanged=unchanged),
                retry_if=lambda error: out.intact and is_transient(error),
                on_retry=retried.append,
            )
        finally:
            self.rows_done.pop(attempt, None)
        result = {
            "unit": unit.id,
            "seconds": time.perf_counter() - start,
            "storage_retries": len(retried) + self._location_retries_since_last(),
            **dataclasses.asdict(stats),
        }
        self.metrics.unit_done(result)
        return result

    def _counted(self, batches: Iterable[pa.RecordBatch], attempt: str) -> Iterator[pa.RecordBatch]:
        """The summarizer's output, each batch counted in rows_done as its window finishes."""
        for batch in batches:
            self.rows_done[attempt] += batch.num_rows
            yield batch

    # --- fine-tuning, on the same replica and its loaded model ----------------------------------------

    def train_address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process group: this node's address and a free port."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def train(self, settings, rank: int, world: int, address: str, port: int, resume: bool) -> dict:
        """Join the process group, fine-tune this replica's model in place, and (rank 0) save it."""
        import ray
        import torch.distributed as dist

        from .train import Trainer, load_examples, prepare_for_training, save_final

        # NCCL refuses two ranks on one GPU; replicas that share GPUs (a fraction each) reduce through gloo, which
        # takes CUDA tensors too, only slower.
        whole_gpu = ray.get_runtime_context().get_assigned_resources().get("GPU", 0) >= 1
        backend = "nccl" if self.device.startswith("cuda") and whole_gpu else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world)
        try:
            torch.manual_seed(settings.seed * 1000 + rank)  # dropout differs per replica, reproducibly
            model = self.summarizer.model
            lora = prepare_for_training(model, settings)
            examples = load_examples(settings.train, settings.text_column, settings.summary_column)
            trainer = Trainer(model, self.summarizer.tokenizer, settings, examples, rank, world, self.device, lora)
            result = trainer.run(resume)
            save_final(model, self.summarizer.tokenizer, settings, lora, write=rank == 0)
        finally:
            dist.destroy_process_group()
        model.eval()
        # back to serving, laid out as load_model lays it out: summarize_texts uses the trained model
        pack_for_cpu(model, projections=not self._model_settings[0].compile_decode)
        return result

    def summarize_texts(self, texts: list[str]) -> list[str | None]:
        """Summaries with the model as it is now (after training too: nothing is reloaded)."""
        table = pa.table({self.text_column: pa.array(texts, pa.string())})
        out, _ = self.summarizer.summarize_table(table)
        return out.column("summary").to_pylist()
