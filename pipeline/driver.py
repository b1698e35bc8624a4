"""The driver: plan the work, fail fast on what makes the whole job wrong, hand units to replicas, report.

It runs on Ray Core: replicas are actors that restart when their process or node dies; a unit whose
replica died is handed out again under a new attempt, and the commit protocol makes the rerun
overwrite, never duplicate. Units that fail on their own data are recorded and the rest completes.
"""

from __future__ import annotations

import json
import posixpath
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field, replace

from model import MT5Tokenizer
from model.checkpoint import hub_commit, resolve_checkpoint
from model.storage import redact_url

from . import fit, vocabulary
from .checkpoint_hash import checkpoint_hash
from .commit import DEFAULT_LEASE_TIMEOUT, Changes, OutputLocation
from .errors import InputError
from .footers import ShardReadError, check_columns, describe, inspect_shards
from .listing import Shard, list_shards
from .partitions import matches, parse_filter
from .placement import DEFAULT_PLACEMENT, Placement, Target, wait_until_placed
from .settings import SummarizeSettings
from .stats import Stats
from .units import WorkUnit, known_units, plan_units, planned_from_listing

# A unit whose replica dies this many times while running it alone is recorded as failed (a poison unit that
# kills its process).
MAX_ATTEMPTS = 3
# Seconds without a newly summarized row after which a replica is killed and its units go out again
# (--replica-timeout; 0: never). A window of rows takes seconds to minutes, even on a CPU.
DEFAULT_REPLICA_TIMEOUT = 1800.0
# Most seconds between two heartbeats to a busy replica.
HEARTBEAT_SECONDS = 5.0
# Files --dry-run names for each action.
DRY_RUN_FILES = 20


@dataclass
class RunReport:
    units: int = 0
    skipped: int = 0  # committed by an earlier run
    redone: int = 0  # summarized again: their input was rewritten
    removed: int = 0  # earlier units of rewritten or deleted inputs, whose output was removed
    committed: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # shard relative path -> reason
    retries: int = 0  # units handed out again after their replica died
    storage_retries: int = 0  # reads and writes (units, markers, manifest) tried again after a transient storage error
    hung_replicas: int = 0  # replicas killed for summarizing nothing for replica_timeout seconds
    stats: Stats = field(default_factory=Stats)
    seconds: float = 0.0
    success: bool = False

    def to_dict(self) -> dict:
        out = asdict(self)
        out["stats"] = asdict(self.stats)
        return out


def model_fingerprint(source: str, revision: str | None = None, storage_options: dict | None = None) -> dict:
    """The model's identity for the manifest: a hash of the names and bytes of its checkpoint files.

    Content, not file times: a fresh download or cache copy on a new cluster has new mtimes and the same bytes,
    and must not be refused as another model, while a checkpoint rewritten in place with new weights must be
    (issue 12). Reading every byte costs about a second per GB, so the hash is cached by the files' stat
    (pipeline/checkpoint_hash.py): a run on files unchanged since the last one reads none of them.
    """
    # torch, for the model on the meta device: imported here, not with this module, so that the job parses its
    # flags and starts Ray while torch imports beside it (jobs/summarize.py)
    from model.mt5 import MT5ForConditionalGeneration

    directory = resolve_checkpoint(source, revision=revision, storage_options=storage_options)
    MT5ForConditionalGeneration.check_pretrained(directory)
    MT5Tokenizer.from_pretrained(directory)  # a missing or broken spiece.model fails here, before any work
    return {"model": source, "model_hash": checkpoint_hash(directory), "model_revision": hub_commit(directory)}


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
    def __init__(self, units: list[WorkUnit], every: float, log: EventLog):
        self.every, self.log = every, log
        self.total_units = len(units)
        known = [u.num_rows for u in units if u.num_rows is not None]
        # Units planned from the listing have no row count until their replica reads the footer: the total counts
        # the rows known so far, and grows as each of those units commits (learned).
        self.total_rows = sum(known)
        self.known_units, self.unknown_units = len(known), len(units) - len(known)
        self.start = self.last = time.monotonic()

    def learned(self, unit: WorkUnit, rows: int) -> None:
        """A unit committed with `rows` rows: counted in the total if its plan did not know them."""
        if unit.num_rows is None:
            self.total_rows += rows
            self.known_units += 1
            self.unknown_units -= 1

    def maybe_print(self, report: RunReport, force: bool = False, rows_in_flight: int = 0) -> None:
        """`rows_in_flight`: rows summarized by units not committed yet, as the replicas' heartbeats tell."""
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rows = report.stats.rows + rows_in_flight
        rate = rows / elapsed
        # the rows of units not read yet estimated at the known units' mean: an ETA, not a count
        mean = self.total_rows / self.known_units if self.known_units else None
        expected = self.total_rows + self.unknown_units * (mean or 0)
        eta = (expected - rows) / rate if rate > 0 and mean is not None else float("inf")
        tokens_per_second = report.stats.output_tokens / elapsed
        unknown = f" (+ the rows of {self.unknown_units:,} units not read yet)" if self.unknown_units else ""
        self.log(
            "progress",
            f"units {report.committed}/{self.total_units}  docs {rows:,}/{self.total_rows:,}{unknown}  "
            f"{rate:.1f} docs/s  {tokens_per_second:.0f} tokens/s  ETA {_duration(eta)}",
            units=report.committed,
            total_units=self.total_units,
            documents=rows,
            total_documents=self.total_rows,
            units_rows_unknown=self.unknown_units,
            docs_per_second=round(rate, 2),
            tokens_per_second=round(tokens_per_second, 1),
            eta_seconds=None if eta == float("inf") else round(max(eta, 0)),
        )


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Plan:
    """What the input holds now, and what the run writes: everything checked before the cluster works."""

    units: list[WorkUnit]
    schemas: dict  # shard path -> Arrow schema
    unreadable: list[ShardReadError]
    manifest: dict  # the settings that decide the output, with the model's and vocabulary's identities
    selection: dict  # OutputLocation.reconcile's view of the listing (listed, unreadable, in_selection, input_exists)
    revision: str | None  # the hub commit every replica loads (None unless --model is a hub id)
    fs: object  # the input's filesystem


def plan(
    settings: SummarizeSettings,
    input_url,
    storage_options: dict | None,
    partition_filter: str | None = None,
    location: OutputLocation | None = None,
) -> Plan:
    """Shards, columns, model, units: everything that can make the whole job wrong fails here, before any work.

    Given the output `location`, files whose every unit an earlier run with these settings committed, and
    which are unchanged, take their units from its manifest instead of having their footers parsed.
    """
    conditions = parse_filter(partition_filter) if partition_filter else None
    fs, shards = list_shards(input_url, storage_options, conditions)
    if not shards:
        raise InputError(f"no shard under {_redacted_names(input_url)} matches --partition-filter {partition_filter!r}")
    identity = model_fingerprint(settings.model, settings.revision, storage_options)
    # Recorded, not compared: a new commit of the same weights is the same model (model_hash decides).
    revision = identity.pop("model_revision")
    if settings.output_vocabulary:  # read now: a missing file fails here, before any replica starts
        sample = vocabulary.read_sample(settings.output_vocabulary, storage_options)
        identity["output_vocabulary_hash"] = vocabulary.fingerprint(sample)
    manifest = {**settings.output_affecting(), **identity, "input": _input_names(input_url)}
    committed = location.committed_files(manifest) if location is not None else {}
    known, changed = [], []
    for shard in shards:
        units = known_units(fs, shard, committed[shard.relative]) if shard.relative in committed else None
        if units is None:
            changed.append(shard)
        else:
            known.extend(units)
    inspected, listed = _footers_to_read(changed, settings.rows_per_unit)
    infos, unreadable = inspect_shards(fs, inspected)
    for info in infos:
        check_columns(info, settings.text_column, settings.id_column)
    units = plan_units(infos, settings.rows_per_unit, known, listed)
    # by shard path; a unit without one (planned from the listing, or a known unit whose marker went since) has its
    # footer read by its replica, which checks its columns as above
    schemas = {info.shard.path: info.schema for info in infos}
    root = _root(shards[0])
    selection = dict(
        listed={s.relative for s in shards},
        unreadable={e.shard.relative for e in unreadable},
        in_selection=(lambda relative: matches(relative, conditions)) if conditions else None,
        # asked of the store directly (a HEAD on object stores) before an output is deleted
        input_exists=lambda relative: fs.exists(posixpath.join(root, relative) if root else relative),
    )
    return Plan(units, schemas, unreadable, manifest, selection, revision, fs)


def _footers_to_read(shards: list[Shard], rows_per_unit: int) -> tuple[list[Shard], list[Shard]]:
    """The shards whose footers planning reads, and those planned from their listing (units.planned_from_listing).

    Of the small files of each folder (a Hive partition, mostly written by one writer with one schema) the
    first one's footer is read all the same, so that a text or id column missing from a partition fails the
    job before any replica starts, as it does for the files read whole; another file of that folder without
    the column fails as its unit, naming the file and the column."""
    inspected, listed = [], []
    sampled: set[str] = set()
    for shard in shards:
        if not planned_from_listing(shard, rows_per_unit):
            inspected.append(shard)
            continue
        folder = shard.relative[: shard.relative.rfind("/") + 1]
        if folder in sampled:
            listed.append(shard)
        else:
            sampled.add(folder)
            inspected.append(shard)
    return inspected, listed


def _root(shard: Shard) -> str:
    """The input root that shard paths are relative to."""
    return shard.path[: len(shard.path) - len(shard.relative)].rstrip("/")


def _input_names(input_url) -> list[str]:
    return [input_url] if isinstance(input_url, str) else list(input_url)


def _redacted_names(input_url) -> str:
    return ", ".join(redact_url(url) for url in _input_names(input_url))


def run(
    settings: SummarizeSettings,
    input_url,
    output_url: str,
    *,
    replicas: int,
    overwrite: bool = False,
    storage_options: dict | None = None,
    cpus_per_replica: int = 1,
    placement: Placement = DEFAULT_PLACEMENT,
    progress_every: float = 10.0,
    partition_filter: str | None = None,
    out=sys.stderr,
    json_logs: bool = False,
    dry_run: bool = False,
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    replica_timeout: float = DEFAULT_REPLICA_TIMEOUT,
) -> RunReport:
    """Summarize every shard under input_url into output_url. The caller owns ray.init().

    With `dry_run`, print what the run would do and return without touching the output or starting replicas.
    `placement` says where replicas run; a device that cannot run the settings raises PlacementError first.
    """
    log = EventLog(out, json_logs)
    start = time.monotonic()
    placement.check(settings.quantization)
    location = OutputLocation(output_url, storage_options)
    target = None
    if settings.quantization == "auto":
        # Resolved once, here: every replica loads the same choice, and the manifest records it, so a resumed run
        # whose choice differs (another GPU, other batch settings) is refused as written with other settings.
        target = placement.choose(cpus_per_replica, settings.quantization, log)  # the job's first log line
        settings = fit.resolved(settings, target.device, placement, storage_options, log)
    work = plan(settings, input_url, storage_options, partition_filter, location)
    if dry_run:
        changes = location.reconcile(work.manifest, units=work.units, overwrite=overwrite, **work.selection)
        _print_plan(changes, work, out)
        return RunReport(units=len(work.units), skipped=len(changes.skip), success=True)
    target = target or placement.choose(cpus_per_replica, settings.quantization, log)  # the job's first log line
    # One writer at a time: the lease is taken before the output is touched and renewed while the run works.
    lease = location.lease(lease_timeout, note=lambda text: log("lease", text))
    lease.start_heartbeat()
    try:
        changes = location.prepare(
            work.manifest,
            units=work.units,
            overwrite=overwrite,
            recorded={"model_revision": work.revision},
            **work.selection,
        )
        report = RunReport(units=len(work.units), redone=len(changes.redo), removed=len(changes.remove))
        if changes.remove:
            files = sorted({u.relative for u in changes.remove})
            log(
                "removed",
                f"removed the output of {len(changes.remove)} unit(s) of {len(files)} rewritten or deleted "
                f"file(s), e.g. {files[0]}",
                units=len(changes.remove),
                files=len(files),
            )
        for error in work.unreadable:
            report.failed[error.shard.relative] = error.reason
            location.record_failure(error.shard, error.reason)
        for relative in sorted({u.relative for u in changes.missed}):
            reason = (
                "the input listing left it out, yet it exists: the listing was incomplete, so its earlier "
                "output is kept as it was; run again"
            )
            report.failed[relative] = reason
            location.record_failure(Shard(relative, relative, "parquet", 0), reason)
        to_run = changes.todo()
        todo = deque(u for u in work.units if u.id in to_run)
        report.skipped = len(work.units) - len(todo)
        report.committed = report.skipped
        progress = Progress(work.units, progress_every, log)
        if report.skipped:
            log(
                "resume",
                f"resuming: {report.skipped} of {len(work.units)} units already committed",
                committed=report.skipped,
                units=len(work.units),
            )

        if todo:
            # every replica loads the commit the driver fingerprinted, even if the branch moves meanwhile
            pinned = replace(settings, revision=work.revision) if work.revision else settings
            actors = start_replicas(
                pinned,
                input_url,
                output_url,
                storage_options,
                min(replicas, len(todo)),
                cpus_per_replica,
                location.generation,
                placement=placement,
                target=target,
                log=log,
            )
            _dispatch(actors, todo, work.schemas, location, report, progress, replica_timeout)
        lease.check()  # a run that lost its lease leaves the report and _SUCCESS to the run that holds it
        for relative, reason in report.failed.items():
            log("failed", f"FAILED {relative}: {reason}", shard=relative, reason=reason)
        report.seconds = time.monotonic() - start
        report.storage_retries += location.storage_retries  # the driver's own: manifest, failure records
        report.success = location.finish({**report.to_dict(), "settings": work.manifest}) and not report.failed
    finally:
        lease.release()
    progress.maybe_print(report, force=True)
    _print_summary(report, out)
    return report


def _print_plan(changes: Changes, work: Plan, out) -> None:
    """--dry-run's answer: units and rows per action, the first few files of each, and one JSON line.

    Small files planned from their listing have no row count before their replica reads the footer: an action
    with such units says how many, and gives the rows of the others ("rows" is null in the JSON line, the known
    ones "rows_known"), rather than read a million footers to print a number."""

    def counts(units) -> dict:
        known = [u.num_rows for u in units if u.num_rows is not None]
        if len(known) == len(units):
            return {"units": len(units), "rows": sum(known)}
        return {
            "units": len(units),
            "rows": None,
            "rows_known": sum(known),
            "units_rows_unknown": len(units) - len(known),
        }

    current = {unit.id for unit in work.units}
    kept = [u for u in changes.plan if u.id not in current]
    actions = [
        ("run", changes.run, "new input"),
        ("redo", changes.redo, "input rewritten since it was summarized"),
        ("skip", changes.skip, "committed by an earlier run"),
        ("remove", changes.remove, "outputs of rewritten or deleted files"),
        ("keep", kept, "earlier output outside this selection, or of files unreadable or missed now"),
    ]
    print("[lakesum] dry run: nothing was written", file=out)
    for name, units, meaning in actions:
        count = counts(units)
        if count["rows"] is None:
            unknown = count["units_rows_unknown"]
            rows = f"{count['rows_known']:>13,} rows (+ those of {unknown:,} small files, read when run)"
        else:
            rows = f"{count['rows']:>13,} rows"
        print(f"  {name:<7}{len(units):>9,} units {rows}   {meaning}", file=out)
        for relative in sorted({u.relative for u in units})[:DRY_RUN_FILES] if name != "skip" else ():
            print(f"           {relative}", file=out)
    for error in work.unreadable:
        print(f"  unreadable: {error.shard.relative}: {error.reason}", file=out)
    print(
        json.dumps(
            {
                "lakesum": "dry-run",
                **{name: counts(units) for name, units, _ in actions},
                "unreadable": len(work.unreadable),
                "fresh_output": changes.fresh,
            }
        ),
        file=out,
        flush=True,
    )


def start_replicas(
    settings: SummarizeSettings,
    input_url,
    output_url: str,
    storage_options: dict | None,
    count: int,
    cpus_per_replica: int,
    generation: int | None = None,
    *,
    placement: Placement = DEFAULT_PLACEMENT,
    target: Target | None = None,
    log: EventLog | None = None,
) -> list:
    """`count` Replica actors on the Ray the caller joined, each asking for what `target` says (by default the one
    `placement` chooses on the cluster as it is now, logged). Returns those placed, with their model loaded,
    within placement.placement_timeout; the others are dropped (pipeline/placement.py). Ray restarts one that
    dies; the summarization driver and the fine-tuning driver both start them here."""
    import ray

    from .replica import HEARTBEAT_GROUP, UNITS_PER_REPLICA, Replica

    log = log or EventLog()
    target = target or placement.choose(cpus_per_replica, settings.quantization, log)
    # units run in the default group's threads; heartbeats in a thread of their own, answered while units run
    actor = ray.remote(concurrency_groups={HEARTBEAT_GROUP: 1})(Replica).options(
        max_restarts=-1, max_task_retries=0, max_concurrency=UNITS_PER_REPLICA, **target.options
    )
    actors = [
        actor.remote(
            settings,
            input_url,
            output_url,
            storage_options,
            cpus_per_replica,
            generation,
            placement.device,
            target.tokenize_workers,  # the workers its num_cpus includes
        )
        for _ in range(count)
    ]
    return wait_until_placed(actors, target, placement.placement_timeout, log)


@dataclass
class _Flight:
    """A unit handed to a replica, and its last sign of progress."""

    unit: WorkUnit
    replica: int
    life: int  # how many times its replica had died when the unit was handed to it
    attempt: str
    rows: int = 0  # summarized so far, as the replica's last heartbeat told
    # when rows last grew, or the replica first answered a heartbeat while holding the unit (before that, it may
    # still be loading its model: that too gets replica_timeout), or the unit was handed out
    progressed: float = field(default_factory=time.monotonic)
    answered: bool = False  # the replica has answered a heartbeat since the unit was handed to it
    crowded: bool = False  # its replica died while running it beside other units


def _dispatch(
    actors,
    todo: deque,
    schemas,
    location: OutputLocation,
    report: RunReport,
    progress,
    replica_timeout: float = DEFAULT_REPLICA_TIMEOUT,
):
    """Hand out units until each one committed or failed.

    Whatever ends a replica (its process killed, its node lost, Ray's memory monitor, or the driver itself after
    replica_timeout seconds without a summarized row) is a retry: Ray restarts the replica and its units go out
    again. Which unit killed it is unknown while others ran beside it, so those units become suspects, and a
    suspect runs alone on a replica. Only a death while a unit runs alone counts against its MAX_ATTEMPTS: a
    poison unit fails alone, and the innocent units beside it commit.
    """
    import ray
    from ray.exceptions import ActorUnavailableError, RayError, RayTaskError

    from .metrics import PipelineMetrics
    from .replica import HEARTBEAT_GROUP, UNITS_PER_REPLICA

    metrics = PipelineMetrics()

    def fail(unit: WorkUnit, reason: str) -> None:
        report.failed[_name(unit)] = reason
        location.record_failure(unit, reason)
        metrics.unit_failures.inc()

    replicas = range(len(actors))
    deaths: dict[str, int] = {}  # unit id -> deaths of its replica while it ran alone
    suspects: deque[WorkUnit] = deque()  # in flight beside others on a replica that died: each runs alone next
    in_flight: dict = {}  # ObjectRef of a process() call -> _Flight
    load = [0] * len(actors)
    life = [0] * len(actors)  # deaths of each replica so far
    alone: set[int] = set()  # replicas running a suspect, and nothing beside it
    draining: set[int] = set()  # a replica taking no new unit until it is idle and takes a suspect
    # A replica whose process or node died gets no units until it answers a ping: while Ray restarts it
    # (or waits for room to), calls to it fail at once, and each would cost a unit one of its attempts.
    down: set[int] = set()
    gone: dict[int, str] = {}  # replicas that cannot come back (their restart failed) -> why
    pings: dict = {}  # ObjectRef of a where() call -> replica
    restarting: dict[int, float] = {}  # replica -> when it died (it is back once a ping answers)
    beats: dict = {}  # ObjectRef of a heartbeat() call -> (replica, its life when asked)
    last_beat = [0.0] * len(actors)
    killed: dict[tuple[int, int], str] = {}  # (replica, life) killed for making no progress -> why
    # seconds between heartbeats: often enough for the progress line, and to notice a hung replica in time
    interval = max(0.1, min(progress.every, HEARTBEAT_SECONDS, replica_timeout / 4 if replica_timeout else 1e9))

    def send(index: int, unit: WorkUnit) -> None:
        attempt = uuid.uuid4().hex[:12]
        ref = actors[index].process.remote(unit, schemas.get(unit.shard.path), attempt)
        in_flight[ref] = _Flight(unit, index, life[index], attempt)
        load[index] += 1

    def hand_out() -> None:
        if not suspects:
            draining.clear()
        for index in replicas:
            if index in down or index in alone:
                continue
            if suspects and load[index] == 0:
                send(index, suspects.popleft())
                alone.add(index)
                draining.discard(index)
            elif index not in draining:
                while load[index] < UNITS_PER_REPLICA and todo:
                    send(index, todo.popleft())
        if suspects and not alone and not draining:  # every replica is busy: the least busy one drains for them
            up = [i for i in replicas if i not in down]
            if up:
                draining.add(min(up, key=load.__getitem__))

    def died(flight: _Flight, err: RayError) -> None:
        index, unit = flight.replica, flight.unit
        if flight.life == life[index]:  # the first of this death's units to report it
            life[index] += 1
            down.add(index)
            alone.discard(index)
            draining.discard(index)
            pings[_ping(actors[index])] = index
            restarting[index] = time.monotonic()
            beside = [f for f in in_flight.values() if f.replica == index and f.life == flight.life]
            for f in [flight, *beside]:
                f.crowded = bool(beside)
        cause = killed.get((index, flight.life)) or type(err).__name__
        if not flight.crowded:
            deaths[unit.id] = deaths.get(unit.id, 0) + 1
            if deaths[unit.id] >= MAX_ATTEMPTS:
                fail(unit, f"its replica died {MAX_ATTEMPTS} times while running it alone (last: {cause})")
                return
        suspects.append(unit)
        report.retries += 1
        metrics.unit_retries.inc()

    def heard(index: int, rows: dict[str, int], now: float) -> None:
        for flight in in_flight.values():
            if flight.replica == index and flight.life == life[index]:
                done = rows.get(flight.attempt, flight.rows)
                if not flight.answered or done > flight.rows:
                    flight.rows, flight.progressed, flight.answered = done, now, True

    def listen(now: float) -> None:
        """Heartbeats to busy replicas. With a replica_timeout, a replica holding a unit that summarized nothing
        for that long is killed, and one not back that long after its death is given up."""
        beating = {index for index, _ in beats.values()}
        for index in replicas:
            if load[index] and index not in down and index not in beating and now - last_beat[index] >= interval:
                beats[actors[index].heartbeat.options(concurrency_group=HEARTBEAT_GROUP).remote()] = index, life[index]
                last_beat[index] = now
        if not replica_timeout:
            return
        for index, since in list(restarting.items()):
            if now - since >= replica_timeout:  # its constructor hangs, or there is no room for it
                del restarting[index]
                gone[index] = f"replica {index} was not back {replica_timeout:g} s after it died"
                for ref in [ref for ref, i in pings.items() if i == index]:
                    del pings[ref]
                progress.log("gone", f"{gone[index]}: given up", replica=index, seconds=replica_timeout)
                ray.kill(actors[index], no_restart=True)
        for flight in list(in_flight.values()):
            index = flight.replica
            if (
                now - flight.progressed < replica_timeout
                or index in down
                or flight.life != life[index]
                or (index, flight.life) in killed
            ):
                continue
            why = f"no row summarized for {replica_timeout:g} s"
            killed[(index, flight.life)] = why
            report.hung_replicas += 1
            metrics.hung_replicas.inc()
            progress.log(
                "hung",
                f"replica {index}: {why} (of {_name(flight.unit)}): killed, its units go out again",
                replica=index,
                shard=flight.unit.shard.relative,
                seconds=replica_timeout,
            )
            ray.kill(actors[index], no_restart=False)  # Ray restarts it; its calls fail, and died() requeues them

    while todo or suspects or in_flight:
        hand_out()
        if not in_flight and not pings:  # every replica is gone for good
            reason = f"no replica left: {next(iter(gone.values()))}"
            for unit in [*todo, *suspects]:
                fail(unit, reason)
            todo.clear()
            suspects.clear()
            break
        ready, _ = ray.wait([*in_flight, *pings, *beats], num_returns=1, timeout=interval)
        now = time.monotonic()
        for ref in ready:
            if ref in beats:
                index, asked = beats.pop(ref)
                try:
                    rows = ray.get(ref)
                except RayError:
                    continue  # the replica died: its units' calls say so
                if asked == life[index]:
                    heard(index, rows, now)
                continue
            if ref in pings:
                index = pings.pop(ref)
                try:
                    ray.get(ref)
                    down.discard(index)  # restarted, model loaded: back in rotation
                    restarting.pop(index, None)
                except ActorUnavailableError:
                    pings[_ping(actors[index])] = index  # still restarting
                except RayError as err:  # it cannot come back: its constructor failed, or Ray gave it up
                    gone[index] = describe(err)
                    restarting.pop(index, None)
                continue
            flight = in_flight.pop(ref)
            load[flight.replica] -= 1
            if not load[flight.replica]:
                alone.discard(flight.replica)
            try:
                result = ray.get(ref)
            except RayTaskError as err:  # the unit's own error (its data, its storage): a retry would fail the same
                fail(flight.unit, describe(err))
                continue
            except RayError as err:  # its replica died (killed, its node lost, out of memory, hung)
                died(flight, err)
                continue
            report.committed += 1
            progress.learned(flight.unit, result["rows"])
            report.storage_retries += result.get("storage_retries", 0)
            report.stats.add(Stats(**{k: result[k] for k in Stats.__dataclass_fields__}))
        listen(now)
        progress.maybe_print(report, rows_in_flight=sum(f.rows for f in in_flight.values()))


def _ping(actor):
    """A call that answers once the replica is up again (retried across its restarts), or fails if it never will."""
    return actor.where.options(max_task_retries=-1).remote()


def _name(unit: WorkUnit) -> str:
    return unit.shard.relative if unit.whole_file else f"{unit.shard.relative} (row groups {unit.start}-{unit.stop})"


def _print_summary(report: RunReport, out) -> None:
    s = report.stats
    rate = s.rows / report.seconds if report.seconds else 0.0
    print(
        json.dumps(
            {
                "lakesum": "done" if report.success else "incomplete",
                "units": report.units,
                "committed": report.committed,
                "skipped": report.skipped,
                "failed": len(report.failed),
                "retries": report.retries,
                "storage_retries": report.storage_retries,
                "hung_replicas": report.hung_replicas,
                "documents": s.rows,
                "empty": s.empty,
                "truncated": s.truncated,
                "generated_tokens": s.output_tokens,
                "seconds": round(report.seconds, 2),
                "docs_per_second": round(rate, 2),
            }
        ),
        file=out,
        flush=True,
    )
