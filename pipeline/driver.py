"""The driver: plan the work, fail fast on what makes the whole job wrong, hand units to replicas, report.

It runs on Ray Core: replicas are actors that restart when their process or node dies; a unit whose
replica died is handed out again under a new attempt, and the commit protocol makes the rerun
overwrite, never duplicate. Units that fail on their own data are recorded and the rest completes.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field

from model import MT5ForConditionalGeneration, MT5Tokenizer

from . import vocabulary
from .commit import OutputLocation
from .errors import InputError
from .partitions import parse_filter, select
from .settings import SummarizeSettings
from .shards import WorkUnit, check_columns, inspect_shards, list_shards, plan_units
from .stages import Stats

# A unit whose replica dies this many times is recorded as failed (a poison unit that kills its process).
MAX_ATTEMPTS = 3


@dataclass
class RunReport:
    units: int = 0
    skipped: int = 0  # committed by an earlier run
    committed: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # shard relative path -> reason
    retries: int = 0
    stats: Stats = field(default_factory=Stats)
    seconds: float = 0.0
    success: bool = False

    def to_dict(self) -> dict:
        out = asdict(self)
        out["stats"] = asdict(self.stats)
        return out


def model_fingerprint(source: str) -> dict:
    """The model's identity for the manifest: a hash of the names and bytes of its checkpoint files.

    Content, not file times: a fresh download or cache copy on a new cluster has new mtimes and the same bytes,
    and must not be refused as another model, while a checkpoint rewritten in place with new weights must be
    (issue 12). Reading every byte costs about a second per GB, small beside summarizing with the model.
    """
    directory = MT5ForConditionalGeneration.check_pretrained(source)
    MT5Tokenizer.from_pretrained(directory)  # a missing or broken spiece.model fails here, before any work
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors", ".model")):
            digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return {"model": source, "model_hash": digest.hexdigest()[:32]}


class EventLog:
    """The driver's messages: readable lines, or one JSON object a line (--log-format json) for log pipelines."""

    def __init__(self, out=sys.stderr, json_lines: bool = False):
        self.out, self.json_lines = out, json_lines

    def __call__(self, event: str, text: str, **fields) -> None:
        if self.json_lines:
            line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields})
        else:
            line = f"[lakesum] {text}"
        print(line, file=self.out, flush=True)


class Progress:
    def __init__(self, total_units: int, total_rows: int, every: float, log: EventLog):
        self.total_units, self.total_rows, self.every, self.log = total_units, total_rows, every, log
        self.start = self.last = time.monotonic()

    def maybe_print(self, report: RunReport, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rows = report.stats.rows
        rate = rows / elapsed
        eta = (self.total_rows - rows) / rate if rate > 0 else float("inf")
        tokens_per_second = report.stats.output_tokens / elapsed
        self.log("progress", f"units {report.committed}/{self.total_units}  docs {rows:,}/{self.total_rows:,}  "
                 f"{rate:.1f} docs/s  {tokens_per_second:.0f} tokens/s  ETA {_duration(eta)}",
                 units=report.committed, total_units=self.total_units, documents=rows, total_documents=self.total_rows,
                 docs_per_second=round(rate, 2), tokens_per_second=round(tokens_per_second, 1),
                 eta_seconds=None if eta == float("inf") else round(eta))


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def plan(settings: SummarizeSettings, input_url, output_url: str, storage_options: dict | None,
         partition_filter: str | None = None):
    """Everything checked before the cluster does any work: shards, columns, model, output settings."""
    fs, shards = list_shards(input_url, storage_options)
    if partition_filter:
        shards = select(shards, parse_filter(partition_filter))
        if not shards:
            raise InputError(f"no shard under {_input_names(input_url)} matches --partition-filter {partition_filter!r}")
    infos, unreadable = inspect_shards(fs, shards)
    for info in infos:
        check_columns(info, settings.text_column, settings.id_column)
    identity = model_fingerprint(settings.model)
    if settings.output_vocabulary:  # read now: a missing file fails here, before any replica starts
        sample = vocabulary.read_sample(settings.output_vocabulary, storage_options)
        identity["output_vocabulary_hash"] = vocabulary.fingerprint(sample)
    units = plan_units(infos, settings.rows_per_unit)
    schemas = {info.shard.path: info.schema for info in infos}
    manifest = {**settings.output_affecting(), **identity, "input": _input_names(input_url)}
    return units, schemas, unreadable, manifest


def _input_names(input_url) -> list[str]:
    return [input_url] if isinstance(input_url, str) else list(input_url)


def run(settings: SummarizeSettings, input_url, output_url: str, *, replicas: int, overwrite: bool = False,
        storage_options: dict | None = None, cpus_per_replica: int = 1, progress_every: float = 10.0,
        partition_filter: str | None = None, out=sys.stderr, json_logs: bool = False) -> RunReport:
    """Summarize every shard under input_url into output_url. The caller owns ray.init()."""
    import ray

    log = EventLog(out, json_logs)
    start = time.monotonic()
    units, schemas, unreadable, manifest = plan(settings, input_url, output_url, storage_options, partition_filter)
    location = OutputLocation(output_url, storage_options)
    location.prepare(manifest, units=units, overwrite=overwrite, partial=bool(partition_filter))
    report = RunReport(units=len(units))
    for error in unreadable:
        report.failed[error.shard.relative] = error.reason
        location.record_failure(error.shard, error.reason)
    committed = location.committed_units()
    todo = deque(u for u in units if u.id not in committed)
    report.skipped = len(units) - len(todo)
    report.committed = report.skipped
    progress = Progress(len(units), sum(u.num_rows for u in units), progress_every, log)
    if report.skipped:
        log("resume", f"resuming: {report.skipped} of {len(units)} units already committed",
            committed=report.skipped, units=len(units))

    if todo:
        actors = _start_replicas(ray, settings, input_url, output_url, storage_options,
                                 min(replicas, len(todo)), cpus_per_replica)
        _dispatch(ray, actors, todo, schemas, location, report, progress)
    for relative, reason in report.failed.items():
        log("failed", f"FAILED {relative}: {reason}", shard=relative, reason=reason)
    report.seconds = time.monotonic() - start
    report.success = location.finish({**report.to_dict(), "settings": manifest}) and not unreadable
    progress.maybe_print(report, force=True)
    _print_summary(report, out)
    return report


def _start_replicas(ray, settings, input_url, output_url, storage_options, count: int, cpus_per_replica: int):
    from .replica import UNITS_PER_REPLICA, Replica

    gpus = ray.cluster_resources().get("GPU", 0)
    resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": cpus_per_replica}
    actor = ray.remote(Replica).options(max_restarts=-1, max_task_retries=0, max_concurrency=UNITS_PER_REPLICA,
                                        **resources)
    return [actor.remote(settings, input_url, output_url, storage_options, cpus_per_replica) for _ in range(count)]


def _dispatch(ray, actors, todo: deque, schemas, location: OutputLocation, report: RunReport, progress):
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    from .replica import UNITS_PER_REPLICA

    from .metrics import PipelineMetrics

    metrics = PipelineMetrics()

    def fail(unit: WorkUnit, reason: str) -> None:
        report.failed[_name(unit)] = reason
        location.record_failure(unit, reason)
        metrics.unit_failures.inc()

    attempts: dict[str, int] = {}
    in_flight: dict = {}  # ObjectRef -> (unit, actor index)
    load = [0] * len(actors)
    # A replica whose process or node died gets no units until it answers a ping: while Ray restarts it
    # (or waits for room to), calls to it fail at once, and each would cost a unit one of its attempts.
    down: set[int] = set()
    gone: dict[int, str] = {}  # replicas that cannot come back (their restart failed) -> why
    pings: dict = {}  # ObjectRef of a where() call -> actor index
    while todo or in_flight:
        for index, actor in enumerate(actors):
            while index not in down and load[index] < UNITS_PER_REPLICA and todo:
                unit: WorkUnit = todo.popleft()
                attempts[unit.id] = attempts.get(unit.id, 0) + 1
                ref = actor.process.remote(unit, schemas[unit.shard.path], uuid.uuid4().hex[:12])
                in_flight[ref] = (unit, index)
                load[index] += 1
        if not in_flight and not pings:  # every replica is gone for good
            reason = f"no replica left: {next(iter(gone.values()))}"
            for unit in todo:
                fail(unit, reason)
            todo.clear()
            break
        ready, _ = ray.wait([*in_flight, *pings], num_returns=1, timeout=progress.every)
        for ref in ready:
            if ref in pings:
                index = pings.pop(ref)
                try:
                    ray.get(ref)
                    down.discard(index)  # restarted, model loaded: back in rotation
                except ActorUnavailableError:
                    pings[_ping(actors[index])] = index  # still restarting
                except RayActorError as err:
                    gone[index] = _reason(err)
                continue
            unit, index = in_flight.pop(ref)
            load[index] -= 1
            try:
                result = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                # The replica's process or node died: Ray restarts the actor; the unit goes out again.
                if index not in down:
                    down.add(index)
                    pings[_ping(actors[index])] = index
                if attempts[unit.id] < MAX_ATTEMPTS:
                    report.retries += 1
                    metrics.unit_retries.inc()
                    todo.appendleft(unit)
                else:
                    fail(unit, f"its replica died {MAX_ATTEMPTS} times ({type(err).__name__})")
                continue
            except RayTaskError as err:
                fail(unit, _reason(err))
                continue
            report.committed += 1
            report.stats.add(Stats(**{k: result[k] for k in Stats.__dataclass_fields__}))
        progress.maybe_print(report)


def _ping(actor):
    """A call that answers once the replica is up again (retried across its restarts), or fails if it never will."""
    return actor.where.options(max_task_retries=-1).remote()


def _name(unit: WorkUnit) -> str:
    return unit.shard.relative if unit.whole_file else f"{unit.shard.relative} (row groups {unit.start}-{unit.stop})"


def _reason(err) -> str:
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]


def _print_summary(report: RunReport, out) -> None:
    s = report.stats
    rate = s.rows / report.seconds if report.seconds else 0.0
    print(json.dumps({"lakesum": "done" if report.success else "incomplete", "units": report.units,
                      "committed": report.committed, "skipped": report.skipped, "failed": len(report.failed),
                      "retries": report.retries, "documents": s.rows, "empty": s.empty, "truncated": s.truncated,
                      "generated_tokens": s.output_tokens, "seconds": round(report.seconds, 2),
                      "docs_per_second": round(rate, 2)}), file=out, flush=True)
