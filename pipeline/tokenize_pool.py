"""Tokenizing in worker processes, so that a GPU replica's tokenizing keeps up with its accelerator.

Our tokenizer segments in Python, about 0.8 M characters/s per core on text it has not seen (benchmarks/README.md,
"Tokenizer throughput"): one core keeps up with today's GPU engine, not with what an H200 could decode. A replica
given tokenize workers (a GPU replica: pipeline/placement.py chooses how many, asks Ray for a CPU each and hands the
count to the replica) tokenizes its windows in a pool of processes, each loading the tokenizer once. The Summarizer
sends a window's texts, already cut by characters, and gets their ids back in order (pipeline/stages.py).

The workers are started with `spawn`: forking a replica would copy torch's thread pools and Ray's threads into a
child that cannot use them safely. A worker that dies (killed, out of memory) breaks the pool; the pool is started
again and every window that was in it is sent again, so no window is lost. A window in a pool that breaks under it
ATTEMPTS times is tokenized in the caller's process instead.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

# --tokenize-workers auto on a GPU replica: at most this many. About 3.4 cores tokenize, cold, what CTranslate2's
# published GPU throughput scaled to an H200's bandwidth decodes (benchmarks/README.md), and a worker does about 0.8
# of what the replica's own thread does per core (the texts and ids cross processes; each worker has its own cache).
AUTO_MAX_WORKERS = 5
# Pools a window may see break under it before it is tokenized in the caller's process: a window whose own text
# kills its worker (one that runs it out of memory) is then not sent to the pool forever.
ATTEMPTS = 3

_tokenizer = None  # a worker process's tokenizer, set once when it starts (_load)


def _load(tokenizer) -> None:
    global _tokenizer
    _tokenizer = tokenizer
    # A replica killed outright (Ray kills actors with SIGKILL) cannot shut its pool down: its workers follow it
    threading.Thread(target=_exit_with, args=(multiprocessing.parent_process(),), daemon=True).start()


def _exit_with(parent) -> None:
    parent.join()  # returns when the parent process has ended
    os._exit(0)


def _encode(texts: list[str]) -> list[list[int]]:
    return encode_with(_tokenizer, texts)


def encode_with(tokenizer, texts: list[str]) -> list[list[int]]:
    """The texts' ids, as one tokenizer call gives them: what a worker does with a window."""
    return tokenizer(texts)["input_ids"]


def _pid() -> int:
    return os.getpid()


class TokenizePool:
    """`workers` processes that tokenize lists of texts; encode() hands back a Future of their ids, in order."""

    def __init__(self, tokenizer, workers: int):
        if workers < 1:
            raise ValueError(f"a tokenize pool needs at least one worker, got {workers}")
        self.tokenizer, self.workers = tokenizer, workers
        self.restarts = 0  # pools started again after a worker died
        # reentrant: a task that has ended already runs its callback (_done) in the thread that adds it, under the lock
        self._lock = threading.RLock()
        self._closed = False
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_load, initargs=(self.tokenizer,)
        )
        # With spawn, processes start one per task submitted while none is idle: start them all now, so that they
        # load the tokenizer while the model loads or the first windows are read, not on the first windows
        for _ in range(self.workers):
            executor.submit(_pid)
        return executor

    def pids(self) -> list[int]:
        """The worker processes' ids (tests kill one)."""
        with self._lock:
            return list(self._executor._processes or ())  # no public list of its processes; None once shut down

    def encode(self, texts: list[str]) -> Future:
        """A Future of the texts' ids, as tokenizer(texts)["input_ids"] gives them."""
        result: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the tokenize pool is closed")
            self._submit(texts, result, attempts=0)
        return result

    def _submit(self, texts: list[str], result: Future, attempts: int) -> None:
        """Send the texts to the current pool, or tokenize them here once ATTEMPTS pools broke under them (the caller
        holds the lock)."""
        while attempts < ATTEMPTS:
            executor = self._executor
            try:
                task = executor.submit(_encode, texts)
            except BrokenProcessPool:  # a worker died while the pool was idle
                self._restart(executor)
                attempts += 1
                continue
            task.add_done_callback(
                functools.partial(self._done, executor=executor, texts=texts, result=result, attempts=attempts)
            )
            return
        try:
            result.set_result(encode_with(self.tokenizer, texts))
        except Exception as e:  # the tokenizer's own error, as the caller would have had it
            result.set_exception(e)

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        """A new pool for the broken one, unless another task of the broken one has started it already."""
        if self._executor is broken:
            self._executor = self._start()
            self.restarts += 1

    def _done(self, task: Future, executor: ProcessPoolExecutor, texts: list[str], result: Future, attempts: int):
        """A task's end, in the pool's own thread: hand on its ids or its error, or send it again if its pool broke."""
        if task.cancelled():  # close() cancelled it
            result.cancel()
            return
        error = task.exception()
        if error is None:
            result.set_result(task.result())
        elif not isinstance(error, BrokenProcessPool):  # the tokenizer's own error, as tokenizing here would raise
            result.set_exception(error)
        else:
            with self._lock:
                if self._closed:
                    result.cancel()
                    return
                self._restart(executor)
                self._submit(texts, result, attempts + 1)

    def close(self) -> None:
        """Stop the workers; windows not tokenized yet are cancelled."""
        with self._lock:
            self._closed = True
            executor = self._executor
        executor.shutdown(wait=True, cancel_futures=True)
