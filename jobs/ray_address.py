"""Which Ray a job joins: RAY_ADDRESS (`ray job submit` sets it), else the cluster `ray start` runs on
this machine, else a local Ray of the job's own. The job owns Ray's lifecycle: it joins in joined_ray() and
leaves at its end; library functions take what they need and never call ray.init().

ray.init() with no address joins the cluster recorded in Ray's temp folder (`ray_current_cluster`)
even when that cluster is gone (a crashed head, a container restarted with the folder kept): it then
retries for minutes before failing. The job checks the record first and starts a local Ray instead.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

REACHABLE_WITHIN_SECONDS = 2.0
# A SIGKILLed process is reaped within this; Ray bounds its own reaping the same way (a process in D state).
REAPED_WITHIN_SECONDS = 1.0


def recorded_cluster() -> Path:
    """Where `ray start` records its head's address (Ray's temp folder: RAY_TMPDIR, else the system's)."""
    return Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"


def ray_address() -> str | None:
    """The `address` for ray.init(): RAY_ADDRESS when set; None (join the recorded cluster) when the
    recorded head answers; "local" (start one) when nothing is recorded or the record is stale."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    record = recorded_cluster()
    try:
        host, _, port = record.read_text().strip().rpartition(":")
        with socket.create_connection((host, int(port)), timeout=REACHABLE_WITHIN_SECONDS):
            return None
    except FileNotFoundError:
        return "local"
    except (OSError, ValueError):
        print(
            f"note: the Ray cluster recorded in {record} does not answer; starting a local Ray "
            "(set RAY_ADDRESS to join a cluster)",
            file=sys.stderr,
        )
        return "local"


@contextmanager
def joined_ray():
    """Ray joined at ray_address() for the block, and shut down after it, whatever ends it."""
    import ray

    address = ray_address()
    # A Ray of the job's own lives only as long as the job, so its dashboard would show one run that the job's
    # log already reports, and it costs about 2.5 s of start-up (4.3 s against 6.9 s here). Metrics are still
    # exported (Ray's metrics agent runs without it). For a dashboard, `ray start --head` and join that.
    ray.init(address=address, logging_level="warning", **({"include_dashboard": False} if address == "local" else {}))
    try:
        yield
    finally:
        if address == "local":
            stop_autoscaler_monitor()
        ray.shutdown()


def stop_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of the Ray this process started, before ray.shutdown() stops the rest.

    ray.shutdown() stops the GCS first and then sends the monitor SIGTERM; the monitor's handler reports its
    "failure" to the GCS that is gone and waits, so Ray gives it a second before SIGKILL. Every local job paid
    that second at exit. A monitor of a local Ray scales nothing, so nothing is lost. Ray's node object is
    private: if it changes, the job simply pays the second again."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    for info in getattr(node, "all_processes", {}).get("monitor", ()):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(timeout=REAPED_WITHIN_SECONDS)
