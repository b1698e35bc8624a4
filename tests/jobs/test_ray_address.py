"""A job joins RAY_ADDRESS, or the live cluster recorded on this machine, or starts its own Ray: never a
stale record (ray.init() would retry it for minutes)."""

from __future__ import annotations

import socket

import pytest

from jobs.ray_address import joined_ray, ray_address, recorded_cluster


@pytest.fixture
def ray_tmpdir(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_address_from_the_environment_wins(ray_tmpdir, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_address() == "ray://head:10001"


def test_nothing_recorded_starts_a_local_ray(ray_tmpdir):
    assert not recorded_cluster().exists()
    assert ray_address() == "local"


def test_a_live_recorded_cluster_is_joined(ray_tmpdir):
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        recorded_cluster().write_text(f"127.0.0.1:{head.getsockname()[1]}")
        assert ray_address() is None  # ray.init() finds the record itself


def test_a_stale_record_starts_a_local_ray_and_says_so(ray_tmpdir, capsys):
    recorded_cluster().write_text(f"127.0.0.1:{free_port()}")
    assert ray_address() == "local"
    assert "does not answer" in capsys.readouterr().err


@pytest.mark.parametrize(("address", "dashboard"), [("local", False), ("ray://head:10001", None)])
def test_only_a_ray_of_the_jobs_own_starts_without_a_dashboard(ray_tmpdir, monkeypatch, address, dashboard):
    import ray

    calls = []
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(ray, "init", lambda **options: calls.append(options))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with joined_ray():
        pass
    assert calls[0]["address"] == address
    assert calls[0].get("include_dashboard") is dashboard


def test_a_ray_of_the_jobs_own_loses_its_autoscaler_monitor_before_the_rest(monkeypatch):
    """ray.shutdown() stops the GCS and then the monitor, whose SIGTERM handler waits a second on the GCS that is
    gone: every local job paid that second at exit. The job kills the monitor first."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "local")
    shutdown = ray.shutdown
    monitors, alive_at_shutdown = [], []

    def recording_shutdown():
        alive_at_shutdown.extend(m.process.poll() is None for m in monitors)
        shutdown()

    monkeypatch.setattr(ray, "shutdown", recording_shutdown)
    with joined_ray():
        monitors.extend(ray._private.worker._global_node.all_processes["monitor"])
        assert all(m.process.poll() is None for m in monitors)
    assert alive_at_shutdown == [False] * len(monitors) and monitors
