"""The compiled decode step (model/compiled_decode.py) gives eager's tokens, and no decode step syncs the host."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import model as ours
from model import compiled_decode
from model import decode as decode_module
from model.compiled_decode import CompiledDecodeBatch, bucket, width_bucket
from model.decode import BeamSearch, Greedy, generate_stream
from model.packed import pack_head_for_cpu
from tests.model.helpers import STREAM_SETTINGS, token_documents

aten = torch.ops.aten

SETTINGS = {name: {**STREAM_SETTINGS[name], "max_new_tokens": 14} for name in ("greedy_xlsum", "beam_xlsum")}
DOCUMENTS_AT_ONCE = 4


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)


@pytest.fixture
def traced(monkeypatch):
    """Compile with dynamo's eager backend: the same one whole-graph trace as inductor's, in a second or two per
    bucket rather than tens of seconds of C++ compiling. Inductor's own kernels are checked on one bucket."""
    monkeypatch.setattr(compiled_decode, "BACKEND", "eager")


def documents() -> list[tuple[int, list[int]]]:
    """Sources of 17 to 32 tokens (one width bucket), and one of 33 to 64 that joins mid-stream and widens the
    encoder side until it leaves: few buckets, so few compiles, while documents join, leave and pad the batch."""
    pool = token_documents(40, seed=2)
    middle = [(key, ids) for key, ids in pool if 17 <= len(ids) <= 32][:5]
    wide = next((key, ids) for key, ids in pool if len(ids) > 32)
    return middle[:4] + [wide] + middle[4:]


class Trickle:
    """Documents as a queue hands them out: the first `first`, then none at one read (the stream decodes what it
    has: 3 documents padded to a bucket of 4), then the rest as slots free up."""

    def __init__(self, docs: list, first: int):
        self.docs, self.first, self.given, self.paused = docs, first, 0, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.given == len(self.docs) or (self.given == self.first and not self.paused):
            self.paused = True
            raise StopIteration
        self.given += 1
        return self.docs[self.given - 1]


def decode(model, settings: dict, compile: bool, docs=None) -> dict:
    config = model.generation_config.updated(**settings, compile=compile)
    rows = DOCUMENTS_AT_ONCE * settings.get("num_beams", 1)
    return dict(generate_stream(model, docs or Trickle(documents(), 3), config, max_rows=rows))


def test_buckets_are_powers_of_two_up_to_the_most():
    assert [bucket(n, 6) for n in range(1, 8)] == [1, 2, 4, 4, 6, 6, 6]
    assert [width_bucket(n) for n in (1, 16, 17, 32, 33, 512)] == [16, 16, 32, 32, 64, 512]


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_compiled_gives_the_eager_tokens_as_documents_join_leave_and_pad(model, settings, traced, monkeypatch):
    steps = []  # (documents, source width bucket) of each compiled step
    original = CompiledDecodeBatch.logits
    monkeypatch.setattr(
        CompiledDecodeBatch, "logits", lambda self: (steps.append((len(self), self.width)), original(self))[1]
    )
    eager, compiled = decode(model, settings, compile=False), decode(model, settings, compile=True)
    assert compiled == eager
    assert 3 in {docs for docs, _ in steps}, "no step padded 3 documents to 4"
    assert {width for _, width in steps} >= {32, 64}, "the encoder side was never widened, then trimmed"
    assert len({len(ids) for ids in eager.values()}) > 2, "summaries of one length: no document left mid-stream"


def test_compiled_by_inductor_gives_the_eager_tokens(model):
    """One bucket (one document at a time, sources of one width bucket): a single inductor compile."""
    docs = documents()[:2]
    settings = dict(max_new_tokens=8)
    config = model.generation_config.updated(**settings)
    eager = dict(generate_stream(model, docs, config, max_rows=1))
    compiled = dict(generate_stream(model, docs, config.updated(compile=True), max_rows=1))
    assert compiled == eager


def test_inductor_caches_on_cpu_are_kept_apart_by_vector_isa(tmp_path, monkeypatch):
    """inductor's graph cache is not keyed by the vector ISA: warmed natively (AVX-512 here), a run under
    ATEN_CPU_CAPABILITY=avx2 replayed 512-bit kernels and decoded zeros. Each ISA gets a cache folder of its own,
    and the same ISA finds its folder again."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa, valid_vec_isa_list

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    native = compiled_decode.cpu_cache_by_isa()
    assert native.startswith(str(tmp_path)) and compiled_decode.cpu_cache_by_isa() == native  # once, not nested
    if str(pick_vec_isa()) == str(valid_vec_isa_list()[-1]):
        pytest.skip("a single vector ISA on this CPU: nothing to lower ATEN_CPU_CAPABILITY to")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2" if "avx2" in map(str, valid_vec_isa_list()) else "default")
    lowered = compiled_decode.cpu_cache_by_isa()
    assert lowered.startswith(str(tmp_path)) and lowered != native


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_cuda_graphs_give_the_eager_tokens_as_documents_join_leave_and_pad(tiny_checkpoint, settings):
    """inductor with mode="reduce-overhead": each bucket a CUDA graph over the storage's fixed addresses."""
    on_gpu = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, device="cuda")
    assert decode(on_gpu, settings, compile=True) == decode(on_gpu, settings, compile=False)
    assert decode(on_gpu, settings, compile=True) == decode(on_gpu, settings, compile=False)  # graphs replayed


def test_a_head_packed_for_the_cpu_runs_after_the_graph_with_the_eager_tokens(tiny_checkpoint, traced):
    packed = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    if not pack_head_for_cpu(packed):
        pytest.skip("this torch has no oneDNN prepacked linear")
    settings = SETTINGS["greedy_xlsum"]
    assert decode(packed, settings, compile=True, docs=documents()[:3]) == decode(
        packed, settings, compile=False, docs=documents()[:3]
    )


def test_int8_dynamic_layers_in_the_graph_are_refused_and_an_int8_encoder_compiles(tiny_checkpoint, traced):
    from model.quantize import quantize

    settings = SETTINGS["greedy_xlsum"]
    int8 = quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), "int8-dynamic")
    with pytest.raises(ValueError, match="cannot run int8-dynamic layers.*decode without compile"):
        decode(int8, settings, compile=True, docs=documents()[:3])
    encoder_only = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    quantize(encoder_only, "int8-dynamic", skip=("decoder", "lm_head"))
    assert decode(encoder_only, settings, compile=True, docs=documents()[:3]) == decode(
        encoder_only, settings, compile=False, docs=documents()[:3]
    )


def test_a_second_compiled_stream_on_one_model_is_refused(model, traced):
    config = model.generation_config.updated(max_new_tokens=4, compile=True)
    first = generate_stream(model, documents(), config, max_rows=2)
    next(first)
    with pytest.raises(RuntimeError, match="already running on this model"):
        next(generate_stream(model, documents(), config, max_rows=2))
    first.close()
    del first
    assert len(list(generate_stream(model, documents()[:2], config, max_rows=2))) == 2


class HostSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for the device or hand it host data: a tensor read as a
    Python number (.item(), bool()) or list (.tolist(), which on CPU reads memory without an operation, so it is
    counted by name), nonzero (its size is data), torch.tensor(python data), and copies between devices."""

    READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default, aten.is_nonzero.default}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __enter__(self):
        self.tolist = torch.Tensor.tolist
        torch.Tensor.tolist = lambda tensor: (self.seen.append("tolist"), self.tolist(tensor))[1]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS or func is aten.lift_fresh.default:  # lift_fresh: torch.tensor(python data)
            self.seen.append(str(func))
        elif func in (aten._to_copy.default, aten.copy_.default):
            devices = {t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
            if "device" in kwargs:
                devices.add(torch.device(kwargs["device"]))
            if len(devices) > 1:
                self.seen.append(f"{func} {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_host_syncs_are_counted():
    with HostSyncs() as syncs:
        x = torch.arange(4.0)
        x.sum().item(), x.tolist(), bool(x.any()), x.nonzero(), torch.tensor([1, 2]), x.to("meta")
    assert len(syncs.seen) == 6, syncs.seen


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_decode_steps_make_no_host_sync(model, settings, compile, traced, monkeypatch):
    """Every step between sync points (the search, the decoder, the lm_head) runs without one; the syncs are
    at the sync points only (finished documents, refills). The compiled graph itself cannot hold one: with
    fullgraph, a host read would be a graph break, which fails the compile."""
    if compile:  # the compiled graph runs outside the counting mode (dynamo refuses to trace under one)
        original = compiled_decode.compiled_step

        def outside_the_mode(*key):
            def call(*args):
                with _disable_current_modes():
                    return original(*key)(*args)

            return call

        monkeypatch.setattr(compiled_decode, "compiled_step", outside_the_mode)
    # On CPU the loop reads back at will (host_reads_are_free): decode as on an accelerator, whose queue a read
    # would stall, with CPU tensors; and in one stream, as there (another stream's sync points would be counted too).
    monkeypatch.setattr(decode_module, "host_reads_are_free", lambda device: False)
    monkeypatch.setattr(decode_module, "cpu_streams", lambda device, config: 1)
    if compile:
        decode(model, settings, compile)  # compiles every bucket first: steady state is what is counted
    search = BeamSearch if settings.get("num_beams", 1) > 1 else Greedy
    counted = []
    step = search.step

    def counting(self, batch):
        if len(counted) == 16:  # enough to span documents finishing and joining; counting slows each op
            return step(self, batch)
        with HostSyncs() as syncs:
            step(self, batch)
        counted.append(syncs.seen)

    monkeypatch.setattr(search, "step", counting)
    decode(model, settings, compile)
    assert len(counted) > 10
    assert [seen for seen in counted if seen] == []


def test_cuda_graph_state_is_set_up_in_the_thread_that_decodes(monkeypatch):
    """The pipeline decodes on a thread of its own, where torch before 2.13 has no CUDA graph trees state and
    asserts (pytorch#123177): the compiled batch sets it up there, apart from the importing thread's. torch 2.13
    sets it up itself, so its get_obj is replaced by the one before the fix (torch 2.11's), which asserts."""
    from torch._inductor import cudagraph_trees as trees

    from model.compiled_decode import cuda_graphs_in_this_thread

    def get_obj_before_the_fix(local, attr_name):
        if hasattr(local, attr_name):
            return getattr(local, attr_name)
        assert torch._C._is_key_in_tls(attr_name)
        return torch._C._get_obj_in_tls(attr_name)

    monkeypatch.setattr(trees, "get_obj", get_obj_before_the_fix)
    seen = {}

    def decode_thread():
        cuda_graphs_in_this_thread()
        seen["containers"] = trees.get_obj(trees.local, "tree_manager_containers")
        seen["container"] = trees.get_container(0)  # takes the thread's lock for device 0, made on demand

    thread = threading.Thread(target=decode_thread)
    thread.start()
    thread.join()
    assert isinstance(seen["container"], trees.TreeManagerContainer)
    assert seen["containers"] == {0: seen["container"]}
