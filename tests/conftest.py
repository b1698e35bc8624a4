"""Shared fixtures: a sentencepiece model, random mT5 checkpoints and an S3 API on loopback, built once."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from synthetic.checkpoints import MT5_SMALL, TINY, TINY_RELU_TIED, build_checkpoint
from synthetic.spiece import build_spiece_model

# The driver caches checkpoint hashes in the user's cache directory (pipeline/checkpoint_hash.py); tests and the jobs
# they start keep theirs in a folder of their own, never in the home of whoever runs them.
os.environ["LAKESUM_CACHE"] = tempfile.mkdtemp(prefix="lakesum-test-cache-")


@pytest.fixture(scope="session")
def spiece_model(tmp_path_factory):
    return build_spiece_model(tmp_path_factory.mktemp("spiece"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, spiece_model):
    """gated-gelu, untied lm_head (as real mT5), 3 encoder and 2 decoder layers, d_model != heads * d_kv."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny"), TINY, spiece_model)


@pytest.fixture(scope="session")
def tiny_relu_tied_checkpoint(tmp_path_factory, spiece_model):
    """The original T5 variant: relu feed-forward and an lm_head tied to the embedding."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-relu-tied"), TINY_RELU_TIED, spiece_model)


@pytest.fixture(scope="module", params=["tiny_checkpoint", "tiny_relu_tied_checkpoint"])
def each_tiny_checkpoint(request):
    """Each tiny checkpoint in turn: the test runs once with the mT5 variant and once with the T5 one."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory, spiece_model):
    """mt5-small's shape: d_model 512, d_ff 1024, 8+8 layers, 6 heads, vocab 250,112 (1.2 GB in float32)."""
    return build_checkpoint(tmp_path_factory.mktemp("mt5-small"), MT5_SMALL, spiece_model)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1 for the s3:// tests."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is needed for the s3:// tests")
    pytest.importorskip("s3fs", reason="s3fs is needed for the s3:// tests")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def torch_imported_by():
    """Runs Python code in a fresh process at the repository root (where `model`, `pipeline` and `jobs` import) and
    returns the torch modules it imported: for the paths that must not pay for torch."""

    def run(code: str, *argv: str) -> list[str]:
        child = code + "\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
        ran = subprocess.run(
            [sys.executable, "-c", child, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert ran.returncode == 0, ran.stderr[-2000:]
        return ast.literal_eval(ran.stdout.strip().splitlines()[-1])

    return run


def pytest_report_header(config):
    """Every test log names the CPU, its SIMD flags and the versions that ran: results differ by CPU kind."""
    from tests.environment import describe

    return describe()


def pytest_runtest_logreport(report):
    """Print a failure the moment it happens, not only in the summary at the end: a test that takes this
    process down with it (a Ray driver whose raylet dies exits at once) would otherwise leave CI's log with
    an `F` and no word of what failed."""
    if not report.failed:
        return
    import sys

    lines = report.longreprtext.splitlines()
    sys.stdout.write(f"\nFAILED {report.nodeid} ({report.when})\n" + "\n".join(lines[-80:]) + "\n")
    sys.stdout.flush()


EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's teardown, once pytest has reported everything. This process starts
    and shuts down a local Ray for each module that uses one; a Ray background thread left from an
    earlier session can run into freed core-worker state during teardown (ray-project/ray#31145: a segfault in
    a Ray gRPC thread after every test passed), which turns a green run red."""
    if EXIT_STATUS not in config.stash:
        return  # pytest stopped before the session ran (usage error, --help): exit as usual
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[EXIT_STATUS])
