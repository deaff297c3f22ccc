"""Greedy generation in a process of its own, for a server that does other Python work.

ONNX Runtime releases the GIL while it computes a token, but takes it back to return each
one: in a process where another thread runs Python (a provider committing its last answer:
signing, JSON-RPC, the database), every token waits for that thread to let go. Measured on
tiny-r1, 2 cores: a thread busy a third of the time makes generation 1.5x slower; the same
work in another process, 1.04x. :class:`GenerationProcess` keeps the model's decode session
in a child process, so a server's own threads never stand between two tokens.

:meth:`GenerationProcess.stream` keeps the next job queued in the child while the parent
reads the previous answer, so the child never waits on the parent either.
"""

from __future__ import annotations

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

Job = tuple[list[int], int]
"""One generation: (prompt tokens, max tokens)."""



@dataclass(frozen=True)
class Answer:
    """A job's output tokens and the seconds the model took, or the error it raised (a
    UserError for a prompt the model refuses)."""

    output: list[int]
    seconds: float
    error: Exception | None = None

QUEUED_JOBS = 2
"""Jobs in the child's pipe at a time: one computing, one waiting."""


def generate_in_process(model, jobs: Iterable[Job]) -> Iterator[Answer]:
    """:meth:`GenerationProcess.stream` for a model of this process."""
    for prompt, max_tokens in jobs:
        started = time.perf_counter()
        try:
            output = model.generate(prompt, max_tokens)
        except Exception as err:  # noqa: BLE001 - the caller decides
            yield Answer([], time.perf_counter() - started, err)
        else:
            yield Answer(output, time.perf_counter() - started)


class GenerationError(RuntimeError):
    """The generation process died or could not load its model."""


class GenerationProcess:
    """An :class:`~optinfer.models.runtime.IntegerModel` of `model_dir` generating greedily
    in a child process. Safe to share between threads (one stream at a time); a child that
    dies is started again on the next use. :meth:`close` ends it; so does the parent's end,
    SIGKILL included (the child stops when its pipe closes)."""

    def __init__(self, model_dir: Path | str, threads: int = 1):
        self.model_dir = str(model_dir)
        self.threads = threads
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        with self._lock:
            self._start()

    def generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        (answer,) = self.stream([(prompt, max_tokens)])
        if answer.error is not None:
            raise answer.error
        return answer.output

    def stream(self, jobs: Iterable[Job]) -> Iterator[Answer]:
        """The answers to `jobs`, in order; GenerationError when the child dies."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            queued = 0
            try:
                for job in jobs:
                    self._send(job)
                    queued += 1
                    if queued == QUEUED_JOBS:
                        queued -= 1
                        yield self._receive()
                while queued:
                    queued -= 1
                    yield self._receive()
            finally:
                # An abandoned stream leaves answers in the pipe: read them, or the next
                # stream would take them for its own.
                try:
                    for _ in range(queued):
                        self._receive()
                except GenerationError:
                    pass  # nothing left to read

    def close(self) -> None:
        with self._lock:
            self._discard()

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
        with child_end:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(child_end.fileno()), self.model_dir,
                 str(self.threads)], pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL,
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
            self._conn.send((list(job[0]), int(job[1])))
        except OSError as err:
            raise self._died() from err

    def _receive(self) -> Answer:
        return self._read()[1]

    def _read(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError) as err:
            raise self._died() from err

    def _died(self) -> GenerationError:
        code = self._discard()
        return GenerationError(f"the generation process for {self.model_dir} died "
                               f"(exit code {code}); it is started again on the next request")


def _serve(conn: Connection, model_dir: str, threads: int) -> None:
    """The child: load the model, then answer jobs until the parent closes the pipe."""
    # Ctrl-C goes to the whole process group; the parent decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from optinfer.models.runtime import IntegerModel

    try:
        model = IntegerModel(model_dir, threads=threads)
        model.session("decode")
    except Exception as err:  # noqa: BLE001 - the parent raises it
        conn.send(("error", err))
        return
    conn.send(("ready", None))
    while True:
        try:
            prompt, max_tokens = conn.recv()
        except (EOFError, OSError):
            return
        (answer,) = generate_in_process(model, [(prompt, max_tokens)])
        try:
            conn.send(("answer", _picklable(answer)))
        except OSError:  # the parent is gone
            return


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

    serve(Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]))
