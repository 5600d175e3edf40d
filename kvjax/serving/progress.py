"""Deadlock detection: a pass that schedules nothing is expected while suspensions make room;
one that suspends nothing, or as many empty passes in a row as there are requests, means that
nothing can ever run.

Host side, no JAX.
"""

from __future__ import annotations

from kvjax.serving.scheduler import SchedulerOutput

__all__ = ["ProgressWatch"]


class ProgressWatch:
    """Counts consecutive scheduling passes that ran nothing. Not thread-safe."""

    def __init__(self) -> None:
        self.num_empty_passes = 0

    def observe(self, output: SchedulerOutput, num_queued: int, device_utilization: float) -> None:
        """Records one pass over `num_queued` requests.

        Raises:
            RuntimeError: no request can ever be scheduled (a deadlock), saying what to change.
        """
        if not output.is_empty:
            self.num_empty_passes = 0
            return
        # Suspending requests may make room for the next pass; with nothing suspended, or
        # after as many empty passes as there are requests, nothing can ever run.
        if output.paused_requests:
            self.num_empty_passes += 1
        else:
            self.num_empty_passes = num_queued + 1
        if self.num_empty_passes > num_queued:
            raise RuntimeError(
                f"no request of {num_queued} can be scheduled; device utilization "
                f"{device_utilization:.0%}: give the KVCacheManager more "
                "device pages or a host tier, or lower max_num_tokens"
            )
