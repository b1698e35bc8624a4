"""The commit protocol: the one module that writes to the output location.

Layout (everything that is not data starts with `_`, so Spark, DuckDB and pyarrow.dataset skip it):

    <output>/<unit.output_relative>               the data: one Parquet file per work unit
    <output>/_SUCCESS                             empty; written only when every planned unit has committed
    <output>/_lakesum/manifest.json               the run's settings and its unit plan (ids, ranges, row counts)
    <output>/_lakesum/committed/<unit id>.json    commit markers: the unit's output is complete and final
    <output>/_lakesum/failed/<id>.json            units (or unreadable shards) that failed in the latest run
    <output>/_lakesum/staging/                    outputs being written
    <output>/_lakesum/report.json                 the latest run's report

A unit is written to `staging/<unit id>.<attempt>.parquet`, moved to its final, deterministic name, and
only then marked committed. Whatever dies wherever, a rerun of the unit writes the same final name, so a
row can be written twice but never appear twice; a final file without a marker is simply rewritten, and a
unit with a marker is skipped.

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
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from .errors import OutputError
from model.redact import redact_url

from .shards import Shard, WorkUnit, open_filesystem

MANIFEST_VERSION = 1
META = "_lakesum"
SUCCESS = "_SUCCESS"
# Stages hand over small batches (a few hundred rows); one row group per batch would make the files slow
# to scan, so batches are gathered into row groups of up to this many rows or bytes.
ROW_GROUP_ROWS = 64 * 1024
ROW_GROUP_BYTES = 64 << 20
COMPRESSION = "zstd"
_ATTEMPT = re.compile(r"[A-Za-z0-9_-]{1,64}")


class OutputLocation:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = redact_url(url)  # for messages
        self.fs, self.root = open_filesystem(url, storage_options, error=OutputError)
        # a local rename is atomic, so local files are written aside and renamed into place
        self.local = isinstance(self.fs, LocalFileSystem)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # --- the run -------------------------------------------------------------------------------------

    def prepare(self, settings: dict, *, units: Sequence[WorkUnit] = (), overwrite: bool = False,
                partial: bool = False) -> None:
        """Make the location ready for this run's settings and unit plan, or refuse.

        - No manifest: a fresh output. Files already at the names this run would write are refused
          (they are not ours) unless `overwrite`.
        - Same settings: resume. The plan may have grown (new input files) but every unit of the earlier
          plan must still be in it unchanged, or its output would be left stale next to the new one.
          With `partial` (a --partition-filter run), units of files outside this selection are kept.
        - Other settings: refused with the differing keys, unless `overwrite`, which first deletes
          exactly the files the old manifest names, `_SUCCESS` and `_lakesum/`, and nothing else.

        Staging files and failure records of earlier runs are cleared in every case.
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
        if old is None:
            if not overwrite:
                self._refuse_foreign_files(plan)
            self._remove_meta()
        elif overwrite:
            self._delete_previous(old)
        else:
            self._check_same_settings(old["settings"], settings)
            plan = self._resumable_plan(old["units"], plan, partial)
            self._remove_tree(self._path(META, "staging"))
            self._remove_tree(self._path(META, "failed"))
            if plan == old["units"]:
                self._remove_stale_success(plan)
                return
        self._put_json(self._path(META, "manifest.json"),
                       {"lakesum": MANIFEST_VERSION, "settings": settings, "units": plan, "written_at": _now()})
        self._remove_stale_success(plan)

    def committed_units(self) -> dict[str, dict]:
        """Unit id -> its commit marker (num_rows, output, attempt, committed_at, range)."""
        return self._read_records(self._path(META, "committed"))

    def failed_units(self) -> dict[str, dict]:
        """Id -> failure record (relative, range, reason) of units and shards that failed in the latest run."""
        return self._read_records(self._path(META, "failed"))

    def write_unit(self, unit: WorkUnit, schema: pa.Schema, batches: Iterable[pa.RecordBatch], *,
                   attempt: str) -> int:
        """Stream the unit's output to staging, publish it at its final name, then mark it committed.

        Returns the row count. If `batches` raises, nothing is published. A unit must come out with as
        many rows as went in (no row is ever dropped); otherwise nothing is published either.
        """
        if not _ATTEMPT.fullmatch(attempt):
            raise ValueError(f"attempt {attempt!r}: use 1-64 letters, digits, - or _")
        staging = self._path(META, "staging", f"{unit.id}.{attempt}.parquet")
        final = self._path(unit.output_relative)
        try:
            rows = self._write_parquet(staging, schema, batches)
            if rows != unit.num_rows:
                raise RuntimeError(f"{unit.shard.relative}: {rows} output rows for row groups {unit.start}-"
                                   f"{unit.stop}, which hold {unit.num_rows}; not committed")
            self._makedirs_for(final)
            self.fs.mv(staging, final)
        except BaseException:
            self._remove_file(staging, quietly=True)  # what is left is swept by the next prepare()
            raise
        # the marker last: a unit counts as done only once its output is final
        self._put_json(self._path(META, "committed", f"{unit.id}.json"), {
            **_unit_record(unit), "num_rows": rows, "attempt": attempt, "committed_at": _now()})
        self._remove_file(self._path(META, "failed", f"{unit.id}.json"))
        return rows

    def record_failure(self, unit: WorkUnit | Shard, reason: str) -> None:
        """Record that a unit failed, or a whole shard (one whose footer could not be read, so it has no units).

        Any failure record keeps `finish` from writing `_SUCCESS`.
        """
        if isinstance(unit, Shard):
            record = {"id": _shard_failure_id(unit), "relative": unit.relative}
        else:
            record = _unit_record(unit)
        record.update(reason=reason[:2000], failed_at=_now())
        self._put_json(self._path(META, "failed", f"{record['id']}.json"), record)

    def finish(self, report: dict) -> bool:
        """Write the report, and `_SUCCESS` iff every planned unit committed and nothing failed.

        Returns whether it did. A `_SUCCESS` from an earlier run is removed when this one is incomplete.
        """
        manifest = self._read_manifest()
        if manifest is None:
            raise OutputError(f"{self.url}: no manifest; prepare() the output location first")
        committed = self.committed_units()
        done = all(u["id"] in committed for u in manifest["units"]) and not self.failed_units()
        self.write_report({**report, "success": done})
        if done:
            self._put_bytes(self._path(SUCCESS), b"")
        else:
            self._remove_file(self._path(SUCCESS))
        return done

    def write_report(self, report: dict) -> None:
        """The report holds the settings, model URI included: its credentials are masked as in the manifest."""
        self._put_json(self._path(META, "report.json"), _redacted(report))

    # --- prepare's checks ----------------------------------------------------------------------------

    def _refuse_writing_over_inputs(self, units: Sequence[WorkUnit]) -> None:
        inputs = {unit.shard.path for unit in units}
        for unit in units:
            if self._path(unit.output_relative) in inputs:
                raise OutputError(f"{self.url}: the output for {unit.shard.relative} would be written over an "
                                  "input file; choose an --output outside the input")

    def _refuse_foreign_files(self, plan: list[dict]) -> None:
        existing = set(self._find(self.root))
        clashes = [u["output"] for u in plan if self._path(u["output"]) in existing]
        if clashes:
            raise OutputError(f"{self.url} already holds {len(clashes)} file(s) at the names this run writes "
                              f"(e.g. {clashes[0]}) and no lakesum manifest; pass --overwrite to replace them, "
                              "or choose another --output")

    def _check_same_settings(self, old: dict, new: dict) -> None:
        differences = [f"{key}: {_short(old.get(key, '(unset)'))} -> {_short(new.get(key, '(unset)'))}"
                       for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
        if differences:
            raise OutputError(f"{self.url} was written with other settings ({'; '.join(differences)}); pass "
                              "--overwrite to replace its output, or choose another --output")

    def _resumable_plan(self, old: list[dict], new: list[dict], partial: bool) -> list[dict]:
        """The new plan, if it keeps every earlier unit unchanged (new input files may have been added).

        With `partial` (a partition filter chose part of the input), earlier units of files outside the
        selection stay in the plan as they are; files inside it must still be unchanged.
        """
        new_by_id = {u["id"]: u for u in new}
        selected = {u["relative"] for u in new}
        kept = [u for u in old if partial and u["relative"] not in selected]
        changed = [u for u in old if new_by_id.get(u["id"]) != u and u not in kept]
        if changed:
            u = changed[0]
            raise OutputError(
                f"{self.url}: the input changed since this output was written: {len(changed)} unit(s) of the "
                f"earlier run are gone or changed (e.g. {u['relative']}, row groups {u['start']}-{u['stop']}, "
                f"{u['num_rows']} rows), and their output would be left stale; pass --overwrite to replace "
                "the output, or choose another --output")
        return kept + new  # kept: earlier partitions outside this run's selection

    def _delete_previous(self, old: dict) -> None:
        """Delete what the old manifest names, markers first, the manifest last (it lists the outputs)."""
        self._remove_file(self._path(SUCCESS))
        manifest = self._path(META, "manifest.json")
        ours = [p for p in self._find(self._path(META)) if p != manifest]
        self._remove_files(ours)
        if self.local:
            _remove_empty_folders(ours, self._path(META))
        outputs = {self._path(_checked_relative(u["output"], self.url)) for u in old["units"]}
        deleted = [p for p in self._find(self.root) if p in outputs]
        self._remove_files(deleted)
        if self.local:
            _remove_empty_folders(deleted, self.root)

    def _remove_meta(self) -> None:
        """Clear `_lakesum/` and `_SUCCESS` when there is no manifest: markers without one mean nothing."""
        self._remove_file(self._path(SUCCESS))
        self._remove_tree(self._path(META))

    def _remove_stale_success(self, plan: list[dict]) -> None:
        committed = self.committed_units()
        if not all(u["id"] in committed for u in plan):
            self._remove_file(self._path(SUCCESS))

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
            self._sync(f)
        return rows

    def _read_manifest(self) -> dict | None:
        path = self._path(META, "manifest.json")
        try:
            manifest = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise OutputError(f"{self.url}: {META}/manifest.json is unreadable ({e}); pass --overwrite to "
                              "replace the output") from None
        if not isinstance(manifest, dict) or manifest.get("lakesum") != MANIFEST_VERSION:
            raise OutputError(f"{self.url}: {META}/manifest.json is not a lakesum manifest of version "
                              f"{MANIFEST_VERSION}; pass --overwrite to replace the output")
        return manifest

    def _read_records(self, folder: str) -> dict[str, dict]:
        self.fs.invalidate_cache(folder)  # other processes (replicas) write here
        try:
            names = [p for p in self.fs.ls(folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return {}
        if not names:
            return {}
        records = {}
        for path, data in self.fs.cat(names, on_error="omit").items():
            try:
                records[posixpath.basename(path)[:-len(".json")]] = json.loads(data)
            except ValueError:
                # written atomically, so only a torn local write after a power loss looks like this; the
                # unit then counts as not committed and is done again, which is always safe
                continue
        return records

    def _put_json(self, path: str, obj: dict) -> None:
        self._put_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def _put_bytes(self, path: str, data: bytes) -> None:
        if not self.local:
            self.fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all
            return
        self._makedirs_for(path)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"  # not *.json, so never read as a record
        with self.fs.open(temporary, "wb") as f:
            f.write(data)
            self._sync(f)
        self.fs.mv(temporary, path)

    def _sync(self, f) -> None:
        """On local disks, flush to the device before the rename, so a power loss cannot publish a torn file."""
        if self.local:
            f.flush()
            os.fsync(f.fileno())

    def _makedirs_for(self, path: str) -> None:
        if self.local:  # object stores have no folders; creating one on s3 would create a bucket
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)

    def _find(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)
        try:
            return self.fs.find(path)
        except FileNotFoundError:
            return []

    def _remove_file(self, path: str, quietly: bool = False) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        except OSError:
            if not quietly:
                raise

    def _remove_files(self, paths: list[str]) -> None:
        if paths:
            self.fs.rm(paths)

    def _remove_tree(self, path: str) -> None:
        self.fs.invalidate_cache(path)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass


def _unit_record(unit: WorkUnit) -> dict:
    return {"id": unit.id, "relative": unit.shard.relative, "start": unit.start, "stop": unit.stop,
            "num_rows": unit.num_rows, "output": unit.output_relative}


def _shard_failure_id(shard: Shard) -> str:
    return "shard-" + hashlib.sha256(shard.relative.encode()).hexdigest()[:24]


def _checked_relative(relative: str, url: str) -> str:
    """An output name from a manifest, refused if it points outside the output (a tampered manifest)."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or ".." in parts or parts[0] in (META, SUCCESS):
        raise OutputError(f"{url}: {META}/manifest.json names {relative!r} as an output, outside the output "
                          "location; refusing to delete it")
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


def _json_round_trip(value):
    """As it reads back from the manifest (tuples become lists), so that equal settings compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
