"""The commit protocol: the one module that writes to the output location.

Layout (everything that is not data starts with `_`, so Spark, DuckDB and pyarrow.dataset skip it):

    <output>/<unit.output_relative>               the data: one Parquet file per work unit
    <output>/_SUCCESS                             empty; written only when every planned unit has committed
    <output>/_lakesum/manifest.json               the run's settings and its unit plan (ids, ranges, row counts,
                                                  input identities), one list a field (UnitRecord)
    <output>/_lakesum/lease.json                  the running job's lease: one writer at a time (lease.py)
    <output>/_lakesum/committed/<unit id>.json    commit markers: the unit's output is complete and final
    <output>/_lakesum/committed.json              the markers of earlier runs, compacted into one file (their
                                                  COMMIT_FIELDS, one list a field)
    <output>/_lakesum/failed/<id>.json            units (or unreadable shards) that failed in the latest run
    <output>/_lakesum/staging/                    outputs being written
    <output>/_lakesum/report.json                 the latest run's report

A unit is written to `staging/<unit id>.<attempt>.parquet`, moved to its final, deterministic name, and
only then marked committed. Whatever dies wherever, a rerun of the unit writes the same final name, so a
row can be written twice but never appear twice; a final file without a marker is simply rewritten, and a
unit with a marker is skipped. A unit's id includes its input file's identity (footers.py), so a file
rewritten since is a new unit: its output is replaced, and earlier units of rewritten or deleted files are
removed (`reconcile`), so that the output mirrors the input.

What this assumes of the storage: on local filesystems a rename within one filesystem is atomic (the
staging folder sits inside the output, so it always is); on object stores (s3://, gs://, memory://)
an object appears whole or not at all when its upload completes, so fsspec's copy-then-delete `mv`
publishes atomically, and small JSON files are written with one PUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from model.storage import is_local, open_filesystem, redact_url, sync_file, write_atomically

from .errors import OutputError
from .lease import DEFAULT_TIMEOUT as DEFAULT_LEASE_TIMEOUT
from .lease import LEASE, Lease
from .listing import Shard
from .retry import Backoff, with_retries
from .units import WorkUnit

# 2: unit ids include the input's identity (version 1 outputs are refused: pass --overwrite once)
# 3: units and compacted markers are stored one list a field (version 2 outputs are refused likewise)
MANIFEST_VERSION = 3
META = "_lakesum"
INDEX = "committed.json"  # compacted commit markers
SUCCESS = "_SUCCESS"
# Stages hand over small batches (a few hundred rows); one row group per batch would make the files slow
# to scan, so batches are gathered into row groups of up to this many rows or bytes.
ROW_GROUP_ROWS = 64 * 1024
ROW_GROUP_BYTES = 64 << 20
COMPRESSION = "zstd"
_ATTEMPT = re.compile(r"[A-Za-z0-9_-]{1,64}")
T = TypeVar("T")


class OutputLocation:
    def __init__(self, url: str, storage_options: dict | None = None, generation: int | None = None):
        self.url = redact_url(url)  # for messages
        self.fs, self.root = open_filesystem(url, storage_options, error=OutputError)
        # a local rename is atomic, so local files are written aside and renamed into place
        self.local = is_local(self.fs)
        # the lease generation this location writes under (a replica's, given by its driver), or None when
        # it writes without a lease (tests of the protocol itself)
        self.generation = generation
        self._lease: Lease | None = None
        # Reads and writes of the run's own files (manifest, markers, report) tried again after a transient
        # storage error: an unattended nightly run must not fail on one throttled request.
        self.storage_retries = 0
        self.backoff = Backoff()

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # --- the run -------------------------------------------------------------------------------------

    def reconcile(
        self,
        settings: dict,
        *,
        units: Sequence[WorkUnit] = (),
        overwrite: bool = False,
        listed: set[str] | None = None,
        unreadable: set[str] = frozenset(),
        in_selection: Callable[[str], bool] | None = None,
        input_exists: Callable[[str], bool] | None = None,
    ) -> Changes:
        """What this run will do to the output, or why it must not run; reads the output, changes nothing.

        - No manifest: a fresh output. Files already at the names this run would write are refused
          (they are not ours) unless `overwrite`.
        - Other settings: refused with the differing keys, unless `overwrite`, which replaces exactly the
          files the old manifest names, `_SUCCESS` and `_lakesum/`.
        - Same settings: the output is made to mirror the input as listed now. A unit's id includes its
          input's identity, so earlier units that are not in this plan belong to a file that was rewritten
          (it is still `listed`) or is gone: their outputs and markers are removed. A file the listing did
          not show is removed only once `input_exists` confirms it is gone (a listing may be incomplete);
          if it still exists its units are kept and reported as missed. Earlier units outside this run's
          selection (`in_selection`, a partition filter) or of `unreadable` files are kept as they are.
        """
        settings = _json_round_trip(_redacted(settings))
        plan = [_unit_record(unit) for unit in units]
        self._refuse_writing_over_inputs(units)
        try:
            old = self._read_manifest()
        except OutputError:
            if not overwrite:
                raise
            old = None  # unreadable and to be replaced: nothing to tell which files were ours
        if old is None or overwrite:
            if old is None and not overwrite:
                self._refuse_foreign_files(plan)
            # nothing of the old output survives prepare(), so no unit is committed
            return Changes(settings, plan, run=plan, fresh=True, previous=old, complete=not plan)
        self._check_same_settings(old["settings"], settings)
        listed = {u.relative for u in plan} if listed is None else listed
        current = {u.id for u in plan}
        kept, replaced, unlisted = [], [], []
        # only the earlier units that are not in this plan become records (usually a few of a million)
        for unit in (UnitRecord(*row) for row in _rows(old["units"], UnitRecord._fields) if row[0] not in current):
            relative = unit.relative
            if relative in unreadable or (in_selection is not None and not in_selection(relative)):
                kept.append(unit)
            elif relative in listed:
                replaced.append(unit)  # the file was rewritten: new identity or new row groups
            else:
                unlisted.append(unit)
        generation = old.get("generation", 0)
        del old  # a million units' worth: not held while the markers are read
        exists = {
            relative: input_exists is None or input_exists(relative) for relative in {u.relative for u in unlisted}
        }
        missed = [u for u in unlisted if exists[u.relative]]
        gone = [u for u in unlisted if not exists[u.relative]]
        committed = self.committed_ids()
        rewritten = {u.relative for u in replaced}
        todo = [u for u in plan if u.id not in committed]
        return Changes(
            settings,
            kept + missed + plan,
            skip=[u for u in plan if u.id in committed],
            run=[u for u in todo if u.relative not in rewritten],
            redo=[u for u in todo if u.relative in rewritten],
            remove=replaced + gone,
            missed=missed,
            generation=generation,
            complete=not todo and all(u.id in committed for u in kept + missed),
        )

    def prepare(
        self,
        settings: dict,
        *,
        units: Sequence[WorkUnit] = (),
        overwrite: bool = False,
        recorded: dict | None = None,
        **selection,
    ) -> Changes:
        """Make the location ready for this run (see `reconcile`, which takes the same arguments), or refuse.

        Outputs and markers of removed units go first and the manifest is written last, so a run killed
        in between leaves the old manifest, and the next run removes the same units again. Staging files
        and failure records of earlier runs are cleared in every case. `recorded` goes into the manifest
        as it is, not compared with the next run's (the hub commit the model was loaded at).
        """
        changes = self.reconcile(settings, units=units, overwrite=overwrite, **selection)
        if changes.fresh and changes.previous is not None:
            self._delete_previous(changes.previous)
        elif changes.fresh:
            self._remove_meta()
        else:
            self._remove_tree(self._path(META, "staging"))
            self._remove_tree(self._path(META, "failed"))
            self._remove_units(changes.remove, keep_outputs={u.output for u in changes.plan})
        self._put_json(
            self._path(META, "manifest.json"),
            {
                "lakesum": MANIFEST_VERSION,
                "settings": changes.settings,
                "units": _columns(changes.plan, UnitRecord._fields),
                "generation": self.generation or changes.generation,
                "written_at": _now(),
                **_redacted(recorded or {}),
            },
        )
        if not changes.complete:
            self._remove_file(self._path(SUCCESS))
        return changes

    def lease(self, timeout: float = DEFAULT_LEASE_TIMEOUT, note=lambda text: None) -> Lease:
        """Take the output's lease (one writer at a time; see lease.py), or raise LeaseHeld.

        This location then publishes only while the lease is still its generation's.
        """
        lease = Lease(self.fs, self._path(META), self.url, timeout)
        try:
            last = (self._read_manifest() or {}).get("generation", 0)
        except OutputError:
            last = 0
        self.generation = lease.acquire(last, note)
        self._lease = lease
        return lease

    def committed_files(self, settings: dict) -> dict[str, tuple[UnitRecord, ...]]:
        """Input file (relative) -> its unit records, for each file all of whose units committed under these same
        settings: planning takes an unchanged file's units from here rather than read its footer again."""
        try:
            old = self._read_manifest()
        except OutputError:
            return {}
        if old is None or old["settings"] != _json_round_trip(_redacted(settings)):
            return {}
        by_file: dict[str, tuple[UnitRecord, ...]] = {}  # tuples: most files are one unit
        for row in _rows(old["units"], UnitRecord._fields):
            unit = UnitRecord(*row)
            by_file[unit.relative] = by_file.get(unit.relative, ()) + (unit,)
        del old  # a million units' worth: not held while the markers are read
        committed = self.committed_ids()
        for relative in [r for r, units in by_file.items() if not all(u.id in committed for u in units)]:
            del by_file[relative]
        # Units planned from the listing have their rows in their commit markers only (the replica read the footer):
        # taken from there, so that the next manifest, the dry run and the progress know them.
        if any(u.num_rows is None for units in by_file.values() for u in units):
            index = self._cat_index()
            rows = dict(zip(index.get("id", ()), index.get("num_rows", ())))
            rows.update((i, m.get("num_rows")) for i, m in self._read_records(self._path(META, "committed")).items())
            for relative, units in by_file.items():
                if any(u.num_rows is None for u in units):
                    by_file[relative] = tuple(u._replace(num_rows=rows.get(u.id)) for u in units)
        return by_file

    def committed_units(self) -> dict[str, dict]:
        """Unit id -> its commit marker (num_rows, output, input identity, attempt, generation, committed_at).

        The markers that runs compacted into `committed.json` (with the unit's record from the manifest), plus
        those written since, one file a unit.
        """
        index = self._read_index()
        manifest = self._read_manifest() if index else None
        if manifest is not None:
            records = {u.id: u._asdict() for u in manifest_units(manifest) if u.id in index}
            index = {unit_id: {**records.get(unit_id, {}), **facts} for unit_id, facts in index.items()}
        return {**index, **self._read_records(self._path(META, "committed"))}

    def committed_ids(self) -> set[str]:
        """The ids of committed_units(), read without them: a marker is written whole (aside, then renamed, or one
        PUT), so its name says enough."""
        index = self._cat_index()
        folder = self._path(META, "committed")
        self.fs.invalidate_cache(folder)  # other processes (replicas) write here
        try:
            names = self._retrying(lambda: self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            names = []
        return set(index.get("id", ())) | {posixpath.basename(p)[: -len(".json")] for p in names if p.endswith(".json")}

    def compact_markers(self) -> None:
        """Fold the one-file-a-unit markers into `committed.json`, so that a rerun reads a few files.

        The index is written before the markers are deleted: a run killed in between leaves both, which
        read back as the same set.
        """
        markers = self._read_records(self._path(META, "committed"))
        if not markers:
            return
        self._write_index({**self._read_index(), **markers})
        self._remove_files_quietly([self._path(META, "committed", f"{unit_id}.json") for unit_id in markers])

    def failed_units(self) -> dict[str, dict]:
        """Id -> failure record (relative, range, reason) of units and shards that failed in the latest run."""
        return self._read_records(self._path(META, "failed"))

    def write_unit(
        self,
        unit: WorkUnit,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        *,
        attempt: str,
        unchanged: Callable[[], None] | None = None,
    ) -> int:
        """Stream the unit's output to staging, publish it at its final name, then mark it committed.

        Returns the row count. If `batches` raises, nothing is published. A unit must come out with as
        many rows as went in (no row is ever dropped), as its input's footer counts them; otherwise nothing is
        published either, and neither if `unchanged`, called after the last row was written, raises (the input
        changed since the plan: units.ensure_unchanged). The marker records the input's identity and rows.
        """
        if unit.num_rows is None:
            raise ValueError(f"{unit.shard.relative}: its row count is unknown; resolve_unit() it first")
        if self._lease is None and self.generation is not None:
            self._lease = Lease(self.fs, self._path(META), self.url)
            self._lease.generation = self.generation
        if not _ATTEMPT.fullmatch(attempt):
            raise ValueError(f"attempt {attempt!r}: use 1-64 letters, digits, - or _")
        staging = self._path(META, "staging", f"{unit.id}.{attempt}.parquet")
        final = self._path(unit.output_relative)
        try:
            rows = self._write_parquet(staging, schema, batches)
            if rows != unit.num_rows:
                raise RuntimeError(
                    f"{unit.shard.relative}: {rows} output rows for row groups {unit.start}-"
                    f"{unit.stop}, which hold {unit.num_rows}; not committed"
                )
            if unchanged is not None:
                unchanged()
            if self._lease is not None:
                self._lease.check()  # a run that lost its lease publishes nothing more
            self._makedirs_for(final)
            self.fs.mv(staging, final)
        except BaseException:
            self._remove_file(staging, quietly=True)  # what is left is swept by the next prepare()
            raise
        # the marker last: a unit counts as done only once its output is final
        self._put_json(
            self._path(META, "committed", f"{unit.id}.json"),
            {
                **_unit_record(unit)._asdict(),
                "num_rows": rows,
                "attempt": attempt,
                "generation": self.generation,
                "committed_at": _now(),
            },
        )
        self._remove_file(self._path(META, "failed", f"{unit.id}.json"))
        return rows

    def record_failure(self, unit: WorkUnit | Shard, reason: str) -> None:
        """Record that a unit failed, or a whole shard (one whose footer could not be read, so it has no units).

        Any failure record keeps `finish` from writing `_SUCCESS`.
        """
        if self._lease is not None:
            self._lease.check()  # a run that lost its lease must not fail units of the run that holds it
        if isinstance(unit, Shard):
            record = {"id": _shard_failure_id(unit), "relative": unit.relative}
        else:
            record = _unit_record(unit)._asdict()
        record.update(reason=reason[:2000], failed_at=_now())
        self._put_json(self._path(META, "failed", f"{record['id']}.json"), record)

    def finish(self, report: dict) -> bool:
        """Compact the markers, write the report, and `_SUCCESS` iff every planned unit committed and nothing
        failed.

        Returns whether it did. A `_SUCCESS` from an earlier run is removed when this one is incomplete.
        """
        manifest = self._read_manifest()
        if manifest is None:
            raise OutputError(f"{self.url}: no manifest; prepare() the output location first")
        self.compact_markers()
        committed = self.committed_ids()
        done = all(unit_id in committed for unit_id in manifest["units"]["id"]) and not self.failed_units()
        self.write_report({**report, "success": done})
        if done:
            self._retrying(lambda: write_atomically(self.fs, self._path(SUCCESS), []))
        else:
            self._remove_file(self._path(SUCCESS))
        return done

    def write_report(self, report: dict) -> None:
        """The report holds the settings, model URI included: its credentials are masked as in the manifest."""
        self._put_json(self._path(META, "report.json"), _redacted(report), indent=1)  # read by people

    # --- prepare's checks ----------------------------------------------------------------------------

    def _refuse_writing_over_inputs(self, units: Sequence[WorkUnit]) -> None:
        inputs = {unit.shard.path for unit in units}
        root = self._path("")  # joined by hand: posixpath.join a unit is seconds at a million units
        for unit in units:
            if root + unit.output_relative in inputs:
                raise OutputError(
                    f"{self.url}: the output for {unit.shard.relative} would be written over an "
                    "input file; choose an --output outside the input"
                )

    def _refuse_foreign_files(self, plan: list[UnitRecord]) -> None:
        existing = set(self._find(self.root))
        root = self._path("")
        clashes = [u.output for u in plan if root + u.output in existing]
        if clashes:
            raise OutputError(
                f"{self.url} already holds {len(clashes)} file(s) at the names this run writes "
                f"(e.g. {clashes[0]}) and no lakesum manifest; pass --overwrite to replace them, "
                "or choose another --output"
            )

    def _check_same_settings(self, old: dict, new: dict) -> None:
        differences = [
            f"{key}: {_short(old.get(key, '(unset)'))} -> {_short(new.get(key, '(unset)'))}"
            for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)
        ]
        if differences:
            raise OutputError(
                f"{self.url} was written with other settings ({'; '.join(differences)}); pass "
                "--overwrite to replace its output, or choose another --output"
            )

    def _delete_previous(self, old: dict) -> None:
        """Delete what the old manifest names, markers first, the manifest last (it lists the outputs)."""
        self._remove_file(self._path(SUCCESS))
        manifest = self._path(META, "manifest.json")
        ours = [p for p in self._meta_files() if p != manifest]
        self._remove_files(ours)
        if self.local:
            _remove_empty_folders(ours, self._path(META))
        outputs = {self._path(_checked_relative(output, self.url)) for output in old["units"]["output"]}
        deleted = [p for p in self._find(self.root) if p in outputs]
        self._remove_files(deleted)
        if self.local:
            _remove_empty_folders(deleted, self.root)

    def _remove_meta(self) -> None:
        """Clear `_lakesum/` and `_SUCCESS` when there is no manifest: markers without one mean nothing."""
        self._remove_file(self._path(SUCCESS))
        files = self._meta_files()
        self._remove_files(files)
        if self.local:
            _remove_empty_folders(files, self._path(META))

    def _meta_files(self) -> list[str]:
        """Every file under `_lakesum/` but the lease, which belongs to the run that holds it."""
        lease = self._path(META, LEASE)
        return [p for p in self._find(self._path(META)) if p != lease]

    def _remove_units(self, units: list[UnitRecord], keep_outputs: set[str]) -> None:
        """Remove earlier units: their markers, and their outputs unless this plan writes the same name (a
        file rewritten with the same row groups, whose new output replaces the old one atomically)."""
        if not units:
            return
        ids = {u.id for u in units}
        index = self._read_index()
        if ids & index.keys():
            self._write_index({key: value for key, value in index.items() if key not in ids})
        self._remove_files_quietly([self._path(META, "committed", f"{unit_id}.json") for unit_id in ids])
        outputs = {_checked_relative(u.output, self.url) for u in units} - keep_outputs
        deleted = [self._path(relative) for relative in sorted(outputs)]
        self._remove_files_quietly(deleted)
        if self.local:
            _remove_empty_folders(deleted, self.root)

    def _cat_index(self) -> dict[str, list]:
        """The compacted markers, one list a field (COMMIT_FIELDS)."""
        try:
            index = json.loads(self._retrying(lambda: self.fs.cat_file(self._path(META, INDEX))))
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}  # written atomically; unreadable only if torn by a power loss: its units are done again
        units = index.get("units") if isinstance(index, dict) else None
        return units if isinstance(units, dict) and set(COMMIT_FIELDS) <= units.keys() else {}

    def _read_index(self) -> dict[str, dict]:
        """Unit id -> the commit's facts (COMMIT_FIELDS)."""
        columns = self._cat_index()
        return {row[0]: dict(zip(COMMIT_FIELDS, row)) for row in _rows(columns, COMMIT_FIELDS)} if columns else {}

    def _write_index(self, units: dict[str, dict]) -> None:
        rows = [tuple(marker.get(name) for name in COMMIT_FIELDS) for marker in units.values()]
        self._put_json(self._path(META, INDEX), {"lakesum": MANIFEST_VERSION, "units": _columns(rows, COMMIT_FIELDS)})

    # --- files ---------------------------------------------------------------------------------------

    def _write_parquet(self, path: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
        self._makedirs_for(path)
        rows = 0
        pending: list[pa.RecordBatch] = []
        pending_rows = pending_bytes = 0
        with self.fs.open(path, "wb") as f:
            writer = pq.ParquetWriter(f, schema, compression=COMPRESSION)
            try:
                for batch in batches:
                    pending.append(batch)
                    pending_rows += batch.num_rows
                    pending_bytes += batch.nbytes
                    if pending_rows >= ROW_GROUP_ROWS or pending_bytes >= ROW_GROUP_BYTES:
                        writer.write_table(pa.Table.from_batches(pending, schema=schema))
                        rows += pending_rows
                        pending, pending_rows, pending_bytes = [], 0, 0
                if pending:
                    writer.write_table(pa.Table.from_batches(pending, schema=schema))
                    rows += pending_rows
            finally:
                writer.close()
        if self.local:  # on the device before the rename publishes it: a power loss cannot publish a torn file
            sync_file(path)
        return rows

    def _read_manifest(self) -> dict | None:
        path = self._path(META, "manifest.json")
        try:
            manifest = json.loads(self._retrying(lambda: self.fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise OutputError(
                f"{self.url}: {META}/manifest.json is unreadable ({e}); pass --overwrite to replace the output"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("lakesum") != MANIFEST_VERSION:
            raise OutputError(
                f"{self.url}: {META}/manifest.json is not a lakesum manifest of version "
                f"{MANIFEST_VERSION}; pass --overwrite to replace the output"
            )
        return manifest

    def _read_records(self, folder: str) -> dict[str, dict]:
        self.fs.invalidate_cache(folder)  # other processes (replicas) write here
        try:
            names = [p for p in self._retrying(lambda: self.fs.ls(folder, detail=False)) if p.endswith(".json")]
        except FileNotFoundError:
            return {}
        if not names:
            return {}
        records = {}
        for path, data in self._retrying(lambda: _cat_existing(self.fs, names)).items():
            try:
                records[posixpath.basename(path)[: -len(".json")]] = json.loads(data)
            except ValueError:
                # written atomically, so only a torn local write after a power loss looks like this; the
                # unit then counts as not committed and is done again, which is always safe
                continue
        return records

    def _put_json(self, path: str, obj: dict, indent: int | None = None) -> None:
        if indent is not None:
            data = json.dumps(obj, indent=indent, sort_keys=True, default=str).encode()
            self._retrying(lambda: write_atomically(self.fs, path, [data]))
        else:
            self._retrying(lambda: write_atomically(self.fs, path, _json_chunks(obj)))

    def _retrying(self, call: Callable[[], T]) -> T:
        """call(), tried again after a transient storage error. Only for calls that can be repeated as they
        are: whole-file writes, reads, listings and deletes."""

        def count(error: BaseException) -> None:
            self.storage_retries += 1

        return with_retries(call, backoff=self.backoff, on_retry=count)

    def _makedirs_for(self, path: str) -> None:
        if self.local:  # object stores have no folders; creating one on s3 would create a bucket
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)

    def _find(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)
        try:
            return self._retrying(lambda: self.fs.find(path))
        except FileNotFoundError:
            return []

    def _remove_file(self, path: str, quietly: bool = False) -> None:
        try:
            self._retrying(lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass
        except OSError:
            if not quietly:
                raise

    def _remove_files(self, paths: list[str]) -> None:
        if not paths:
            return
        try:
            self._retrying(lambda: self.fs.rm(paths))
        except FileNotFoundError:  # some already gone: a retry after a delete that was partly done
            for path in paths:
                self._remove_file(path)

    def _remove_files_quietly(self, paths: list[str]) -> None:
        """Remove those of `paths` that exist (object stores delete in batches and ignore missing keys)."""
        if not self.local:
            self._remove_files(paths)
            return
        for path in paths:
            self._remove_file(path)

    def _remove_tree(self, path: str) -> None:
        self.fs.invalidate_cache(path)
        try:
            self._retrying(lambda: self.fs.rm(path, recursive=True))
        except FileNotFoundError:
            pass


def _cat_existing(fs, paths: list[str]) -> dict[str, bytes]:
    """The contents of those of `paths` that exist. Any other error is raised, never passed over: a failure
    record skipped on a dropped connection would let `finish` write `_SUCCESS`."""
    found = {}
    for path, data in fs.cat(paths, on_error="return").items():
        if isinstance(data, FileNotFoundError):  # removed since the listing (compacted, or its unit redone)
            continue
        if isinstance(data, BaseException):
            raise data
        found[path] = data
    return found


class UnitRecord(NamedTuple):
    """A unit as the manifest records it (a tuple, not a dict: a manifest can hold a million)."""

    id: str
    relative: str  # the input file, relative to the input root
    start: int
    stop: int | None  # None: planned from the listing (units.listed_unit); the marker has the footer's
    num_rows: int | None  # likewise
    output: str  # relative to the output root
    whole_file: bool
    input_identity: str
    input_stat: int | None  # see Shard.stat


# What the compacted index keeps of each marker: the commit's facts (the unit itself is in the manifest)
COMMIT_FIELDS = ("id", "num_rows", "attempt", "generation", "committed_at")


def _unit_record(unit: WorkUnit) -> UnitRecord:
    return UnitRecord(
        unit.id,
        unit.shard.relative,
        unit.start,
        unit.stop,
        unit.num_rows,
        unit.output_relative,
        unit.whole_file,
        unit.identity,
        unit.shard.stat,
    )


def _columns(records: Sequence[tuple], fields: Sequence[str]) -> dict[str, list]:
    """Records as one list a field: JSON of a million units, and its parse, without a dict per unit."""
    values = list(zip(*records)) if records else [()] * len(fields)
    return {name: list(column) for name, column in zip(fields, values)}


def _rows(columns: dict[str, list], fields: Sequence[str]) -> Iterator[tuple]:
    return zip(*(columns[name] for name in fields))


@dataclass
class Changes:
    """What a run does to its output, worked out before anything is touched (--dry-run prints it)."""

    settings: dict
    plan: list[UnitRecord]  # the manifest's units after this run: earlier ones kept, then this run's
    skip: list[UnitRecord] = field(default_factory=list)  # this run's units already committed
    run: list[UnitRecord] = field(default_factory=list)  # this run's units to summarize
    redo: list[UnitRecord] = field(default_factory=list)  # ... again, because their input file was rewritten
    remove: list[UnitRecord] = field(default_factory=list)  # earlier units of rewritten or deleted files
    missed: list[UnitRecord] = field(default_factory=list)  # earlier units of files the listing missed: kept
    fresh: bool = False  # no usable manifest: a new output, or --overwrite
    complete: bool = False  # every unit of `plan` was committed when reconciled (else a _SUCCESS is stale)
    previous: dict | None = None  # with --overwrite: the manifest whose files are replaced
    generation: int = 0  # of the run that wrote the manifest

    def todo(self) -> set[str]:
        return {u.id for u in self.run + self.redo}


def manifest_units(manifest: dict) -> list[UnitRecord]:
    """The units of a manifest as read from manifest.json."""
    return [UnitRecord(*row) for row in _rows(manifest["units"], UnitRecord._fields)]


def _shard_failure_id(shard: Shard) -> str:
    return "shard-" + hashlib.sha256(shard.relative.encode()).hexdigest()[:24]


def _checked_relative(relative: str, url: str) -> str:
    """An output name from a manifest, refused if it points outside the output (a tampered manifest)."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or ".." in parts or parts[0] in (META, SUCCESS):
        raise OutputError(
            f"{url}: {META}/manifest.json names {relative!r} as an output, outside the output "
            "location; refusing to delete it"
        )
    return relative


def _remove_empty_folders(files: list[str], root: str) -> None:
    """Local only: remove the folders that held `files` once they are empty, up to (not including) root."""
    folders = set()
    for path in files:
        folder = posixpath.dirname(path)
        while folder.startswith(root + "/"):
            folders.add(folder)
            folder = posixpath.dirname(folder)
    for folder in sorted(folders, key=lambda f: f.count("/"), reverse=True):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (someone else's files are there) or already gone
            continue


def _redacted(value):
    """Settings with any URL's credentials masked: the manifest and the report are read by whoever can list the
    output."""
    if isinstance(value, str):
        return redact_url(value) if "://" in value else value
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(item) for item in value]
    return value


def _json_chunks(value) -> Iterator[bytes]:
    """Compact JSON with sorted keys, a dict entry at a time: a manifest of a million units, one list a field,
    is never held as one string (json's C encoder, which the one-shot dumps of each list uses, is ten times
    faster than the Python one an indent falls back to)."""
    if not isinstance(value, dict):
        yield json.dumps(value, sort_keys=True, default=str, separators=(",", ":")).encode()
        return
    yield b"{"
    for i, key in enumerate(sorted(value)):
        yield (b"," if i else b"") + json.dumps(str(key)).encode() + b":"
        yield from _json_chunks(value[key])
    yield b"}"


def _json_round_trip(value):
    """As it reads back from the manifest (tuples become lists), so that equal settings compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
