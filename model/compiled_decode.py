"""The decode step as one static graph: the decoder and lm_head compiled by torch.compile(fullgraph=True) over
preallocated storage, as gpt-fast does. Opt-in: GenerationConfig.compile (the pipeline's --compile-decode).

A graph is compiled for fixed shapes, so a step sees few: documents are counted in buckets (powers of two
below the stream's most documents, and that most), source widths in powers of two, and each (rows, width)
bucket compiles once per model. Rows past the live ones are padding (token 0 at position 0, reading a stale
source): each row's arithmetic reads only its own cache and its own document's source, so padding changes
no live row's result, and its logits are never read.

The self-attention caches, the cross-attention keys and values and the logits live in storage kept with the
model from stream to stream and written in place, so that on a GPU mode="reduce-overhead" captures each bucket
as a CUDA graph over fixed addresses. Beam search's reordering of the caches runs inside the graph. The
search (model/decode.py) stays eager: it is small tensor work on [rows, 2 x beams] candidates.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .decode_batch import DecodeBatch
from .modules import KVCache
from .packed import has_packed_projections, is_dynamic_int8, is_packed

if TYPE_CHECKING:
    from .decode import Search
    from .generate import GenerationConfig

# Source widths are bucketed from this up, in powers of two: narrower buckets would only add compiles.
MIN_WIDTH = 16


def bucket(count: int, most: int) -> int:
    """The smallest power of two >= count, or `most` where that is smaller."""
    return min(1 << max(count - 1, 0).bit_length(), most)


def width_bucket(width: int) -> int:
    return max(MIN_WIDTH, 1 << max(width - 1, 0).bit_length())


def step(model, tokens, positions, parents, group: int, caches, cross_kv, encoder_mask, out):
    """Write the logits [rows, vocab] of the next token of `tokens` [rows, 1] at `positions` [rows, 1] into
    out[:rows] (float32); with `out` None, return the decoder's last hidden states [rows, d_model] instead.
    With `parents` [rows], row i's cache first continues from row parents[i]'s (beam search's reordering of
    the step before). caches, cross_kv [docs, heads, width, d_kv] and encoder_mask [docs, width] are the
    storage's, of its capacity: the step uses their first rows // group documents. The one function
    torch.compile compiles."""
    rows = tokens.shape[0]
    if parents is not None:  # parents may lie past `rows`: the rows of documents that left since
        for cache in caches:
            cache.k[:rows] = cache.k.index_select(0, parents)
            cache.v[:rows] = cache.v.index_select(0, parents)
    docs = rows // group
    sources = [(k[:docs], v[:docs]) for k, v in cross_kv]
    hidden = model.decoder(model.shared(tokens), sources, encoder_mask[:docs], caches=caches, positions=positions)
    if out is None:
        return hidden[:, -1]
    out[:rows].copy_(model.lm_logits(hidden[:, -1]))
    return None


# torch.compile's backend. Inductor generates the fused kernels; most tests set dynamo's "eager", which traces
# the same whole graph (fullgraph: no host sync can hide in it) in a second or two rather than compiling C++ for
# tens of seconds per bucket.
BACKEND = "inductor"


def cpu_cache_by_isa() -> str:
    """Point inductor's on-disk caches at a folder of the vector ISA it generates C++ for, and return it.

    The key of its graph cache leaves that ISA out, and ATEN_CPU_CAPABILITY can lower it: a cache warmed at
    AVX-512 then replays kernels written for 512-bit vectors, built with AVX2's flags, and the compiled step
    decodes only zeros (tests/model/test_compiled_decode.py -k inductor, run once natively and then with
    ATEN_CPU_CAPABILITY=avx2 over the same cache, torch 2.13)."""
    import os

    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    isa = pick_vec_isa()
    folder = "isa-" + ("-".join(str(isa).split()) if isa else "none")
    if os.path.basename(cache_dir()) != folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir(), folder)
    return cache_dir()


def cuda_graphs_in_this_thread() -> None:
    """Set up CUDA graph trees' per-thread state in the calling thread. Before torch 2.13 (pytorch#184357) it
    exists only in the thread that imported them and in those autograd starts, and a compiled step first run from
    any other thread asserts in cudagraph_trees.get_obj (pytorch#123177): the pipeline decodes on a thread of its
    own (pipeline/stages.py). Where torch sets it up itself, or it exists already, this does nothing."""
    from torch._inductor import cudagraph_trees as trees

    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = defaultdict(threading.Lock)


@functools.cache
def compiled_step(device_type: str, backend: str):
    """`step` compiled for this kind of device: as a CUDA graph on a GPU, where the step is launch-bound."""
    if device_type == "cpu" and backend == "inductor":
        cpu_cache_by_isa()
    # Each (rows, width) bucket, with or without reordering, is one more compile of the same function, and a
    # long stream meets a few dozen at most: past dynamo's default of 8 it would run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = "reduce-overhead" if device_type == "cuda" and backend == "inductor" else None
    return torch.compile(step, fullgraph=True, dynamic=False, backend=backend, mode=mode)


class StepStorage:
    """A model's preallocated decode storage: `rows` rows of self-attention caches of `max_len` positions,
    their float32 logits, and per source-width bucket the cross-attention keys and values and encoder mask of
    the documents. Kept with the model (storage_for), so that compiled graphs keep their addresses."""

    def __init__(self, model, rows: int, max_len: int):
        c = model.config
        self.rows, self.max_len, self.device = rows, max_len, model.device
        self.dtype = model.shared.weight.dtype
        self.caches = [
            KVCache(rows, c.num_heads, max_len, c.d_kv, self.dtype, self.device) for _ in range(c.num_decoder_layers)
        ]
        self.logits = torch.zeros(rows, c.vocab_size, device=self.device)
        self.heads, self.d_kv, self.layers = c.num_heads, c.d_kv, c.num_decoder_layers
        self.by_width: dict[int, tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]] = {}
        self.user = None  # the batch decoding with it (a weak reference)
        for cache in self.caches:
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        torch._dynamo.mark_static_address(self.logits)

    def sources(self, width: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Each layer's cross-attention (keys, values) [rows, heads, width, d_kv] and the mask [rows, width]
        (zeros at first: stale values later, always finite, which padding rows read)."""
        if width not in self.by_width:
            shape = (self.rows, self.heads, width, self.d_kv)
            kv = [
                (
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                )
                for _ in range(self.layers)
            ]
            mask = torch.zeros(self.rows, width, dtype=torch.long, device=self.device)
            for tensor in [mask, *(t for pair in kv for t in pair)]:
                torch._dynamo.mark_static_address(tensor)
            self.by_width[width] = (kv, mask)
        return self.by_width[width]


_STORAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> StepStorage


def storage_for(model, rows: int, max_len: int, user) -> StepStorage:
    """The model's storage, made (again) where it has fewer rows or positions than asked; `user`, the
    batch that takes it, is its only user until it is freed."""
    held = _STORAGE.get(model)
    if held is not None and held.user is not None and held.user() is not None:
        raise RuntimeError(
            "a compiled decode stream is already running on this model: its storage is the model's, so decode one "
            "stream at a time with compile=True, or leave compile off for the other"
        )
    # A cache of more positions gives the same results (the bias masks what lies past a row's position), and
    # keeps the graphs compiled for it: a short stream after a long one does not compile again.
    if held is None or held.rows < rows or held.max_len < max_len or held.dtype != model.shared.weight.dtype:
        held = _STORAGE[model] = StepStorage(model, rows, max_len)
    held.user = weakref.ref(user)
    return held


class CompiledDecodeBatch(DecodeBatch):
    """A DecodeBatch whose caches, encoder side and logits are the model's StepStorage, and whose logits come
    from the compiled step. Documents keep slots 0..len-1, as in DecodeBatch; rows leaving and beam reordering
    move storage rows in place rather than making new tensors."""

    def __init__(self, model, config: GenerationConfig, search: Search, max_documents: int):
        # The decoder and the head run in the graph. Dynamo stops at an int8-dynamic layer's packed weights (a
        # TorchScript object: "Failed to convert args/kwargs to proxy") at the first step; the encoder runs eagerly.
        if any(is_dynamic_int8(m) for name, m in model.named_modules() if not name.startswith("encoder")):
            raise ValueError(
                "the compiled decode step cannot run int8-dynamic layers: torch.compile does not trace their packed "
                "weights; decode without compile, or quantize the encoder alone (skip=('decoder', 'lm_head'))"
            )
        if has_packed_projections(model):
            raise ValueError(
                "the compiled decode step cannot run oneDNN-packed projections: torch.compile does not trace their "
                "weights; load the model with load_for_inference(..., compile_decode=True), which packs the head alone"
            )
        super().__init__(model, config, search)
        self.max_documents = max_documents
        self.storage = storage_for(model, max_documents * self.group, self.max_len, self)
        self.caches = self.storage.caches
        self.cross_kv, self.encoder_mask = self.storage.sources(MIN_WIDTH)
        self.values_transposed = False  # the storage holds the values as the compiled step reads them
        self.width = MIN_WIDTH
        # Beam search reorders its rows every step: inside the graph, from `parents`, each row's source row.
        self.reorders = config.num_beams > 1
        self.parents = torch.empty(0, dtype=torch.long, device=self.device)
        self.rows_index = torch.arange(self.storage.rows, device=self.device)
        # A CPU head prepacked for oneDNN (model/packed.py) is an opaque tensor inductor cannot take as an input:
        # it runs after the graph, eagerly, into the reused logits buffer. No CUDA graph is involved on CPU.
        self.packed_head = is_packed(model)
        if self.device.type == "cuda":
            cuda_graphs_in_this_thread()  # the batch is made on the thread that decodes it

    def logits(self) -> torch.Tensor:
        rows = len(self) * self.group
        padded = bucket(len(self), self.max_documents) * self.group
        positions = (self.lengths - 1)[:, None]
        tokens = torch.gather(self.sequences, 1, positions)
        tokens, positions = F.pad(tokens, (0, 0, 0, padded - rows)), F.pad(positions, (0, 0, 0, padded - rows))
        parents = None
        if self.reorders:
            parents = torch.cat([self.parents, self.rows_index[rows:padded]])
            self.parents = self.rows_index[:rows]
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        hidden = compiled_step(self.device.type, BACKEND)(
            self.model,
            tokens,
            positions,
            parents,
            self.group,
            self.caches,
            self.cross_kv,
            self.encoder_mask,
            None if self.packed_head else self.storage.logits,
        )
        if self.packed_head:
            return self.buffers.logits(self.model, hidden[:rows])
        return self.storage.logits[:rows]

    def reorder_rows(self, index: torch.Tensor) -> None:
        if self.reorders:  # applied by the next step's graph
            self.parents = self.parents.index_select(0, index)
            return
        for cache in self.caches:  # documents left without a replacement: rare outside beam search
            cache.k[: len(index)] = cache.k.index_select(0, index)
            cache.v[: len(index)] = cache.v.index_select(0, index)

    def _append_storage(self, slots: int) -> None:
        if len(self) > self.max_documents:
            raise ValueError(f"{len(self)} documents in a compiled decode of at most {self.max_documents}")
        start = len(self.parents)
        self.parents = torch.cat([self.parents, self.rows_index[start : start + slots * self.group]])

    def _select_sources(self, index: torch.Tensor) -> None:
        for k, v in self.cross_kv:
            k[: len(index)] = k.index_select(0, index)
            v[: len(index)] = v.index_select(0, index)
        self.encoder_mask[: len(index)] = self.encoder_mask.index_select(0, index)

    def _widen_sources(self, width: int) -> None:
        if width > self.width:
            self._resize_sources(width_bucket(width))

    def _trim_sources(self) -> None:
        width = width_bucket(max(self.source_lengths, default=0))
        if width != self.width:
            self._resize_sources(width)

    def _resize_sources(self, width: int) -> None:
        """Move the documents' encoder side to the storage of `width` positions (their sources fit in it)."""
        docs, kept = len(self), min(width, self.width)
        cross_kv, mask = self.storage.sources(width)
        for (k, v), (old_k, old_v) in zip(cross_kv, self.cross_kv):
            k[:docs, :, :kept], v[:docs, :, :kept] = old_k[:docs, :, :kept], old_v[:docs, :, :kept]
        mask[:docs] = 0
        mask[:docs, :kept] = self.encoder_mask[:docs, :kept]
        self.cross_kv, self.encoder_mask, self.width = cross_kv, mask, width
