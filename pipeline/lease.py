"""One writer per output: a lease file, `_lakesum/lease.json`, taken by a conditional create and renewed by
heartbeat.

A run takes the lease before it touches the output and gives it back when it ends. The create is
conditional where the store offers it: a hard link on local disks (fails if the name exists), S3's
`If-None-Match: *` and GCS's generation match through fsspec's `mode="create"`. A second run meets the
lease and is refused, naming the holder and the age of its last heartbeat. A lease with no heartbeat for
its holder's stated timeout belongs to a run that died (SIGKILL, a lost node): it is taken over, with a note.

Each lease has a generation, one more than the last. Units are published only while the lease in the store
still has their run's generation, and a holder that finds another generation there stops. Taking over
is delete-then-create: two runs taking over one dead lease at the same instant can both start; the one
whose lease was replaced finds out at its next heartbeat (a sixth of the timeout) and stops, and units it
publishes meanwhile are the same deterministic files the other run writes.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
from datetime import datetime, timezone

from model.storage import is_local, write_aside, write_atomically

from .errors import OutputError

LEASE = "lease.json"
# A lease whose heartbeat is older than this belongs to a dead run; the holder renews it six times as often.
DEFAULT_TIMEOUT = 300.0


class LeaseHeld(OutputError):
    """Another run holds the output's lease."""


class LeaseLost(OutputError):
    """This run's lease was taken over (it went without a heartbeat for too long): it must stop writing."""


class Lease:
    def __init__(self, fs, folder: str, url: str, timeout: float = DEFAULT_TIMEOUT):
        if timeout <= 0:
            raise ValueError(f"--lease-timeout must be > 0 seconds, got {timeout}")
        self.fs, self.path, self.url, self.timeout = fs, posixpath.join(folder, LEASE), url, timeout
        self.local = is_local(fs)
        self.generation: int | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking and giving back -------------------------------------------------------------------------

    def acquire(self, last_generation: int = 0, note=lambda text: None) -> int:
        """Take the lease, or raise LeaseHeld. Returns this run's generation."""
        current = self.read()
        if current is not None:
            age = time.time() - current.get("heartbeat_unix", 0)
            if age < current.get("timeout_seconds", self.timeout):
                raise LeaseHeld(
                    f"{self.url} is being written by another run ({current.get('holder', '?')}, generation "
                    f"{current.get('generation', '?')}, started {current.get('started_at', '?')}, last heartbeat "
                    f"{age:.0f} s ago); wait for it to end, or, if it died, for its lease to lapse "
                    f"{current.get('timeout_seconds', self.timeout):.0f} s after its last heartbeat"
                )
            if self.read() != current:  # renewed or taken over between our two reads: not ours to take
                raise LeaseHeld(f"{self.url}: another run took the lease at the same moment; try again")
            self._remove()
            note(
                f"took over the lease of {current.get('holder', '?')} (generation {current.get('generation')}), "
                f"silent for {age:.0f} s"
            )
            last_generation = max(last_generation, int(current.get("generation", 0)))
        self.generation = last_generation + 1
        self._started = _now()
        if not self._create(self._record()):
            raise LeaseHeld(f"{self.url}: another run took the lease at the same moment; try again")
        return self.generation

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation is not None and not self.lost.is_set() and self._ours():
            self._remove()

    # --- while it runs -----------------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLost unless the store's lease is still this generation's (before every publish)."""
        if self.lost.is_set() or not self._ours():
            self.lost.set()
            current = self.read() or {}
            raise LeaseLost(
                f"{self.url}: this run (generation {self.generation}) lost its lease to "
                f"{current.get('holder', 'nobody')} (generation {current.get('generation', '-')}); "
                "it stopped without publishing more"
            )

    def _beat(self) -> None:
        interval = max(self.timeout / 6, 0.2)
        while not self._stop.wait(interval):
            try:
                if not self._ours():
                    self.lost.set()
                    return
                self._write(self._record())
            except OSError:
                continue  # a storage hiccup: the next beat tries again, well within the timeout

    def _ours(self) -> bool:
        current = self.read()
        return current is not None and current.get("generation") == self.generation

    # --- the file ----------------------------------------------------------------------------------------

    def read(self) -> dict | None:
        try:
            self.fs.invalidate_cache(posixpath.dirname(self.path))
            record = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            # torn or foreign: treat it as a lease last renewed when the file was written
            return {"holder": "an unreadable lease file", "heartbeat_unix": _modified(self.fs, self.path)}
        return record if isinstance(record, dict) else {"holder": "an unreadable lease file"}

    def _record(self) -> dict:
        return {
            "generation": self.generation,
            "holder": f"{socket.gethostname()} pid {os.getpid()}",
            "started_at": self._started,
            "heartbeat_at": _now(),
            "heartbeat_unix": time.time(),
            "timeout_seconds": self.timeout,
        }

    def _create(self, record: dict) -> bool:
        """Write the lease only if there is none; False if another run's appeared first."""
        data = json.dumps(record, indent=1).encode()
        if self.local:
            os.makedirs(posixpath.dirname(self.path), exist_ok=True)
            temporary = write_aside(self.path, data)
            try:
                os.link(temporary, self.path)  # fails if the name exists: the create and the content are one step
            except FileExistsError:
                return False
            finally:
                os.unlink(temporary)
            return True
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as e:  # S3 answers a lost If-None-Match race with 412 Precondition Failed
            if "412" in str(e) or "PreconditionFailed" in str(e):
                return False
            raise
        return True

    def _write(self, record: dict) -> None:
        write_atomically(self.fs, self.path, [json.dumps(record, indent=1).encode()])

    def _remove(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


def _modified(fs, path: str) -> float:
    try:
        info = fs.info(path)
    except OSError:
        return 0.0
    modified = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    if isinstance(modified, datetime):
        return modified.timestamp()
    try:
        return float(modified)
    except (TypeError, ValueError):
        return 0.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
