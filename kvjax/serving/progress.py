"""Deadlock detection: a pass that schedules nothing is expected while suspensions make room;
one that suspends nothing, or as many empty passes in a row as there are requests, means that
nothing can ever run.

Host side, no JAX.
"""

from __future__ import annotations

from collections.abc import Callable

from kvjax.cache.pages import Tier
from kvjax.cache.tiers import TieredPages
from kvjax.serving.scheduler import SchedulerOutput

__all__ = ["ProgressWatch", "memory_report"]


def memory_report(pages: TieredPages, max_num_tokens: int | None) -> str:
    """What each tier holds and the step budget, for a deadlock's message."""
    parts = []
    for tier in Tier:
        name = tier.name.lower()
        if tier not in pages.tiers:
            parts.append(f"no {name} tier")
            continue
        usable = pages.num_usable(tier)
        held = usable - pages.num_free(tier) - pages.num_evictable(tier)
        parts.append(f"{name}: {held} of {usable} pages held")
    parts.append(f"token budget {max_num_tokens} per step")
    return "; ".join(parts)


class ProgressWatch:
    """Counts consecutive scheduling passes that ran nothing. Not thread-safe.

    Args:
        describe_memory: says what the tiers hold (`memory_report`), called only for an error.
    """

    def __init__(self, describe_memory: Callable[[], str]) -> None:
        self.describe_memory = describe_memory
        self.num_empty_passes = 0

    def observe(self, output: SchedulerOutput, num_queued: int) -> None:
        """Records one pass over `num_queued` requests.

        Raises:
            RuntimeError: no request can ever be scheduled (a deadlock), saying what is short.
        """
        if not output.is_empty or output.failed_requests:
            self.num_empty_passes = 0
            return
        # Preempting requests may make room for the next pass; with nothing preempted, or
        # after as many empty passes as there are requests, nothing can ever run.
        if output.paused_requests:
            self.num_empty_passes += 1
        else:
            self.num_empty_passes = num_queued + 1
        if self.num_empty_passes > num_queued:
            raise RuntimeError(
                f"no request of {num_queued} can be scheduled ({self.describe_memory()}): give the "
                "KVCacheManager more pages where every page is held (or a host tier), or a "
                "larger token budget"
            )
