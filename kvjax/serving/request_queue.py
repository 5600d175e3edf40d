"""The engine's requests: new ones wait in a pending queue until the stepping thread admits them
at the start of a step, so that requests can be added from any thread while another steps.

Parallel samples of one prompt (`submit_group`) share its KV through the prefix cache: the first
sample is admitted alone, the others are held back until its prompt has been computed (its
blocks are then in the radix tree), so the prompt is computed once.

Host side, no JAX.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from kvjax.cache.checks import check_int
from kvjax.serving.intake import RequestIntake
from kvjax.serving.request import Request, RequestOutput, RequestState

__all__ = ["MAX_SAMPLES", "RequestQueue"]

MAX_SAMPLES = 128  # parallel samples of one prompt (OpenAI's limit on n)


class _Taken:
    """The request ids in use, pending or live (what the door refuses to give twice)."""

    def __init__(self, *groups: dict[int, Request]) -> None:
        self._groups = groups

    def __contains__(self, request_id: object) -> bool:
        return any(request_id in group for group in self._groups)


class RequestQueue:
    """Pending and live requests, and finished outputs not yet returned.

    Thread safety: `submit`, `withdraw` of a pending request, `close` and `len()` are safe from
    any thread. `admit`, `finish`, `withdraw` of a live request and the finished outputs belong
    to the stepping thread (the engine serializes them with its step lock).

    Args:
        intake: checks and makes each request's record (called under the queue's lock).
    """

    def __init__(self, intake: RequestIntake) -> None:
        self._intake = intake
        self._lock = threading.Lock()
        self._pending: dict[int, Request] = {}  # submitted, not yet seen by a step
        # Samples held until their first sibling's prompt is computed: id -> (request, first).
        self._held: dict[int, tuple[Request, Request]] = {}
        self._live: dict[int, Request] = {}  # admitted, in arrival order
        self._unreturned: list[RequestOutput] = []  # finished, not yet handed to the caller
        self.closed = False

    def submit(self, *args, **options) -> int:
        """Checks and queues a request (`RequestIntake.make_request` arguments); returns its id.

        Raises:
            RuntimeError: the queue is closed (the engine shut down).
            ValueError: a bad request; nothing is queued.
        """
        with self._lock:
            self._check_open()
            request = self._make(*args, **options)
            self._pending[request.request_id] = request
        return request.request_id

    def submit_group(
        self, n: int, prompt, params, request_ids: Sequence[int] | None = None, **options
    ) -> list[int]:
        """Checks and queues `n` samples of one prompt (`RequestIntake.make_request` arguments,
        `request_ids` for their ids, default new ones); returns their ids. A seeded `params`
        gives sample i the seed `seed + i`; unseeded samples each draw one. Samples after the
        first are held until the first's prompt is computed (see the module docstring); only
        the first scores the prompt (`prompt_logprobs`).

        Raises:
            RuntimeError: the queue is closed.
            ValueError: a bad request or `n`; nothing is queued.
        """
        check_int("n", n, minimum=1, maximum=MAX_SAMPLES)
        with self._lock:
            self._check_open()
            if request_ids is not None and (len(request_ids) != n or len(set(request_ids)) != n):
                raise ValueError(f"request_ids={list(request_ids)!r} must be {n} distinct ids")
            ids = [None] * n if request_ids is None else list(request_ids)
            first = self._make(prompt, params, request_id=ids[0], **options)
            group = [first]
            try:
                for index in range(1, n):
                    sample_params = params
                    if params is not None:  # the first scores the prompt, if asked
                        seed = None if params.seed is None else (params.seed + index) % 2**32
                        sample_params = dataclasses.replace(params, prompt_logprobs=None, seed=seed)
                    sample = self._make(
                        first.prompt_token_ids, sample_params, request_id=ids[index], **options
                    )
                    self._held[sample.request_id] = (sample, first)
                    group.append(sample)
            except Exception:
                for sample in group[1:]:
                    del self._held[sample.request_id]
                raise
            self._pending[first.request_id] = first
        return [request.request_id for request in group]

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("add_request() after shutdown(): this engine serves no more")

    def _make(self, *args, **options) -> Request:
        taken = _Taken(self._pending, self._live, self._held)
        return self._intake.make_request(*args, live=taken, **options)

    def admit(self) -> list[Request]:
        """Pending requests become live, and held samples whose first sibling's prompt is
        computed (or that ended); returns every live request, oldest first."""
        with self._lock:
            self._live.update(self._pending)
            self._pending.clear()
            for request_id, (sample, first) in list(self._held.items()):
                if first.state is not RequestState.CONTEXT_INIT:
                    self._live[request_id] = sample
                    del self._held[request_id]
            return list(self._live.values())

    def withdraw(self, request_id: int) -> tuple[Request, bool]:
        """Takes a request out of the queue: (its record, whether it was live).

        Raises:
            ValueError: no pending or live request has this id.
        """
        with self._lock:
            request = self._pending.pop(request_id, None)
            if request is None and request_id in self._held:
                request = self._held.pop(request_id)[0]
            if request is not None:
                return request, False
            request = self._live.pop(request_id, None)
        if request is None:
            raise ValueError(f"request_id={request_id!r} is not live")
        return request, True

    def finish(self, request: Request, output: RequestOutput) -> None:
        """A live request finished: its output waits in `take_finished` until returned."""
        with self._lock:
            del self._live[request.request_id]
        self._unreturned.append(output)

    def report(self, requests: Sequence[Request]) -> None:
        """Progress of streamed requests still running: returned by the next take."""
        self._unreturned += [r.output() for r in requests if r.stream and r.has_news]

    def put_back(self, outputs: Sequence[RequestOutput]) -> None:
        """Outputs taken but not for the taker (e.g. `generate`): returned by the next take."""
        self._unreturned[:0] = outputs

    def take_finished(self) -> list[RequestOutput]:
        """The outputs not returned yet (finished requests', and streamed requests' progress),
        in the order they came."""
        outputs, self._unreturned = self._unreturned, []
        return outputs

    def live(self) -> list[Request]:
        """The admitted requests, oldest first (a snapshot, for checks)."""
        with self._lock:
            return list(self._live.values())

    def counts(self) -> tuple[int, int]:
        """(running, waiting): live requests holding device pages, and the rest (queued, not
        started yet, or suspended)."""
        with self._lock:
            running = sum(
                1 for r in self._live.values() if r.cache is not None and r.cache.is_active
            )
            return running, len(self._pending) + len(self._held) + len(self._live) - running

    def live_ids(self) -> list[int]:
        with self._lock:
            return [*self._live, *self._pending, *self._held]

    def close(self) -> None:
        """Refuses later submissions."""
        with self._lock:
            self.closed = True

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._held) + len(self._live)
