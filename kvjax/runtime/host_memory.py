"""Host memory for the automatic host tier: what the machine can still give, and the pages of a
host tier sized from it (agreed between processes over a mesh that spans several)."""

from __future__ import annotations

import os

from kvjax.cache.config import CacheConfig
from kvjax.runtime.sharding import agreed_host_pages

__all__ = ["available_host_bytes", "host_tier_pages"]


def available_host_bytes() -> int:
    """Memory the host can still give (MemAvailable on Linux, else free physical pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_tier_pages(config: CacheConfig, *, auto_host_tier: bool = True, mesh=None) -> int:
    """Pages of the host tier: `config`'s own quota when it gives one; else, with
    `auto_host_tier`, min(device quota, half of available host memory) (`auto_host_pages`),
    the smallest count of every process over a mesh spanning several; else 0 (no host tier).

    MAX_UTILIZATION scheduling suspends requests to make room, and without a host tier their
    pages would have nowhere to go (the seed PR's fix).
    """
    if config.num_host_pages is not None:
        return config.num_host_pages
    if not auto_host_tier:
        return 0
    available = available_host_bytes()
    if mesh is None:
        return config.auto_host_pages(available)
    return agreed_host_pages(config, mesh, available)
