"""The manifest's model hash, cached by the checkpoint files' stat: the value of hashing every byte, read from the
cache only for files unchanged since, and a cache that is corrupt or cannot be written never an error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from pipeline import checkpoint_hash
from pipeline.driver import model_fingerprint


def hash_of_every_byte(directory: Path) -> str:
    """The model hash as model_fingerprint computed it before the cache: what every manifest written so far holds."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors", ".model")):
            digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()[:32]


@pytest.fixture
def model(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "model")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The cache file under $XDG_CACHE_HOME; the copied checkpoint counts as settled (its files were written just now,
    see checkpoint_hash.STAT_SETTLE_NS)."""
    monkeypatch.delenv("LAKESUM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(checkpoint_hash, "STAT_SETTLE_NS", 0)
    return tmp_path / "xdg" / "lakesum" / checkpoint_hash.CACHE_NAME


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The directories whose bytes are read and hashed, one entry a time."""
    calls = []
    digest = checkpoint_hash._digest

    def counted(directory, files):
        calls.append(directory)
        return digest(directory, files)

    monkeypatch.setattr(checkpoint_hash, "_digest", counted)
    return calls


def test_the_hash_is_the_one_of_every_byte_and_a_second_run_reads_no_checkpoint_byte(model, cache, hashed):
    expected = hash_of_every_byte(model)
    assert model_fingerprint(str(model))["model_hash"] == expected and len(hashed) == 1
    assert json.loads(cache.read_text())["entries"][str(model.resolve())]["hash"] == expected
    assert model_fingerprint(str(model))["model_hash"] == expected and len(hashed) == 1  # from the cache
    cache.unlink()
    assert model_fingerprint(str(model))["model_hash"] == expected and len(hashed) == 2  # without it: read again


@pytest.mark.parametrize("mtime", ["new", "put back"])
def test_a_file_rewritten_in_place_with_the_same_size_gets_a_new_hash(model, cache, hashed, mtime):
    """One byte deep inside the weights (in no header) flipped in place: the size is the same, and with "put back"
    the mtime too (as cp -p or rsync -t would leave it); the write changed the ctime all the same."""
    before = model_fingerprint(str(model))["model_hash"]
    weights = model / "model.safetensors"
    old = weights.stat()
    time.sleep(0.05)  # past the filesystem clock's tick (milliseconds): the write's ctime is a later one
    middle = old.st_size // 2
    with open(weights, "r+b") as f:
        f.seek(middle)
        byte = f.read(1)[0]
        f.seek(middle)
        f.write(bytes([byte ^ 1]))
    if mtime == "put back":
        os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = weights.stat()
    assert new.st_size == old.st_size and new.st_ctime_ns != old.st_ctime_ns
    assert (new.st_mtime_ns == old.st_mtime_ns) == (mtime == "put back")

    after = model_fingerprint(str(model))["model_hash"]
    assert after == hash_of_every_byte(model) != before and len(hashed) == 2


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe not UTF-8",
        b"[]",
        json.dumps({"version": 0, "entries": {}}).encode(),
        json.dumps({"version": checkpoint_hash.VERSION, "entries": []}).encode(),
        "the entry of the model, its hash not one",
    ],
)
def test_a_corrupt_cache_is_ignored_and_replaced(model, cache, hashed, content):
    expected = hash_of_every_byte(model)
    if isinstance(content, str):  # the right files, a hash that cannot be one
        model_fingerprint(str(model))
        data = json.loads(cache.read_text())
        data["entries"][str(model.resolve())]["hash"] = "not a hash"
        content = json.dumps(data).encode()
        hashed.clear()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(content)
    assert model_fingerprint(str(model))["model_hash"] == expected and len(hashed) == 1
    assert model_fingerprint(str(model))["model_hash"] == expected and len(hashed) == 1  # the cache written anew


def test_a_cache_that_cannot_be_written_means_hashing_again(model, tmp_path, monkeypatch, hashed):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LAKESUM_CACHE", str(tmp_path / "a-file"))  # its folder cannot be made
    monkeypatch.setattr(checkpoint_hash, "STAT_SETTLE_NS", 0)
    for calls in (1, 2):
        assert model_fingerprint(str(model))["model_hash"] == hash_of_every_byte(model) and len(hashed) == calls


def test_files_changed_just_before_hashing_are_not_cached(model, cache, hashed, monkeypatch):
    """A file written within STAT_SETTLE_NS of its hashing could be rewritten within the same tick of the
    filesystem's clock, its stat unchanged: its hash is not cached, and the next run reads it again."""
    monkeypatch.setattr(checkpoint_hash, "STAT_SETTLE_NS", 3600 * 10**9)  # the copy was made less than an hour ago
    for calls in (1, 2):
        assert model_fingerprint(str(model))["model_hash"] == hash_of_every_byte(model) and len(hashed) == calls
    assert not cache.exists()
