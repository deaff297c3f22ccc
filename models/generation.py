"""Greedy generation in a process of its own, for a server that does other Python work.

ONNX Runtime releases the GIL while it computes a token, but takes it back to return each
one: in a process where another thread runs Python (a provider committing its last answer:
signing, JSON-RPC, the database), every token waits for that thread to let go. Measured on
tiny-r1, 2 cores: a thread busy a third of the time makes generation 1.5x slower; the same
work in another process, 1.04x. :class:`GenerationProcess` keeps the model's decode session
in a child process, so a server's own threads never stand between two tokens.

The child batches: up to `max_batch` jobs decode together (continuous batching,
``batching.DecodeBatch``: a job joins between two decode steps and leaves after its last
token, every answer bit-identical to its generation alone), within a KV-cache budget, and
:meth:`GenerationProcess.stream_as_done` hands each answer back as soon as it is done. The
parent keeps one job more than a batch in the child, so the child never waits on the parent
either.

On a machine with more CPUs than the model's threads, :func:`split_cpus` gives the child CPUs
of its own and the node's serving threads the others (``generation_cpus``, on by default in
``optinfer provider run``). Unpinned, the scheduler now and then runs a commit's work on the
generation's CPU while the other one idles: measured on tiny-r1, 2 cores, the child waited
for a CPU for 0.7-2.4% of its serving time unpinned, 0.07-0.5% pinned (docs/performance.md).
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from optinfer.errors import UserError

if TYPE_CHECKING:  # the parent need not load the graph code to pass a draw along
    from optinfer.models.sampling import Sampling

Job = tuple[list[int], int] | tuple[list[int], int, "Sampling | None"]
"""One generation: (prompt tokens, max tokens), and the draw on a sampling model (greedy when
absent or None; ``optinfer.models.sampling``)."""



@dataclass(frozen=True)
class Answer:
    """A job's output tokens and the seconds from its start to its last token (beside the
    other jobs of its batch), or the error it raised (a UserError for a prompt the model
    refuses)."""

    output: list[int]
    seconds: float
    error: Exception | None = None

DEFAULT_MAX_BATCH = 8
"""Sequences the child decodes together (continuous batching, ``batching.DecodeBatch``)."""


def generate_in_process(model, jobs: Iterable[Job]) -> Iterator[Answer]:
    """:meth:`GenerationProcess.stream` for a model of this process."""
    for prompt, max_tokens, draw in map(_with_draw, jobs):
        started = time.perf_counter()
        try:
            output = model.generate(prompt, max_tokens, draw=draw)
        except Exception as err:  # noqa: BLE001 - the caller decides
            yield Answer([], time.perf_counter() - started, err)
        else:
            yield Answer(output, time.perf_counter() - started)


def _with_draw(job: Job) -> tuple[list[int], int, Sampling | None]:
    prompt, max_tokens, *draw = job
    return list(prompt), int(max_tokens), draw[0] if draw else None


class GenerationError(RuntimeError):
    """The generation process died or could not load its model."""


class SchedulerTimes(NamedTuple):
    """A process's seconds on a CPU, and runnable but waiting for one."""

    on_cpu_s: float
    waiting_for_cpu_s: float


@dataclass(frozen=True)
class CpuSplit:
    """The CPUs the generation process runs on, and those left to the node's serving threads
    (and to nothing else of the node: its main thread, which may compute a dispute's trace,
    keeps every CPU)."""

    generation: frozenset[int]
    node: frozenset[int]


CPU_CHOICES = "auto, none, or a CPU list such as 3 or 2-3 or 1,3"


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a list in the kernel's notation (``0-2,5``); ValueError when malformed."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{text!r} is not {CPU_CHOICES}")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{text!r}: the range {part.strip()} runs backwards")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def split_cpus(choice: str, threads: int,
               available: frozenset[int] | None = None) -> CpuSplit | None:
    """Where to pin the generation process of `threads` threads, by `choice`:

    - ``none``: nowhere (None);
    - ``auto``: the last `threads` of the CPUs this process may run on, the node the rest;
      None when there are no more CPUs than threads, or the platform cannot pin;
    - a CPU list: those CPUs, the node the rest. UserError when one is not available to this
      process, when they are fewer than `threads`, or when none is left to the node.
    """
    if choice == "none":
        return None
    if available is None:
        if not hasattr(os, "sched_getaffinity"):
            if choice == "auto":
                return None
            raise UserError(f"generation_cpus {choice!r}: this platform cannot pin a process "
                            "to CPUs; use auto or none")
        available = frozenset(os.sched_getaffinity(0))
    ordered = sorted(available)
    if choice == "auto":
        if len(ordered) <= threads:
            return None
        generation = frozenset(ordered[-threads:])
    else:
        try:
            generation = parse_cpu_list(choice)
        except ValueError as err:
            raise UserError(f"generation_cpus: {err}") from None
        if missing := generation - available:
            raise UserError(f"generation_cpus {choice!r}: CPU {min(missing)} is not available "
                            f"to this process (it may use {format_cpu_list(available)})")
        if len(generation) < threads:
            raise UserError(f"generation_cpus {choice!r} names {len(generation)} CPU(s) for "
                            f"{threads} generation threads: name at least as many, or use auto")
        if generation == available:
            raise UserError(f"generation_cpus {choice!r} leaves no CPU to the node (this "
                            f"process may use {format_cpu_list(available)})")
    return CpuSplit(generation=generation, node=available - generation)


def format_cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def pin_this_thread(cpus: frozenset[int] | None) -> None:
    """Run the calling thread (and the threads and processes it starts from now on) on
    `cpus` only; nothing when None. Linux applies an affinity to one thread, not to the
    whole process."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


class GenerationProcess:
    """An :class:`~optinfer.models.runtime.IntegerModel` of `model_dir` generating greedily
    in a child process. Safe to share between threads (one stream at a time); a child that
    dies is started again on the next use. :meth:`close` ends it; so does the parent's end,
    SIGKILL included (the child stops when its pipe closes)."""

    def __init__(self, model_dir: Path | str, threads: int = 1,
                 cpus: frozenset[int] | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 kv_budget_bytes: int | None = None):
        if max_batch < 1:
            raise UserError(f"the batch size must be at least 1, got {max_batch}")
        self.model_dir = str(model_dir)
        self.threads = threads
        self.cpus = cpus  # the child's, set before it loads the model; None: any
        self.max_batch = max_batch
        self.kv_budget_bytes = kv_budget_bytes
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._sent = 0  # jobs sent to this child: the next job's number there
        with self._lock:
            self._start()

    @property
    def queued_jobs(self) -> int:
        """Jobs the child holds at a time: a full batch, and one more ready to join."""
        return self.max_batch + 1

    def generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        (answer,) = self.stream([(prompt, max_tokens)])
        if answer.error is not None:
            raise answer.error
        return answer.output

    def stream(self, jobs: Iterable[Job]) -> Iterator[Answer]:
        """The answers to `jobs`, in order; GenerationError when the child dies."""
        done: dict[int, Answer] = {}
        following = 0
        for index, answer in self.stream_as_done(jobs):
            done[index] = answer
            while following in done:
                yield done.pop(following)
                following += 1

    def stream_as_done(self, jobs: Iterable[Job]) -> Iterator[tuple[int, Answer]]:
        """(index in `jobs`, answer) as each answer is done: up to `max_batch` jobs decode
        together in the child and the next joins as one leaves, so a short answer comes back
        before a long one sent earlier. GenerationError when the child dies."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            first = self._sent  # the child numbers jobs in the order it receives them
            in_flight = 0
            try:
                for job in jobs:
                    self._send(job)
                    in_flight += 1
                    if in_flight == self.queued_jobs:
                        in_flight -= 1
                        number, answer = self._receive()
                        yield number - first, answer
                while in_flight:
                    in_flight -= 1
                    number, answer = self._receive()
                    yield number - first, answer
            finally:
                # An abandoned stream leaves answers in the pipe: read them, or the next
                # stream would take them for its own.
                try:
                    for _ in range(in_flight):
                        self._receive()
                except GenerationError:
                    pass  # nothing left to read

    def close(self) -> None:
        with self._lock:
            self._discard()

    def scheduler_times(self) -> SchedulerTimes | None:
        """Seconds the child has run on a CPU, and waited for one while runnable, summed over
        its threads; None where the kernel does not say (no /proc/PID/schedstat) or no child
        runs. The waiting is what other work on its CPUs costs it."""
        process = self._process
        if process is None:
            return None
        running = waiting = 0
        try:
            for task in Path(f"/proc/{process.pid}/task").iterdir():
                on_cpu, queued, _slices = (task / "schedstat").read_text().split()
                running, waiting = running + int(on_cpu), waiting + int(queued)
        except (OSError, ValueError):
            return None
        return SchedulerTimes(running / 1e9, waiting / 1e9)

    def __enter__(self) -> GenerationProcess:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # -- the pipe --------------------------------------------------------------------------

    def _start(self) -> None:
        # A fresh interpreter on a socket pair: a fork of a process with threads and ORT
        # sessions can deadlock, and multiprocessing's spawn would import the parent's
        # __main__ again (a script without a main guard would start itself over).
        parent_end, child_end = socket.socketpair()
        self._sent = 0
        with child_end:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(child_end.fileno()), self.model_dir,
                 str(self.threads), format_cpu_list(self.cpus) if self.cpus else "any",
                 str(self.max_batch), str(self.kv_budget_bytes or 0)],
                pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL)  # the parent's stdout may be its JSON result
        self._conn = Connection(parent_end.detach())
        kind, value = self._read()
        if kind == "error":
            self._discard()
            raise value

    def _discard(self) -> int | None:
        """Close the pipe (the child exits when it reads its end) and reap the child; its
        exit code."""
        process, self._process = self._process, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if process is None:
            return None
        try:
            return process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stuck in a generation: it would only waste it
            process.kill()
            return process.wait()

    def _send(self, job: Job) -> None:
        try:
            self._conn.send(_with_draw(job))
        except OSError as err:
            raise self._died() from err
        self._sent += 1

    def _receive(self) -> tuple[int, Answer]:
        _kind, number, answer = self._read()
        return number, answer

    def _read(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError) as err:
            raise self._died() from err

    def _died(self) -> GenerationError:
        code = self._discard()
        return GenerationError(f"the generation process for {self.model_dir} died "
                               f"(exit code {code}); it is started again on the next request")


def _serve(conn: Connection, model_dir: str, threads: int,
           cpus: frozenset[int] | None = None, max_batch: int = 1,
           kv_budget_bytes: int = 0) -> None:
    """The child: load the model, then answer jobs until the parent closes the pipe."""
    # Ctrl-C goes to the whole process group; the parent decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from optinfer.models.batching import DecodeBatch
    from optinfer.models.runtime import IntegerModel

    try:
        pin_this_thread(cpus)  # before ONNX Runtime starts its threads, which inherit it
        model = IntegerModel(model_dir, threads=threads)
        batch = DecodeBatch(model)
    except Exception as err:  # noqa: BLE001 - the parent raises it
        conn.send(("error", err))
        return
    conn.send(("ready", None))
    try:
        _decode_jobs(conn, batch, max_batch, kv_budget_bytes)
    except (EOFError, OSError):
        return  # the parent closed the pipe, or is gone


def _decode_jobs(conn: Connection, batch, max_batch: int, kv_budget_bytes: int) -> None:
    """Continuous batching: jobs join the batch as they arrive while it has room (at most
    `max_batch` sequences, and their caches at full length within `kv_budget_bytes` when it
    is set: past the budget a job waits, though a job alone always runs); each step gives
    every running job a token; a finished job's answer goes back at once, numbered in the
    order the jobs arrived."""
    waiting: collections.deque[tuple[int, Job]] = collections.deque()
    reserved: dict[int, int] = {}  # each running job's keys at its full length
    started: dict[int, float] = {}
    received = 0
    while True:
        while conn.poll(0 if (len(batch) or waiting) else None):
            waiting.append((received, conn.recv()))
            received += 1
        while waiting and len(batch) < max_batch:
            number, (prompt, max_tokens, draw) = waiting[0]
            keys = len(prompt) + max_tokens
            if kv_budget_bytes and len(batch) and (
                    (sum(reserved.values()) + keys) * batch.key_bytes() > kv_budget_bytes):
                break  # it waits for room (first come, first served)
            waiting.popleft()
            started[number] = time.perf_counter()
            try:
                batch.add(number, prompt, max_tokens, draw=draw)
            except Exception as err:  # noqa: BLE001 - the parent decides (UserError: skip)
                conn.send(("answer", number, _picklable(
                    Answer([], time.perf_counter() - started.pop(number), err))))
                continue
            reserved[number] = keys
        for step in batch.step():
            if step.done:
                reserved.pop(step.sequence)
                answer = Answer(batch.take(step.sequence),
                                time.perf_counter() - started.pop(step.sequence))
                conn.send(("answer", step.sequence, answer))


def _picklable(answer: Answer) -> Answer:
    """`answer`, or with an error that does not pickle replaced by its text."""
    if answer.error is None:
        return answer
    try:
        pickle.dumps(answer.error)
    except Exception:  # noqa: BLE001 - whatever pickling raises, the text goes instead
        error = RuntimeError(f"{type(answer.error).__name__}: {answer.error}")
        return Answer([], answer.seconds, error)
    return answer


if __name__ == "__main__":
    # Through the module's own name, so that what it pickles (Answer) unpickles in the parent.
    from optinfer.models.generation import _serve as serve

    serve(Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]),
          None if sys.argv[4] == "any" else parse_cpu_list(sys.argv[4]), int(sys.argv[5]),
          int(sys.argv[6]))
