"""The decode: one loop over a stream of documents, and its three ways of choosing tokens side by side.

decode_stream() is the one engine: generate() streams its batch through it, the pipeline its windows. The
documents decode together in a DecodeBatch (model/decode_batch.py). Each step computes every row's
logits, and the search (Greedy, Sampling or BeamSearch below) chooses each row's next token. At every sync
the finished documents are handed back and their slots refilled from the stream; slots without a
replacement leave the batch, so the steps compute only what is still decoding.

The loop makes no host sync but at those syncs: finished flags stay on the device, and on a GPU the loop
looks at them only every SYNC_EVERY steps. The extra steps cannot change a result (a finished row's
tokens are no longer written). On CPU there is nothing to stall (host_reads_are_free): it looks every step
(sync_every), and beam search's top-k reads one flag back per step.

Each document gets the tokens that generate() and transformers give it alone: its rows are decoded
independently of the others (their own caches, cross-attention keys and values, logits processors and
beam scores); only the batch they share a step with changes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import torch

from .compiled_decode import CompiledDecodeBatch
from .decode_batch import DecodeBatch, Document, StepBuffers
from .logits import LogitsProcessor, argmax, chunk_maxima, top_k

if TYPE_CHECKING:
    from .generate import GenerationConfig

SYNC_EVERY = 4
# A score that keeps a candidate out of a top-k, as transformers' beam search writes it.
NEVER = -1.0e9


def host_reads_are_free(device: torch.device) -> bool:
    """Whether a step may read a result back to the host: on CPU there is no queue of work to stall."""
    return device.type == "cpu"


def sync_every(device: torch.device) -> int:
    """Steps between completion checks: on CPU every step, since a finished row kept for the steps up to a
    check costs a row's share of each step (a whole step's lm_head at one row), and a check costs nothing."""
    return 1 if host_reads_are_free(device) else SYNC_EVERY


class Search(Protocol):
    """How a step chooses tokens, with whatever per-document state that takes."""

    rows_per_document: int

    def start(self, slots: torch.Tensor) -> None: ...  # documents begin at these slots
    def grow(self, count: int) -> None: ...  # `count` more slots at the end
    def select(self, slots: torch.Tensor) -> None: ...  # only these slots go on, in this order
    def step(self, batch: DecodeBatch) -> None: ...
    def outputs(self, batch: DecodeBatch, slots: list[int]) -> list[list[list[int]]]: ...  # each slot's sequences


class Greedy:
    """The most likely token of each row; one row per document."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.logits_processor = LogitsProcessor(config)
        self.rows_per_document = config.rows_per_document()

    def start(self, slots: torch.Tensor) -> None:
        pass

    def grow(self, count: int) -> None:
        pass

    def select(self, slots: torch.Tensor) -> None:
        pass

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        return argmax(scores)

    def step(self, batch: DecodeBatch) -> None:
        c = self.config
        next_tokens = self.choose(self.logits_processor(batch.sequences, batch.logits(), batch.lengths))
        # A finished row keeps its sequence: its slot is emptied or refilled at the next sync.
        at = batch.lengths.clamp(max=batch.max_len - 1)[:, None]
        current = torch.gather(batch.sequences, 1, at).squeeze(1)
        batch.sequences.scatter_(1, at, torch.where(batch.decoding, next_tokens, current)[:, None])
        batch.lengths += batch.decoding.long()
        batch.decoding &= (next_tokens != c.eos_token_id) & (batch.lengths < batch.max_len)

    def outputs(self, batch: DecodeBatch, slots: list[int]) -> list[list[list[int]]]:
        index = torch.tensor(slots, device=batch.device)
        lengths = batch.lengths.view(-1, self.rows_per_document)[index].tolist()
        sequences = batch.sequences.view(-1, self.rows_per_document, batch.max_len)[index].tolist()
        return [[row[:n] for row, n in zip(rows, ns)] for rows, ns in zip(sequences, lengths)]


class Sampling(Greedy):
    """A token drawn from each row's processed distribution; num_return_sequences rows per document, each
    drawn on its own."""

    def __init__(self, config: GenerationConfig, generator: torch.Generator):
        super().__init__(config)
        self.generator = generator

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(1)


# exp() of anything below this is a float32 denormal or 0. x86 computes denormals in microcode, 50-100x
# slower: with a 250k vocabulary most of a row lies that far below its maximum, and exp() took 134 ms
# per step at 64 rows. Raised to this floor, each such term is still below 2e-38, and the sum they join
# is at least 1 (the maximum's term), so the normalizer does not move.
EXP_FLOOR = -87.0


# logsumexp works through its rows in blocks of about this many bytes of float32 scores, so that its five
# passes over a block (subtract, clamp, scale, exp2, sum) read the cache rather than memory: one row of mT5's
# 250k ids.
LOGSUMEXP_BLOCK_BYTES = 1 << 20

# exp(x) = 2 ** (x * LOG2E). torch computes float exp with MKL's vector math where MKL is built in (the CPU wheels),
# and on AMD CPUs MKL takes its generic path: one row of 250k ids took 149 us, against 34 us for exp2, which is
# torch's own AVX-512 or AVX2 code everywhere (AMD EPYC, one thread). Scaling the argument rounds it once more:
# each term moves by at most a few float32 ulps, and the normalizer by less than one of its own.
LOG2E = 1.4426950408889634


def logsumexp(x: torch.Tensor, buffers: StepBuffers, top: torch.Tensor | None = None) -> torch.Tensor:
    """torch.logsumexp(x, -1, keepdim=True) for rows with a finite maximum, with its temporary in reused
    memory and no denormal arithmetic. `top` [rows, 1], each row's maximum where the caller has it already.

    Each row's sum is the same whatever the block: a block has at least as many rows as torch has
    threads, and torch then sums each row in one thread, as over all rows at once."""
    rows, vocab = x.shape
    if top is None:
        top = x.amax(-1, keepdim=True)
    sums = torch.empty_like(top)
    block = max(LOGSUMEXP_BLOCK_BYTES // (4 * vocab), torch.get_num_threads(), 1)
    shifted = buffers.get("shifted", min(block, rows), x, vocab)
    for start in range(0, rows, block):
        end = min(start + block, rows)
        part = torch.sub(x[start:end], top[start:end], out=shifted[: end - start])
        torch.sum(part.clamp_(min=EXP_FLOOR).mul_(LOG2E).exp2_(), -1, keepdim=True, out=sums[start:end])
    return sums.log_() + top


def penalty(lengths: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """lengths ** length_penalty as transformers computes it (in double, from Python ints), in float32."""
    return (lengths.double() ** length_penalty).float()


class BeamSearch:
    """transformers' vectorised beam search, per document: keep the 2 x num_beams best continuations of its
    beams, move those ending in EOS to its finished set (scored with the length penalty), and go on with
    the best num_beams others. A document is done once its finished set can no longer change
    (transformers' per-source "done"); its result is the best num_return_sequences of that set."""

    STATE = ("running_scores", "finished", "finished_scores", "finished_flags", "finished_lengths", "improvable")

    def __init__(self, config: GenerationConfig, generator: torch.Generator | None, device: torch.device):
        self.config, self.generator = config, generator
        self.logits_processor = LogitsProcessor(config)
        self.rows_per_document = self.beams = config.rows_per_document()
        self.width = 2 * self.beams  # candidates per document and step
        self.top_beams = torch.arange(self.width, device=device) < self.beams
        max_len = config.total_length()
        # Per document: the running beams' scores, the finished set, and whether that set may still change.
        self.running_scores = torch.empty(0, self.beams, device=device)
        self.finished = torch.empty(0, self.beams, max_len, dtype=torch.long, device=device)
        self.finished_scores = torch.empty(0, self.beams, device=device)
        self.finished_flags = torch.empty(0, self.beams, dtype=torch.bool, device=device)
        self.finished_lengths = torch.empty(0, self.beams, dtype=torch.long, device=device)
        self.improvable = torch.empty(0, dtype=torch.bool, device=device)

    def start(self, slots: torch.Tensor) -> None:
        self.running_scores[slots] = 0.0
        self.running_scores[slots, 1:] = NEVER  # all beams start identical: expand only the first
        self.finished[slots] = self.config.decoder_start_token_id
        self.finished_scores[slots] = NEVER
        self.finished_flags[slots] = False
        self.finished_lengths[slots] = 0
        self.improvable[slots] = True

    def grow(self, count: int) -> None:
        for name in self.STATE:
            held = getattr(self, name)
            setattr(self, name, torch.cat([held, held.new_zeros(count, *held.shape[1:])]))

    def select(self, slots: torch.Tensor) -> None:
        for name in self.STATE:
            setattr(self, name, getattr(self, name).index_select(0, slots))

    def candidates(self, logits: torch.Tensor, batch: DecodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each document's `width` best continuations: (scores, beam * vocab + token), each [docs, width],
        where a continuation scores its beam's running score + the processed log_softmax of `logits`."""
        docs, beams, vocab = self.running_scores.shape[0], self.beams, logits.shape[-1]
        c, process = self.config, self.logits_processor
        if c.do_sample or c.repetition_penalty != 1.0:
            # Sampling draws from every continuation, and a repetition penalty scales log-probabilities.
            scores = process(batch.sequences, torch.log_softmax(logits, dim=-1), batch.lengths)
            scores = (scores.view(docs, beams, vocab) + self.running_scores[:, :, None]).view(docs, beams * vocab)
            if c.do_sample:
                picked = torch.multinomial(scores.softmax(-1), self.width, generator=self.generator)
                return torch.gather(scores, 1, picked), picked
            return top_k(scores, self.width)
        # log_softmax moves a row by a constant and the other processors only ban tokens, so a document's best
        # continuations are among each of its rows' best `width` logits: only those become log-probabilities,
        # rather than [rows, vocab] of them (three passes over 250k ids per row and step).
        # On CPU one pass over the logits gives both each row's maximum, for the normalizer, and its chunks' maxima,
        # for top_k (bounds once the processors have banned ids); each pass reads [rows, 250k] from memory. top_k
        # reads back whether the bounds held, which would stall a GPU; there each reduction is one kernel anyway.
        top = bounds = None
        if host_reads_are_free(logits.device):
            bounds, top = chunk_maxima(logits)
        normalizer = logsumexp(logits, batch.buffers, top)  # [rows, 1]
        top_logits, top_tokens = top_k(process(batch.sequences, logits, batch.lengths), self.width, bounds)
        scores = (top_logits - normalizer).view(docs, beams, self.width) + self.running_scores[:, :, None]
        best_scores, picked = torch.topk(scores.view(docs, -1), self.width)  # picked: beam * width + rank
        tokens = torch.gather(top_tokens.view(docs, beams * self.width), 1, picked)
        return best_scores, picked // self.width * vocab + tokens

    def step(self, batch: DecodeBatch) -> None:
        c, beams, width, max_len = self.config, self.beams, self.width, batch.max_len
        docs = len(batch)
        scores, candidates = self.candidates(batch.logits(), batch)
        lengths = batch.lengths.view(docs, beams)[:, 0]  # a document's beams have one length
        decoding = batch.decoding.view(docs, beams)[:, 0]
        parent = candidates // batch.vocab_size  # [docs, width]
        new_tokens = candidates % batch.vocab_size
        running = batch.sequences.view(docs, beams, max_len)
        candidate_seqs = torch.take_along_dim(running, parent[:, :, None], dim=1)
        at = lengths.clamp(max=max_len - 1)
        candidate_seqs.scatter_(2, at[:, None, None].expand(docs, width, 1), new_tokens[:, :, None])
        ends = (new_tokens == c.eos_token_id) | (lengths + 1 >= max_len)[:, None]

        # Go on with the best num_beams candidates that did not end.
        alive_scores = scores + ends.float() * NEVER
        best = torch.topk(alive_scores, beams)[1]
        batch.sequences = torch.take_along_dim(candidate_seqs, best[:, :, None], dim=1).view(docs * beams, max_len)
        self.running_scores = torch.take_along_dim(alive_scores, best, dim=1)
        first_row = torch.arange(docs, device=batch.device)[:, None] * beams
        batch.reorder_rows((torch.take_along_dim(parent, best, dim=1) + first_row).view(-1))

        # Merge the candidates that just ended (among the top num_beams) into the finished set, unless the
        # document is done: transformers would have stopped there, so nothing more may enter it.
        just_ended = ends & self.top_beams[None, :]
        scored = scores / penalty(lengths[:, None], c.length_penalty)
        full = self.finished_flags.all(-1, keepdim=True) & (c.early_stopping is True)
        blocked = full | ~just_ended | ~decoding[:, None]
        merged_scores = torch.cat([self.finished_scores, scored + blocked.float() * NEVER], dim=1)
        chosen = torch.topk(merged_scores, beams)[1]
        self.finished = torch.take_along_dim(torch.cat([self.finished, candidate_seqs], 1), chosen[:, :, None], dim=1)
        self.finished_scores = torch.take_along_dim(merged_scores, chosen, dim=1)
        entered = torch.cat([self.finished_flags, just_ended & decoding[:, None]], 1)
        self.finished_flags = torch.take_along_dim(entered, chosen, dim=1)
        ended_at = torch.cat([self.finished_lengths, lengths[:, None].expand(docs, width)], 1)
        self.finished_lengths = torch.take_along_dim(ended_at, chosen, dim=1)
        lengths = (lengths + 1).clamp(max=max_len)
        batch.lengths = lengths.repeat_interleave(beams)

        # Could a running beam still beat the worst finished one?
        if c.early_stopping == "never" and c.length_penalty > 0.0:
            best_length = torch.full_like(lengths, max_len - 1)
        else:
            best_length = lengths - 1
        best_running = self.running_scores[:, :1] / penalty(best_length[:, None], c.length_penalty)
        worst_finished = torch.where(self.finished_flags, self.finished_scores.amin(1, keepdim=True), NEVER)
        self.improvable &= (best_running > worst_finished).any(-1)
        if c.early_stopping is True:
            self.improvable &= ~self.finished_flags.all(-1)
        batch.decoding = (decoding & self.improvable & ~ends.all(-1)).repeat_interleave(beams)

    def outputs(self, batch: DecodeBatch, slots: list[int]) -> list[list[list[int]]]:
        n = self.config.num_return_sequences
        index = torch.tensor(slots, device=batch.device)
        lengths = (self.finished_lengths[index, :n] + 1).tolist()
        sequences = self.finished[index, :n].tolist()
        return [[row[:length] for row, length in zip(rows, ns)] for rows, ns in zip(sequences, lengths)]


@torch.no_grad()
def decode_stream(
    model,
    documents: Iterable[Document],
    config: GenerationConfig,
    *,
    max_rows: int,
    max_tokens: int | None = None,
    stop: threading.Event | None = None,
) -> Iterator[tuple[Hashable, list[list[int]]]]:
    """Decode a stream of (key, input token ids) with at most `max_rows` rows at once (rows_per_document a
    document) and, with `max_tokens`, at most that many rows x longest source; yields (key, its
    num_return_sequences outputs, each starting with decoder_start, EOS included when emitted) in the
    order the documents finish.

    With config.compile, the steps run through the compiled decode step (model/compiled_decode.py).

    `documents` is read as the batch has room, at each sync, with next(). A source that has nothing yet (a
    queue) may stop and give more at a later next(): those documents join the batch in flight, and the
    stream ends once the batch is empty. Once `stop` is set, it ends at the next step, its documents unfinished."""
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    if config.num_beams > 1:
        search = BeamSearch(config, generator, model.device)
    elif config.do_sample:
        search = Sampling(config, generator)
    else:
        search = Greedy(config)
    group = search.rows_per_document
    if config.compile:
        documents_at_once = max(max_rows, group) // group
        batch = CompiledDecodeBatch(model, config, search, documents_at_once)
    else:
        batch = DecodeBatch(model, config, search)
    pending = iter(documents)
    upcoming: list[Document] = []  # read from the stream, not admitted yet

    def admit(staying: list[int]) -> list[Document]:
        """The next documents to join the slots whose sources have lengths `staying`."""
        taken: list[Document] = []
        longest = max(staying, default=0)
        while (len(staying) + len(taken) + 1) * group <= max(max_rows, group):
            if not upcoming:
                document = next(pending, None)
                if document is None:
                    break
                upcoming.append(document)
            width = max(longest, len(upcoming[0][1]))
            slots = len(staying) + len(taken) + 1
            if max_tokens is not None and slots > 1 and slots * group * width > max_tokens:
                break
            longest = width
            taken.append(upcoming.pop(0))
        return taken

    batch.refill([], admit([]))
    step, sync = 0, sync_every(batch.device)
    while len(batch) and not (stop is not None and stop.is_set()):
        search.step(batch)
        step += 1
        if step % sync:
            continue
        done = batch.finished()
        if done:
            yield from zip([batch.keys[s] for s in done], search.outputs(batch, done))
        gone = set(done)
        batch.refill(done, admit([n for s, n in enumerate(batch.source_lengths) if s not in gone]))


def cpu_streams(device: torch.device, config: GenerationConfig) -> int:
    """How many streams a decode on `device` runs at once (decode_streams): on CPU one per thread torch has, each
    decoding its own batch on one thread, rather than one batch whose every operation is split between the threads.
    A step's many small operations, and the Python between them, do not split, and every operation that does ends at
    a barrier of all the threads; a stream on one thread starts no parallel region and waits at no barrier, and the
    streams share one model where as many replicas would each load one. Measured on 2 threads of an AMD EPYC Zen 4
    (mt5-small int8-dynamic, 48 documents, 16 at once, one process with nothing else in it): about even, greedy 7.4 s
    in 2 streams against 6.6 in one, beam 4 12.6 against 13.9, in a spell that swung 10-20 % between rounds
    (benchmarks/README.md, "Decode streams"); more cores per replica are not measured here. Sampling keeps one stream
    (its draws come from one generator, in the order of its steps), and so does the compiled step (its storage and
    graphs are the model's, one set)."""
    if device.type != "cpu" or config.do_sample or config.compile:
        return 1
    return torch.get_num_threads()


class _SharedFeed:
    """`documents` as several streams read them: one next() at a time, and none once `stopped` is set. A source that
    stops and gives more at a later next() (a queue) is read the same way by every stream."""

    def __init__(self, documents: Iterable[Document]):
        self.documents = iter(documents)
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def __iter__(self) -> Iterator[Document]:
        return self

    def __next__(self) -> Document:
        with self.lock:
            if self.stopped.is_set():
                raise StopIteration
            return next(self.documents)


def decode_streams(
    model,
    documents: Iterable[Document],
    config: GenerationConfig,
    *,
    max_rows: int,
    max_tokens: int | None = None,
    streams: int = 1,
) -> Iterator[tuple[Hashable, list[list[int]]]]:
    """decode_stream() in `streams` threads at once, each on one torch thread, sharing the model and reading
    `documents` as each has room; max_rows and max_tokens are shared out between them (never more streams than
    documents fit at once). Yields what they yield, in the order the documents finish, each document's outputs as
    decode_stream gives them: in float32 the tokens it gets in any batch; in int8-dynamic, whose activations are
    quantized per call, they can depend on which stream took it, and that on timing. An error in one stream
    stops the others and is raised here; so does closing this generator. torch's thread count is the caller's again
    after. A stream ends when its batch is empty and `documents` gives nothing; the others go on."""
    group = config.rows_per_document()
    documents_at_once = max(max_rows // group, 1)
    streams = min(streams, documents_at_once)
    if streams <= 1:
        yield from decode_stream(model, documents, config, max_rows=max_rows, max_tokens=max_tokens)
        return
    feed = _SharedFeed(documents)
    results: queue.Queue = queue.Queue()
    ready = threading.Barrier(streams)
    threads = torch.get_num_threads()

    def run(share: int) -> None:
        try:
            # Set before any stream decodes: torch's setter also clears oneDNN's cache of kernels.
            torch.set_num_threads(1)
            ready.wait()
            tokens = None if max_tokens is None else max(max_tokens * share // documents_at_once, 1)
            with torch.inference_mode():
                for item in decode_stream(
                    model, feed, config, max_rows=share * group, max_tokens=tokens, stop=feed.stopped
                ):
                    results.put((item, None))
        except BaseException as error:  # handed to the caller's thread, which raises it
            ready.abort()
            results.put((None, error))
        finally:
            results.put(None)

    shares = [documents_at_once // streams + (n < documents_at_once % streams) for n in range(streams)]
    workers = [threading.Thread(target=run, args=(share,), name=f"decode-stream-{n}") for n, share in enumerate(shares)]
    for worker in workers:
        worker.start()
    try:
        running = streams
        while running:
            result = results.get()
            if result is None:
                running -= 1
                continue
            item, error = result
            if error is not None and not isinstance(error, threading.BrokenBarrierError):
                raise error
            if item is not None:
                yield item
    finally:
        feed.stopped.set()
        for worker in workers:
            worker.join()
        torch.set_num_threads(threads)


def generate_stream(
    model,
    documents: Iterable[Document],
    config: GenerationConfig,
    *,
    max_rows: int,
    max_tokens: int | None = None,
    streams: int | None = None,
) -> Iterator[tuple[Hashable, list[int]]]:
    """decode_streams() with one output per document, as the pipeline summarizes: yields (key, output ids).
    `streams`: by default cpu_streams()."""
    if config.num_return_sequences != 1:
        raise ValueError(
            "the pipeline summarizes each document once, with one sequence per document: "
            f"got num_return_sequences={config.num_return_sequences}"
        )
    if streams is None:
        streams = cpu_streams(model.device, config)
    return (
        (key, outputs[0])
        for key, outputs in decode_streams(
            model, documents, config, max_rows=max_rows, max_tokens=max_tokens, streams=streams
        )
    )
