"""One background thread steps the engine; asyncio tasks await their request's progress.

The HTTP side never calls `Engine.step()`: it submits a request with an id it chose (so that its
listener is in place before the first step can report), then awaits the outputs the loop thread
hands over with `call_soon_threadsafe`. A task that stops listening (a client gone) aborts its
request, which frees its pages at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from kvjax.engine.engine import Engine
from kvjax.serving.request import RequestOutput, SamplingParams

__all__ = ["EngineLoop", "Overloaded"]

_log = logging.getLogger(__name__)


def _put(listener: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item) -> None:
    loop, queue = listener
    with contextlib.suppress(RuntimeError):  # its event loop closed: nobody waits any more
        loop.call_soon_threadsafe(queue.put_nowait, item)


class Overloaded(RuntimeError):
    """More requests wait than the server accepts (HTTP 429)."""


class EngineLoop:
    """Drives `engine` from a thread of its own.

    Thread safety: `generate` from any event loop (several at once), `close` and `num_waiting`
    from any thread; nothing else may step the engine.

    Args:
        max_waiting: requests this loop serves at once at most; one more raises `Overloaded`.
        on_finished: called in the loop thread with each finished output (metrics).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_waiting: int = 1024,
        on_finished: Callable[[RequestOutput], Any] | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._on_finished = on_finished
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._closing = False  # new requests are refused
        self._stopped = False  # the thread ends
        self._thread = threading.Thread(target=self._run, name="kvjax-engine", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return self.engine.num_unfinished

    @property
    def alive(self) -> bool:
        """The loop thread runs (a server whose loop died should fail its health check)."""
        return self._thread.is_alive() and not self._stopped

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.num_unfinished:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # no request can progress: each listener learns why
                _log.exception("an engine step failed; aborting the requests being served")
                self._fail_all(error)
                continue
            for output in outputs:
                try:
                    self._deliver(output)
                except Exception:  # one listener's trouble must not stop the loop
                    _log.exception("delivering request %d's output failed", output.request_id)

    def _deliver(self, output: RequestOutput) -> None:
        if output.finished and self._on_finished is not None:
            self._on_finished(output)
        with self._lock:
            listener = self._listeners.get(output.request_id)
        if listener is not None:
            _put(listener, output)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            listeners = list(self._listeners.items())
        for request_id, listener in listeners:
            self._abort([request_id])
            _put(listener, error)

    async def generate(
        self, prompt, params: SamplingParams, n: int = 1, **request_options
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Submits `n` samples of a request (`Engine.add_samples`) and yields (sample index,
        output) as they progress (with `stream=True` in `request_options`; else only their
        ends), until every sample finished. Leaving early (the consumer cancelled or closed)
        aborts the samples still running.

        Raises:
            Overloaded: `max_waiting` requests already wait.
            ValueError: a bad request (nothing is queued).
            RuntimeError: the engine failed while serving it.
        """
        with self._lock:  # consecutive: a response's id is its first sample's
            ids = [next(self._ids) for _ in range(n)]
        queue = self._listen(ids)
        # The prompt is tokenized in a worker thread, off the event loop. A cancel while it
        # runs waits for it, so that the abort below finds the requests it submitted.
        submit = asyncio.ensure_future(asyncio.to_thread(
            self.engine.add_samples, prompt, params, n, request_ids=ids, **request_options
        ))  # fmt: skip
        unfinished = set(ids)
        try:
            await asyncio.shield(submit)
            self._wake.set()
            while unfinished:
                output = await queue.get()
                if isinstance(output, Exception):
                    raise RuntimeError(f"the engine failed: {output}") from output
                if output.finished:
                    unfinished.discard(output.request_id)
                yield ids.index(output.request_id), output
        finally:
            with self._lock:
                for request_id in ids:
                    self._listeners.pop(request_id, None)
            if unfinished:
                with contextlib.suppress(BaseException):
                    await submit
                await asyncio.shield(asyncio.to_thread(self._abort, unfinished))

    def _listen(self, request_ids: list[int]) -> asyncio.Queue:
        """One queue for the outputs of a request's samples, registered before they are
        submitted (so that no output can come first); raises when the server is closing, dead
        or full (`max_waiting` counts samples)."""
        if self._closing or not self._thread.is_alive():
            raise RuntimeError("the server is shutting down or its engine loop stopped")
        queue: asyncio.Queue = asyncio.Queue()
        listener = (asyncio.get_running_loop(), queue)
        with self._lock:  # the count and the registration together: the bound is exact
            if len(self._listeners) + len(request_ids) > self.max_waiting:
                raise Overloaded(f"{len(self._listeners)} requests wait (max {self.max_waiting})")
            self._listeners.update(dict.fromkeys(request_ids, listener))
        return queue

    def _abort(self, request_ids) -> None:
        for request_id in request_ids:
            with contextlib.suppress(ValueError):  # never queued (refused), or finished
                self.engine.abort(request_id)

    def close(self, timeout: float = 30.0) -> None:
        """Refuses new requests, lets running ones finish for up to `timeout` seconds, aborts
        the rest (their listeners get an error), stops the thread and shuts the engine down."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while self.engine.num_unfinished and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopped = True
        self._wake.set()
        self._thread.join()
        self._fail_all(RuntimeError("the server shut down"))
        self.engine.shutdown()
