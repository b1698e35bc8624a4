"""Where checkpoint files come from, and how safetensors weights are read and written.

This module knows files, not model structure: mapping HF key names onto our modules is another module's job.

    resolve_checkpoint(source)  local directory, fsspec URI (s3://, gs://, ...) or hub id -> a local directory
    weight_files(dir)           model.safetensors, or the shards named by model.safetensors.index.json
    read_json(dir, name)        config.json and friends, with errors that name the file
    tensor_shapes(dir)          names, shapes and dtypes from the headers alone, to validate before loading
    load_tensors(dir)           (name, tensor) one at a time from memory-mapped files
    save_tensors(tensors, dir)  model.safetensors, or shards plus an index in transformers' layout

Weights are safetensors only. Pickled checkpoints (pytorch_model.bin) can run arbitrary code when loaded, so they
are refused with the command that converts them, and never opened.

torch is imported only by the functions that make or write tensors: the tokenizer resolves its checkpoint here, and
a process that only tokenizes (the tokenize pool's workers, the driver's checks) never pays for importing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import url2pathname

import fsspec
import huggingface_hub
import safetensors
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .config import MT5Config
from .errors import ModelLoadError
from .storage import PARTIAL_SUFFIX, atomic_path, open_filesystem, redact_url, scrub, url_secrets

if TYPE_CHECKING:  # imported where tensors are made or written (see the module docstring)
    import torch

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
# Everything inference and fine-tuning read. Nothing else is copied: repos also hold .bin/.h5/.msgpack copies of
# the weights, several times the size of what we need.
CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    SAFE_INDEX_NAME,
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNSAFE_WEIGHT_PATTERNS = ("*.bin", "tf_model.h5", "flax_model.msgpack")
_MANIFEST_NAME = ".lakesum_source.json"
_LOCK_NAME = ".lakesum_lock"
# safetensors refuses headers above 100 MB; a larger length means the first 8 bytes are not a safetensors header.
_MAX_HEADER_BYTES = 100_000_000
# Keys that fsspec backends put in info() and that change when an object's content does: s3 ETag/LastModified,
# gcs md5Hash/generation, azure etag, local mtime, memory created. Size alone cannot tell two versions apart.
_IDENTITY_KEYS = (
    "ETag", "etag", "e_tag", "md5Hash", "crc32c", "checksum", "generation", "VersionId", "version_id",
    "mtime", "LastModified", "last_modified", "modified", "updated", "created",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Where the files come from


def resolve_checkpoint(
    source: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    storage_options: dict | None = None,
) -> Path:
    """Returns a local directory holding the checkpoint files named by `source`.

    - an existing local directory, or a file:// URI for one: the directory itself;
    - any other URI with "://" (s3://, gs://, memory://, ...): the checkpoint files are copied through fsspec, with
      `storage_options`, into `<cache_dir>/<sha256 of the URI>` (cache_dir defaults to $LAKESUM_CACHE/checkpoints,
      else ~/.cache/lakesum/checkpoints), so the weights can be memory-mapped. Unchanged files are not copied again;
    - anything else is a hub id (org/name): huggingface_hub.snapshot_download into HF's own cache (or `cache_dir`),
      at `revision`, honouring HF_HUB_OFFLINE.

    `storage_options` is only used for URIs, so a job may pass it whatever the source. `revision` only means
    something for hub ids and is refused elsewhere rather than silently ignored.
    """
    source = os.fspath(source)
    if source.startswith("file://"):
        return _local_directory(Path(url2pathname(urlsplit(source).path)), source, revision)
    if "://" in source:
        if revision is not None:
            raise ModelLoadError(
                f"revision={revision!r} was given for {redact_url(source)}, but revisions apply to hub ids only; "
                "point the URI at the revision's directory instead"
            )
        return _copy_from_uri(source, cache_dir, storage_options or {})
    path = Path(source).expanduser()
    if path.exists() or source.startswith(("/", "./", "../", "~")) or source in (".", ".."):
        return _local_directory(path, source, revision)
    return _download_from_hub(source, revision=revision, cache_dir=cache_dir)


def hub_commit(directory: Path) -> str | None:
    """The commit a hub checkout is at: huggingface_hub's cache keeps each one as snapshots/<commit>/."""
    if directory.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", directory.name):
        return directory.name
    return None


def _local_directory(path: Path, shown: str, revision: str | None) -> Path:
    if not path.exists():
        raise ModelLoadError(
            f"checkpoint directory {shown} does not exist; pass an existing directory, an fsspec URI (s3://...) "
            "or a hub id (org/name)"
        )
    if not path.is_dir():
        raise ModelLoadError(f"{shown} is a file; pass the directory that holds config.json and the weights")
    if revision is not None:
        raise ModelLoadError(
            f"revision={revision!r} was given for the local directory {shown}; revisions apply to hub ids only"
        )
    # absolute, so the path stays valid when handed to a Ray worker with another working directory
    return Path(os.path.abspath(path))


def _download_from_hub(repo_id: str, *, revision: str | None, cache_dir: str | os.PathLike | None) -> Path:
    hf_cache = cache_dir or hf_constants.HF_HUB_CACHE
    at = f" at revision {revision!r}" if revision else ""
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(CHECKPOINT_PATTERNS)
        )
    except HFValidationError as e:
        raise ModelLoadError(
            f"{repo_id!r} is neither an existing local directory nor a valid hub id ({e}); pass a directory, "
            "an fsspec URI (s3://...) or a hub id like google/mt5-small"
        ) from e
    except GatedRepoError as e:
        raise ModelLoadError(
            f"hub repo {repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, then log in "
            "(huggingface-cli login, or set HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"{repo_id!r} is not a local directory, and the hub has no repo {repo_id} (or it is private and no "
            "token was given: set HF_TOKEN); check the name or pass a local directory"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"hub repo {repo_id} has no revision {revision!r}; check the branch, tag or commit") from e
    except LocalEntryNotFoundError as e:
        # huggingface_hub raises this both in offline mode and when the hub cannot be reached
        raise ModelLoadError(
            f"hub repo {repo_id}{at} is not cached in {hf_cache} and the hub cannot be reached (HF_HUB_OFFLINE is "
            f"set, or there is no network). Download it first where there is network (huggingface-cli download "
            f"{repo_id}), then run with HF_HUB_OFFLINE=1 and the same HF_HOME; or pass a local directory"
        ) from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"the hub refused the request for {repo_id}{at}: {e}") from e
    except OSError as e:
        # requests' SSL and proxy errors are OSErrors that huggingface_hub lets through
        raise ModelLoadError(
            f"cannot reach the hub for {repo_id}{at} ({type(e).__name__}: {e}); check the network or proxy"
        ) from e
    return Path(path)


def _copy_from_uri(uri: str, cache_dir: str | os.PathLike | None, storage_options: dict) -> Path:
    shown = redact_url(uri)
    secrets = url_secrets(uri)
    if cache_dir is None:
        cache_dir = Path(os.environ.get("LAKESUM_CACHE") or "~/.cache/lakesum") / "checkpoints"
    local = Path(cache_dir).expanduser() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()
    fs, root = open_filesystem(uri, storage_options, error=ModelLoadError)
    try:
        wanted = _list_checkpoint_files(fs, root, shown)
        _sync_directory(fs, wanted, local, shown)
    except OSError as e:
        detail = scrub(f"{type(e).__name__}: {e}", secrets)
        error = ModelLoadError(
            f"cannot copy the checkpoint from {shown} ({detail}); check the URI, the credentials "
            "(storage_options or the environment) and the network"
        )
        # the original exception may quote the URI, credentials included, so it is only chained when there are none
        raise error from (None if secrets else e)
    return local


def _list_checkpoint_files(fs: fsspec.AbstractFileSystem, root: str, shown: str) -> dict[str, dict]:
    """file name -> fsspec info, for the checkpoint files directly under `root`."""
    # fsspec keeps directory listings per filesystem instance; a stale one would hide a changed checkpoint
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise ModelLoadError(f"{shown} does not exist; check the URI") from None
    if len(entries) == 1 and entries[0]["name"].rstrip("/") == root and entries[0].get("type") == "file":
        raise ModelLoadError(f"{shown} is a file; pass the directory that holds config.json and the weights")
    files = {posixpath.basename(e["name"].rstrip("/")): e for e in entries if e.get("type") == "file"}
    wanted = {name: info for name, info in files.items() if _is_checkpoint_file(name)}
    if not wanted:
        raise ModelLoadError(
            f"{shown} holds no checkpoint files (it contains: {', '.join(sorted(files)) or 'nothing'}); "
            f"expected config.json and {SAFE_WEIGHTS_NAME}, or {SAFE_INDEX_NAME} with its shards"
        )
    return wanted


def _sync_directory(fs: fsspec.AbstractFileSystem, wanted: dict[str, dict], local: Path, shown: str) -> None:
    """Makes `local` an exact copy of the `wanted` remote files, copying only those that changed."""
    local.mkdir(parents=True, exist_ok=True)
    with _locked(local):
        manifest = _read_manifest(local)
        for name, info in sorted(wanted.items()):
            fingerprint = _fingerprint(info)
            if _is_cached(local / name, manifest.get(name), fingerprint):
                continue
            logger.info("copying %s from %s to %s", name, shown, local)
            manifest.pop(name, None)
            _download(fs, info["name"], local / name, fingerprint["size"], shown)
            manifest[name] = fingerprint
            # recorded after every file, so a killed run resumes with the files it already has
            _write_manifest(local, shown, manifest)

        # files the source no longer has (e.g. old shards) and copies orphaned by a killed run
        for path in local.iterdir():
            if path.name not in wanted and path.name not in (_MANIFEST_NAME, _LOCK_NAME):
                path.unlink()
        _write_manifest(local, shown, {name: manifest[name] for name in wanted})


def _is_checkpoint_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_PATTERNS)


def _fingerprint(info: dict) -> dict:
    fingerprint = {"size": info.get("size")}
    for key in _IDENTITY_KEYS:
        if info.get(key) is not None:
            fingerprint[key] = str(info[key])
    return fingerprint


def _is_cached(path: Path, recorded: dict | None, fingerprint: dict) -> bool:
    # a fingerprint of size alone cannot prove the content unchanged, so such files are always copied again
    return (
        recorded == fingerprint
        and len(fingerprint) > 1
        and fingerprint["size"] is not None
        and path.is_file()
        and path.stat().st_size == fingerprint["size"]
    )


def _download(fs: fsspec.AbstractFileSystem, remote_path: str, target: Path, size: int | None, shown: str) -> None:
    with atomic_path(target) as tmp:
        fs.get_file(remote_path, str(tmp))
        copied = tmp.stat().st_size
        if size is not None and copied != size:
            raise ModelLoadError(
                f"the copy of {target.name} from {shown} has {copied} bytes, but the source reported {size}; "
                "the file changed during the copy or the transfer broke off: retry"
            )


def _read_manifest(local: Path) -> dict:
    try:
        return json.loads((local / _MANIFEST_NAME).read_text())["files"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        # no usable record of what is cached: everything is copied again, which is slow but never wrong
        return {}


def _write_manifest(local: Path, shown: str, files: dict) -> None:
    text = json.dumps({"source": shown, "files": files}, indent=2, sort_keys=True)
    with atomic_path(local / _MANIFEST_NAME) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Holds an exclusive lock on a cache directory.

    Ray puts several workers on a node and they share the cache: the lock lets one copy the files while the others
    wait, and makes any *.partial found under it an orphan of a killed run that is safe to delete.
    """
    with open(directory / _LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------------
# Which files hold what


def read_config(directory: Path) -> MT5Config:
    """The checkpoint's config.json, checked (a ConfigError names the file)."""
    return MT5Config.from_dict(
        read_json(directory, "config.json", required=True), source=str(directory / "config.json")
    )


def read_json(checkpoint_dir: Path, name: str, *, required: bool) -> dict | None:
    """The JSON object in `checkpoint_dir/name`; None when it is missing and not required."""
    path = Path(checkpoint_dir) / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not required:
            return None
        raise ModelLoadError(
            f"{path} is missing; a checkpoint directory needs {name}: copy it from the model the weights came from"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix it or copy it again"
        ) from e
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files holding the weights: model.safetensors, or the shards its index lists."""
    checkpoint_dir = Path(checkpoint_dir)
    single, index = checkpoint_dir / SAFE_WEIGHTS_NAME, checkpoint_dir / SAFE_INDEX_NAME
    if single.is_file() and index.is_file():
        raise ModelLoadError(
            f"{checkpoint_dir} holds both {SAFE_WEIGHTS_NAME} and {SAFE_INDEX_NAME}, so it is unclear which weights "
            "are meant; delete the stale one"
        )
    if single.is_file():
        return [single]
    if index.is_file():
        return sorted({checkpoint_dir / shard for shard in _weight_map(checkpoint_dir).values()})

    if not checkpoint_dir.is_dir():
        raise ModelLoadError(f"{checkpoint_dir} is not a directory; pass the directory that holds the checkpoint")
    names = sorted(path.name for path in checkpoint_dir.iterdir())
    shards = [name for name in names if _SHARD_NAME.fullmatch(name)]
    if shards:
        raise ModelLoadError(
            f"{checkpoint_dir} has safetensors shards ({', '.join(shards)}) but no {SAFE_INDEX_NAME}; "
            "copy the index along with the shards"
        )
    unsafe = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in _UNSAFE_WEIGHT_PATTERNS)]
    if unsafe:
        raise ModelLoadError(
            f"{checkpoint_dir} has weights only as {', '.join(unsafe)}. lakesum loads safetensors only: pickled "
            "checkpoints can run arbitrary code when loaded, so they are never opened. If you trust the file, "
            f"convert it once with transformers: {_convert_command(checkpoint_dir)}"
        )
    raise ModelLoadError(
        f"{checkpoint_dir} holds no weights: neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}. It contains: "
        f"{', '.join(names) or 'nothing'}. Hub repos that publish only pytorch_model.bin must be converted first: "
        f"download them and run {_convert_command(checkpoint_dir)}"
    )


def _convert_command(checkpoint_dir: Path) -> str:
    return (
        'python -c "from transformers import AutoModelForSeq2SeqLM; '
        f"AutoModelForSeq2SeqLM.from_pretrained('{checkpoint_dir}')"
        f".save_pretrained('{checkpoint_dir}', safe_serialization=True)\""
    )


def _weight_map(checkpoint_dir: Path) -> dict[str, str]:
    """The index's tensor name -> shard file map, after checking its shape and that every shard exists."""
    index_path = checkpoint_dir / SAFE_INDEX_NAME
    weight_map = read_json(checkpoint_dir, SAFE_INDEX_NAME, required=True).get("weight_map")
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise ModelLoadError(
            f"{index_path} has no well-formed weight_map (a non-empty object of tensor name -> shard file name); "
            "copy the index again or re-save the checkpoint"
        )
    for shard in sorted(set(weight_map.values())):
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise ModelLoadError(
                f"{index_path} names shard {shard!r} outside {checkpoint_dir}; shards must sit beside the index"
            )
        if not (checkpoint_dir / shard).is_file():
            raise ModelLoadError(
                f"shard {shard} listed in {index_path} is missing from {checkpoint_dir}; copy every shard, "
                "or download the checkpoint again"
            )
    return weight_map


# ----------------------------------------------------------------------------------------------------------------
# Reading safetensors


def tensor_shapes(checkpoint_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype such as "F32" or "BF16"), from the file headers alone."""
    return {
        name: (tuple(entry["shape"]), entry["dtype"])
        for _, header in _checked_headers(Path(checkpoint_dir))
        for name, entry in header.items()
    }


def load_tensors(
    checkpoint_dir: Path,
    *,
    device: str | torch.device = "cpu",
    dtype_for: Callable[[str, torch.dtype], torch.dtype | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) for every tensor in the weight files, one at a time from memory-mapped files.

    `dtype_for(name, stored_dtype)` picks the dtype to convert each tensor to (None keeps it). Tensors are converted
    one by one, so host memory never holds a float32 copy of the whole model. Every header is checked before the
    first tensor is read, so a broken checkpoint fails before anything is loaded.
    """
    for path, header in _checked_headers(Path(checkpoint_dir)):
        try:
            with safetensors.safe_open(path, framework="pt", device=str(device)) as handle:
                # in file order, so the memory map is read front to back
                for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
                    tensor = handle.get_tensor(name)
                    dtype = dtype_for(name, tensor.dtype) if dtype_for is not None else None
                    if dtype is not None and dtype != tensor.dtype:
                        tensor = tensor.to(dtype)
                    yield name, tensor
        except safetensors.SafetensorError as e:
            raise ModelLoadError(f"{path} could not be read as safetensors ({e}); download or save it again") from e


def _checked_headers(checkpoint_dir: Path) -> list[tuple[Path, dict]]:
    """(file, header) for each weight file, after checking that no tensor is in two files and that the index, if
    any, says where each tensor really is."""
    headers, owner = [], {}
    for path in weight_files(checkpoint_dir):
        header = _read_header(path)
        for name in header:
            if name in owner:
                raise ModelLoadError(
                    f"tensor {name!r} is in both {owner[name].name} and {path.name} in {checkpoint_dir}, so it is "
                    "unclear which to load; re-save the checkpoint"
                )
            owner[name] = path
        headers.append((path, header))
    if (checkpoint_dir / SAFE_INDEX_NAME).is_file():
        listed = _weight_map(checkpoint_dir)
        for name in sorted(listed.keys() | owner.keys()):
            actual = owner[name].name if name in owner else None
            if listed.get(name) != actual:
                raise ModelLoadError(
                    f"{checkpoint_dir / SAFE_INDEX_NAME} says tensor {name!r} is in {listed.get(name)}, but it is in "
                    f"{actual}; the index and the shards come from different saves: copy them again together"
                )
    return headers


def _read_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header, after checking the file is long enough for every tensor's data.

    tensor_shapes() must validate without memory-mapping anything, and a short memory-mapped file fails late, as a
    bus error, not as an exception. So the 8-byte length and the JSON header are read here, and a truncated file
    becomes an error that names it and says it is truncated (safetensors itself says "incomplete metadata").
    """
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"it has {file_size} bytes, too few for a safetensors header")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > _MAX_HEADER_BYTES or 8 + header_size > file_size:
                raise _corrupt(
                    path, f"its header claims {header_size} bytes but the file has {file_size}: it is truncated"
                )
            raw = handle.read(header_size)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise _corrupt(path, f"its header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    header.pop("__metadata__", None)

    data_end = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
            or not isinstance(entry.get("dtype"), str)
            or not isinstance(entry.get("shape"), list)
            or not all(isinstance(d, int) and d >= 0 for d in entry["shape"])
        ):
            raise _corrupt(path, f"the header entry for tensor {name!r} is malformed")
        data_end = max(data_end, offsets[1])
    needed = 8 + header_size + data_end
    if needed > file_size:
        raise _corrupt(path, f"its tensors need {needed} bytes but the file has {file_size}: it is truncated")
    return header


def _corrupt(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path} is not a valid safetensors file: {why}. Download or save it again")


# ----------------------------------------------------------------------------------------------------------------
# Writing safetensors


def save_tensors(
    tensors: dict[str, torch.Tensor],
    out_dir: Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict | None = None,
) -> list[Path]:
    """Writes `tensors` as model.safetensors, or as shards plus model.safetensors.index.json when they add up to
    more than `max_shard_bytes`, laid out as transformers' save_pretrained does. Returns the weight files, in the
    order weight_files() lists them.

    Each file is written atomically. Weight files of an earlier save that this one does not overwrite (old shards,
    an index or a model.safetensors) are deleted afterwards, so the directory never holds two candidate checkpoints.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    file_metadata = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in file_metadata.items()):
        raise ValueError(f"safetensors metadata must map strings to strings, got {metadata!r}")
    for name, tensor in tensors.items():
        if tensor.is_meta:
            raise ValueError(
                f"tensor {name!r} is on the meta device and has no data to save; load or initialise it first"
            )
    out_dir.mkdir(parents=True, exist_ok=True)

    sizes = {name: tensor.numel() * tensor.element_size() for name, tensor in tensors.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        names = [SAFE_WEIGHTS_NAME]
    else:
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    seen_storages: set[tuple[torch.device, int]] = set()
    written = []
    for file_name, shard in zip(names, shards, strict=True):
        # moved to the host one shard at a time, so saving a GPU model needs at most one shard of host memory
        tensors_to_write = {name: _storable(tensors[name], seen_storages) for name in shard}
        with atomic_path(out_dir / file_name) as tmp:
            save_file(tensors_to_write, tmp, metadata=file_metadata)
        written.append(out_dir / file_name)
        del tensors_to_write

    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {name: file_name for file_name, shard in zip(names, shards, strict=True) for name in shard},
        }
        with atomic_path(out_dir / SAFE_INDEX_NAME) as tmp:
            # the same text transformers writes, so diffs against its output are empty
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    keep = set(names) | ({SAFE_INDEX_NAME} if len(shards) > 1 else set())
    for path in out_dir.iterdir():
        is_weight_file = path.name in (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME) or _SHARD_NAME.fullmatch(path.name)
        is_orphan = path.name.startswith(".model") and path.name.endswith(PARTIAL_SUFFIX)
        if (is_weight_file and path.name not in keep) or is_orphan:
            path.unlink()
    return written


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Splits tensor names into shards the way huggingface_hub's split_torch_state_dict_into_shards (and so
    transformers) does: greedy in the tensors' order, a new shard when the next tensor would overflow the current
    one, and a tensor larger than max_shard_bytes in a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in sizes.items():
        if nbytes > max_shard_bytes:
            shards.append([name])
            continue
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current or not shards:  # no tensors at all still makes one (empty) model.safetensors
        shards.append(current)
    return shards


def _storable(tensor: torch.Tensor, seen_storages: set) -> torch.Tensor:
    """A contiguous host tensor that shares memory with no other tensor being saved.

    safetensors refuses tensors that share storage, which tied weights (shared / lm_head / embed_tokens) do; a
    clone gives each its own bytes, as the file format stores each name separately anyway.
    """
    tensor = tensor.detach()
    storage = (tensor.device, tensor.untyped_storage().data_ptr())
    if storage in seen_storages:
        tensor = tensor.clone()
    else:
        seen_storages.add(storage)
    return tensor.to("cpu").contiguous()
