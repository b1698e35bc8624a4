"""Checkpoint sources and safetensors I/O against real files: local, memory://, s3:// on moto, the HF cache."""

import hashlib
import json
import logging
import os
import pickle
import struct
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint import (
    load_tensors,
    read_json,
    resolve_checkpoint,
    save_tensors,
    tensor_shapes,
    weight_files,
)
from model.errors import ModelLoadError

SECRET = "hunter2-do-not-log"


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "shared.weight": torch.randn(16, 8, generator=generator),
        "encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(8, 8, generator=generator),
        "encoder.final_layer_norm.weight": torch.rand(8, generator=generator),
        "decoder.block.0.layer.1.EncDecAttention.o.weight": torch.randn(8, 8, generator=generator).to(torch.bfloat16),
        "position_ids": torch.arange(12),
    }


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file(_tensors(), directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"d_model": 8, "model_type": "mt5"}))
    (directory / "spiece.model").write_bytes(b"sentencepiece model bytes")
    return directory


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


# ---------------------------------------------------------------------------------------------------------------
# resolve_checkpoint: local


def test_local_directory_resolves_to_itself(checkpoint):
    assert resolve_checkpoint(checkpoint) == checkpoint
    assert resolve_checkpoint(str(checkpoint)) == checkpoint


def test_file_uri_resolves_to_the_local_directory(checkpoint):
    assert resolve_checkpoint(checkpoint.as_uri()) == checkpoint


@pytest.mark.parametrize("source", ["/no/such/checkpoint", "./no-such-checkpoint", "~/no-such-lakesum-checkpoint"])
def test_missing_local_path_is_an_error_naming_it(source):
    with pytest.raises(ModelLoadError, match="does not exist") as error:
        resolve_checkpoint(source)
    assert source in str(error.value)


def test_revision_for_a_local_directory_is_refused_not_ignored(checkpoint):
    with pytest.raises(ModelLoadError, match="revisions apply to hub ids only"):
        resolve_checkpoint(checkpoint, revision="v2")


# ---------------------------------------------------------------------------------------------------------------
# resolve_checkpoint: fsspec URIs


@pytest.fixture
def memory_checkpoint(checkpoint):
    """The checkpoint's files in fsspec's in-memory filesystem, plus files that must not be copied."""
    fs = fsspec.filesystem("memory")
    top = f"/lakesum-test-{uuid.uuid4().hex}"
    root = f"{top}/ckpt"
    for path in checkpoint.iterdir():
        fs.pipe(f"{root}/{path.name}", path.read_bytes())
    fs.pipe(f"{root}/optimizer.pt", b"optimizer state")
    fs.pipe(f"{root}/pytorch_model.bin", b"a pickle we never want")
    yield fs, root
    fs.rm(top, recursive=True)


def test_memory_uri_copies_exactly_the_checkpoint_files(memory_checkpoint, checkpoint, tmp_path):
    fs, root = memory_checkpoint
    local = resolve_checkpoint(f"memory://{root}", cache_dir=tmp_path / "cache")

    copied = {path.name for path in local.iterdir() if not path.name.startswith(".")}
    assert copied == {"config.json", "model.safetensors", "spiece.model"}
    for name in copied:
        assert (local / name).read_bytes() == (checkpoint / name).read_bytes()
    _assert_same_tensors(dict(load_tensors(local)), _tensors())


def test_default_cache_is_under_lakesum_cache_keyed_by_uri_hash(memory_checkpoint, tmp_path, monkeypatch):
    fs, root = memory_checkpoint
    monkeypatch.setenv("LAKESUM_CACHE", str(tmp_path / "lakesum"))
    uri = f"memory://{root}"
    expected = tmp_path / "lakesum" / "checkpoints" / hashlib.sha256(uri.encode()).hexdigest()
    assert resolve_checkpoint(uri) == expected


def test_second_resolve_uses_the_cache_without_copying(memory_checkpoint, tmp_path):
    fs, root = memory_checkpoint
    local = resolve_checkpoint(f"memory://{root}", cache_dir=tmp_path / "cache")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in local.iterdir() if not p.name.startswith(".")}

    assert resolve_checkpoint(f"memory://{root}", cache_dir=tmp_path / "cache") == local
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in local.iterdir() if not p.name.startswith(".")}
    # a copy is renamed into place, which gives a new inode: same inodes mean nothing was copied
    assert after == before


def test_changed_remote_file_replaces_the_cached_copy(memory_checkpoint, tmp_path):
    fs, root = memory_checkpoint
    cache = tmp_path / "cache"
    local = resolve_checkpoint(f"memory://{root}", cache_dir=cache)
    weights_inode = (local / "model.safetensors").stat().st_ino

    fs.pipe(f"{root}/config.json", json.dumps({"d_model": 16, "model_type": "mt5"}).encode())
    resolve_checkpoint(f"memory://{root}", cache_dir=cache)

    assert read_json(local, "config.json", required=True)["d_model"] == 16
    assert (local / "model.safetensors").stat().st_ino == weights_inode  # unchanged files stay


def test_resharded_remote_checkpoint_leaves_no_stale_weights_in_the_cache(memory_checkpoint, tmp_path):
    fs, root = memory_checkpoint
    cache = tmp_path / "cache"
    resolve_checkpoint(f"memory://{root}", cache_dir=cache)

    sharded = tmp_path / "sharded"
    save_tensors(_tensors(), sharded, max_shard_bytes=600)
    fs.rm(f"{root}/model.safetensors")
    for path in sharded.iterdir():
        fs.pipe(f"{root}/{path.name}", path.read_bytes())
    local = resolve_checkpoint(f"memory://{root}", cache_dir=cache)

    assert not (local / "model.safetensors").exists()
    assert [p.name for p in weight_files(local)] == [p.name for p in weight_files(sharded)]
    _assert_same_tensors(dict(load_tensors(local)), _tensors())


def test_truncated_cached_copy_and_orphaned_partial_file_are_repaired(memory_checkpoint, checkpoint, tmp_path):
    """What a killed copy can leave behind: a half-written temporary, or (copied by hand) a short file."""
    fs, root = memory_checkpoint
    local = resolve_checkpoint(f"memory://{root}", cache_dir=tmp_path / "cache")
    weights = local / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    orphan = local / f".model.safetensors.{uuid.uuid4().hex}.partial"
    orphan.write_bytes(b"half a file")

    resolve_checkpoint(f"memory://{root}", cache_dir=tmp_path / "cache")

    assert weights.read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert not orphan.exists()


def test_missing_remote_directory_is_an_error_naming_the_uri(tmp_path):
    uri = f"memory:///lakesum-test-{uuid.uuid4().hex}/nothing-here"
    with pytest.raises(ModelLoadError, match="does not exist") as error:
        resolve_checkpoint(uri, cache_dir=tmp_path / "cache")
    assert uri in str(error.value)
    assert not (tmp_path / "cache").exists()  # no empty cache entry for a URI that led nowhere


def test_uri_with_an_unknown_protocol_is_an_error_naming_it(tmp_path):
    with pytest.raises(ModelLoadError, match="nosuchfs://bucket/ckpt"):
        resolve_checkpoint("nosuchfs://bucket/ckpt", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "uri",
    [f"memory://user:{SECRET}@nowhere/ckpt", f"memory:///nowhere/ckpt?token={SECRET}"],
    ids=["userinfo", "query"],
)
def test_credentials_in_a_uri_never_reach_errors_or_logs(uri, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="model.checkpoint"), pytest.raises(ModelLoadError) as error:
        resolve_checkpoint(uri, cache_dir=tmp_path / "cache")
    assert SECRET not in str(error.value)
    assert "***" in str(error.value)
    assert error.value.__cause__ is None  # a chained exception could quote the URI
    assert SECRET not in caplog.text
    assert all(SECRET not in p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------------------
# resolve_checkpoint: s3:// against a real S3 API (moto) on loopback


@pytest.fixture
def s3_checkpoint(s3_endpoint, checkpoint, monkeypatch):
    import s3fs

    # keep botocore away from any real AWS configuration on this machine
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    # the region comes from the environment: given in client_kwargs, s3fs would send it as a LocationConstraint,
    # which S3 (and moto) reject for us-east-1
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {
        "key": "lakesum-test",
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": s3_endpoint},
    }
    fs = s3fs.S3FileSystem(**options)
    bucket = f"lakesum-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    for path in checkpoint.iterdir():
        fs.pipe(f"{bucket}/models/mt5/{path.name}", path.read_bytes())
    return fs, f"s3://{bucket}/models/mt5", options


def test_s3_uri_copies_the_checkpoint_from_an_object_store(s3_checkpoint, checkpoint, tmp_path, caplog):
    fs, uri, options = s3_checkpoint
    with caplog.at_level(logging.DEBUG, logger="model.checkpoint"):
        local = resolve_checkpoint(uri, cache_dir=tmp_path / "cache", storage_options=options)

    for path in checkpoint.iterdir():
        assert (local / path.name).read_bytes() == path.read_bytes()
    assert "copying model.safetensors" in caplog.text
    assert SECRET not in caplog.text
    assert SECRET not in (local / ".lakesum_source.json").read_text()


def test_s3_object_rewritten_with_the_same_size_is_copied_again(s3_checkpoint, tmp_path):
    """Size alone would miss this; the ETag does not."""
    fs, uri, options = s3_checkpoint
    local = resolve_checkpoint(uri, cache_dir=tmp_path / "cache", storage_options=options)
    old = (local / "spiece.model").read_bytes()
    new = old.upper()
    assert len(new) == len(old) and new != old

    fs.pipe(f"{uri}/spiece.model", new)
    resolve_checkpoint(uri, cache_dir=tmp_path / "cache", storage_options=options)

    assert (local / "spiece.model").read_bytes() == new


def test_s3_missing_prefix_error_does_not_leak_storage_options(s3_checkpoint, tmp_path):
    fs, uri, options = s3_checkpoint
    with pytest.raises(ModelLoadError) as error:
        resolve_checkpoint(uri + "-missing", cache_dir=tmp_path / "cache", storage_options=options)
    assert uri + "-missing" in str(error.value)
    assert SECRET not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# resolve_checkpoint: hub ids (no network here: offline mode and a hand-made HF cache)


@pytest.fixture
def offline_hf_home(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME with HF_HUB_OFFLINE=1; returns its hub cache directory.

    huggingface_hub reads both variables once, at import, so the constants it derived from them are set as well.
    """
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


def test_hub_id_offline_and_not_cached_says_so_and_what_to_do(offline_hf_home):
    with pytest.raises(ModelLoadError) as error:
        resolve_checkpoint("google/mt5-small")
    message = str(error.value)
    assert "google/mt5-small" in message
    assert "not cached" in message
    assert str(offline_hf_home) in message
    assert "HF_HUB_OFFLINE" in message
    assert "local directory" in message


def test_hub_id_cached_in_hf_home_resolves_offline(offline_hf_home, checkpoint):
    # the layout huggingface_hub writes: refs/<branch> holds the commit, snapshots/<commit>/ holds the files
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hf_home / "models--lakesum-test--tiny-mt5"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in checkpoint.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())

    assert resolve_checkpoint("lakesum-test/tiny-mt5") == snapshot
    assert resolve_checkpoint("lakesum-test/tiny-mt5", revision=commit) == snapshot
    _assert_same_tensors(dict(load_tensors(snapshot)), _tensors())


def test_invalid_hub_id_that_is_no_directory_is_an_error(offline_hf_home):
    with pytest.raises(ModelLoadError, match="neither an existing local directory nor a valid hub id"):
        resolve_checkpoint("not/a/hub/id")


# ---------------------------------------------------------------------------------------------------------------
# read_json


def test_read_json_missing_required_file_names_it(checkpoint):
    with pytest.raises(ModelLoadError, match="generation_config.json is missing") as error:
        read_json(checkpoint, "generation_config.json", required=True)
    assert str(checkpoint / "generation_config.json") in str(error.value)


def test_read_json_missing_config_json_names_it(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        read_json(tmp_path, "config.json", required=True)


def test_read_json_missing_optional_file_is_none(checkpoint):
    assert read_json(checkpoint, "generation_config.json", required=False) is None


def test_read_json_invalid_json_names_the_file_and_line(checkpoint):
    (checkpoint / "config.json").write_text('{\n  "d_model": 8,\n}')
    with pytest.raises(ModelLoadError, match="not valid JSON") as error:
        read_json(checkpoint, "config.json", required=False)
    assert str(checkpoint / "config.json") in str(error.value)
    assert "line 3" in str(error.value)


def test_read_json_that_is_not_an_object_is_an_error(checkpoint):
    (checkpoint / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="must hold a JSON object"):
        read_json(checkpoint, "config.json", required=True)


# ---------------------------------------------------------------------------------------------------------------
# weight_files


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",))


def test_pickle_only_checkpoint_is_refused_with_the_convert_command_and_never_unpickled(tmp_path):
    directory = tmp_path / "bin-only"
    directory.mkdir()
    marker = tmp_path / "unpickled.marker"
    payload = pickle.dumps(_RunsCodeWhenUnpickled(marker))
    (directory / "pytorch_model.bin").write_bytes(payload)
    (directory / "config.json").write_text("{}")

    for load in (weight_files, tensor_shapes, lambda d: list(load_tensors(d))):
        with pytest.raises(ModelLoadError) as error:
            load(directory)
        message = str(error.value)
        assert "pytorch_model.bin" in message
        assert "safetensors only" in message
        assert f"save_pretrained('{directory}', safe_serialization=True)" in message
    assert not marker.exists()

    pickle.loads(payload)  # the payload is live: loading it would have run code
    assert marker.exists()


def test_directory_without_weights_lists_what_it_contains(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "spiece.model").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="holds no weights") as error:
        weight_files(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert "config.json, spiece.model" in str(error.value)


def test_shards_without_their_index_are_an_error(tmp_path):
    save_tensors(_tensors(), tmp_path, max_shard_bytes=600)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors.index.json"):
        weight_files(tmp_path)


def test_single_file_and_index_together_are_ambiguous(tmp_path):
    save_tensors(_tensors(), tmp_path, max_shard_bytes=600)
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="both model.safetensors and model.safetensors.index.json"):
        weight_files(tmp_path)


def test_missing_shard_listed_in_the_index_is_an_error_naming_the_shard(tmp_path):
    save_tensors(_tensors(), tmp_path, max_shard_bytes=600)
    missing = weight_files(tmp_path)[1]
    missing.unlink()
    with pytest.raises(ModelLoadError, match="is missing") as error:
        weight_files(tmp_path)
    assert missing.name in str(error.value)


@pytest.mark.parametrize(
    "index",
    [{"metadata": {}}, {"weight_map": {}}, {"weight_map": ["a"]}, {"weight_map": {"a": 3}}],
    ids=["no-weight-map", "empty", "list", "non-string-file"],
)
def test_malformed_index_weight_map_is_an_error(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="no well-formed weight_map"):
        weight_files(tmp_path)


def test_index_naming_a_shard_outside_the_directory_is_an_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(ModelLoadError, match="outside"):
        weight_files(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# reading safetensors


def test_tensor_shapes_come_from_the_headers(checkpoint):
    assert tensor_shapes(checkpoint) == {
        "shared.weight": ((16, 8), "F32"),
        "encoder.block.0.layer.0.SelfAttention.q.weight": ((8, 8), "F32"),
        "encoder.final_layer_norm.weight": ((8,), "F32"),
        "decoder.block.0.layer.1.EncDecAttention.o.weight": ((8, 8), "BF16"),
        "position_ids": ((12,), "I64"),
    }


def test_load_tensors_streams_every_tensor_unchanged(checkpoint):
    stream = load_tensors(checkpoint)
    assert iter(stream) is stream  # a generator: one tensor at a time, not a dict of all of them
    _assert_same_tensors(dict(stream), _tensors())


def test_load_tensors_converts_dtypes_chosen_per_name(checkpoint):
    def dtype_for(name: str, stored: torch.dtype) -> torch.dtype | None:
        if stored == torch.float32 and "layer_norm" not in name:
            return torch.bfloat16
        if stored == torch.bfloat16:
            return torch.float32
        return None

    loaded = dict(load_tensors(checkpoint, dtype_for=dtype_for))
    expected = _tensors()
    assert loaded["shared.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["shared.weight"], expected["shared.weight"].to(torch.bfloat16))
    assert loaded["encoder.final_layer_norm.weight"].dtype == torch.float32
    o = "decoder.block.0.layer.1.EncDecAttention.o.weight"
    assert loaded[o].dtype == torch.float32 and torch.equal(loaded[o], expected[o].float())
    assert torch.equal(loaded["position_ids"], expected["position_ids"])


@pytest.mark.parametrize("keep", ["4-bytes", "half-header", "all-but-10-bytes"])
def test_truncated_safetensors_is_an_error_naming_the_file(checkpoint, keep):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    header_size = struct.unpack("<Q", data[:8])[0]
    cut = {"4-bytes": 4, "half-header": 8 + header_size // 2, "all-but-10-bytes": len(data) - 10}[keep]
    path.write_bytes(data[:cut])

    for load in (tensor_shapes, lambda d: list(load_tensors(d))):
        with pytest.raises(ModelLoadError, match="not a valid safetensors file") as error:
            load(checkpoint)
        assert str(path) in str(error.value)


def test_safetensors_own_errors_become_errors_naming_the_file(tmp_path):
    # covered by the file, so our header check passes, but 8 bytes cannot hold four float32s
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ModelLoadError, match="could not be read as safetensors") as error:
        list(load_tensors(tmp_path))
    assert str(path) in str(error.value)


def test_tensor_in_two_shards_is_an_error(tmp_path):
    save_tensors(_tensors(), tmp_path, max_shard_bytes=600)
    first, second = weight_files(tmp_path)[:2]
    with safe_open(second, "pt") as handle:
        moved = {name: handle.get_tensor(name) for name in handle.keys()}
    with safe_open(first, "pt") as handle:
        name = next(iter(handle.keys()))
        moved[name] = handle.get_tensor(name)
    save_file(moved, second)
    with pytest.raises(ModelLoadError, match=f"'{name}' is in both"):
        tensor_shapes(tmp_path)


def test_index_that_disagrees_with_the_shards_is_an_error(tmp_path):
    save_tensors(_tensors(), tmp_path, max_shard_bytes=600)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["not.in.any.shard"] = weight_files(tmp_path)[0].name
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="'not.in.any.shard'"):
        list(load_tensors(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# writing safetensors


def test_small_save_is_one_file_with_transformers_format_metadata(tmp_path):
    files = save_tensors(_tensors(), tmp_path, metadata={"lakesum": "test"})
    assert files == [tmp_path / "model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with safe_open(files[0], "pt") as handle:
        assert handle.metadata() == {"format": "pt", "lakesum": "test"}
    _assert_same_tensors(dict(load_tensors(tmp_path)), _tensors())


def test_sharded_save_round_trips_exactly_in_transformers_layout(tmp_path):
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.utils.hub import get_checkpoint_shard_files

    tensors = {f"encoder.block.{i}.layer.0.SelfAttention.q.weight": torch.randn(32, 32) for i in range(5)}
    tensors["shared.weight"] = torch.randn(64, 32)  # 8 KiB: larger than a shard, so a shard of its own
    files = save_tensors(tensors, tmp_path, max_shard_bytes=10_000)

    assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert weight_files(tmp_path) == files
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert index_path.read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert index["metadata"] == {"total_size": 5 * 32 * 32 * 4 + 64 * 32 * 4}
    # the same split huggingface_hub computes for transformers' save_pretrained
    split = split_torch_state_dict_into_shards(
        tensors, max_shard_size=10_000, filename_pattern="model{suffix}.safetensors"
    )
    assert index["weight_map"] == split.tensor_to_filename

    # each shard holds exactly what the index says, bit for bit
    stored = {}
    for path in files:
        with safe_open(path, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for name in handle.keys():
                assert index["weight_map"][name] == path.name
                stored[name] = handle.get_tensor(name)
    _assert_same_tensors(stored, tensors)
    _assert_same_tensors(dict(load_tensors(tmp_path)), tensors)

    # and transformers' own index reader accepts it
    shard_files, sharded_metadata = get_checkpoint_shard_files(str(tmp_path), str(index_path))
    assert [Path(f) for f in shard_files] == files
    assert sorted(sharded_metadata["all_checkpoint_keys"]) == sorted(tensors)


def test_tied_and_non_contiguous_tensors_save_without_error(tmp_path):
    shared = torch.randn(10, 4)
    tensors = {
        "shared.weight": shared,
        "encoder.embed_tokens.weight": shared,
        "lm_head.weight": shared[:],
        "transposed": shared.t(),
    }
    save_tensors(tensors, tmp_path)
    _assert_same_tensors(dict(load_tensors(tmp_path)), {k: v.contiguous() for k, v in tensors.items()})


def test_resave_removes_stale_weight_files_and_keeps_everything_else(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_tensors(_tensors(), tmp_path, max_shard_bytes=600)
    orphan = tmp_path / f".model.safetensors.{uuid.uuid4().hex}.partial"
    orphan.write_bytes(b"left by a killed save")

    save_tensors({"x": torch.zeros(3)}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]

    save_tensors(_tensors(), tmp_path, max_shard_bytes=600)
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_tensors(dict(load_tensors(tmp_path)), _tensors())


def test_save_refuses_meta_tensors_and_non_string_metadata(tmp_path):
    with pytest.raises(ValueError, match="meta device"):
        save_tensors({"x": torch.empty(2, device="meta")}, tmp_path)
    with pytest.raises(ValueError, match="strings"):
        save_tensors({"x": torch.zeros(2)}, tmp_path, metadata={"step": 3})


def test_resolving_and_loading_a_tokenizer_never_imports_torch(tiny_checkpoint, torch_imported_by):
    """The tokenizer resolves its checkpoint through this module: the tokenize pool's workers and the driver's checks
    load it without paying for torch (about 1.5 s), which only the functions making or writing tensors import."""
    child = (
        "import sys\n"
        "import model.checkpoint, model.tokenizer\n"
        "from model import MT5Tokenizer\n"
        "assert MT5Tokenizer.from_pretrained(sys.argv[1])(['un café noir'])['input_ids']\n"
    )
    assert torch_imported_by(child, str(tiny_checkpoint)) == []
