"""What a `GroupedKVCacheManager` shows in place of one manager's pages and storage: counts over
every group's tiers, in pages of every layer (a group's page holds its share of the layers),
and the storage calls the engine makes of all the groups' storages. Host side, no JAX."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvjax.cache.pages import Tier

__all__ = ["GroupedPages", "GroupedStorage"]


class GroupedPages:
    """Every group's tiers counted as pages of every layer: a group of `L_g` of `L` layers
    counts `L_g / L` per page, so counts and utilization are shares of the bytes."""

    def __init__(self, managers: Sequence[Any]) -> None:
        total = sum(manager.config.num_layers for manager in managers)
        self._parts = [(m.pages, m.config.num_layers / total) for m in managers]

    @property
    def tiers(self) -> list[Tier]:
        return self._parts[0][0].tiers

    def _sum(self, method: str, tier: Tier) -> int:
        return round(sum(getattr(pages, method)(tier) * share for pages, share in self._parts))

    def num_usable(self, tier: Tier) -> int:
        return self._sum("num_usable", tier)

    def num_free(self, tier: Tier) -> int:
        return self._sum("num_free", tier)

    def num_evictable(self, tier: Tier) -> int:
        return self._sum("num_evictable", tier)

    def utilization(self, tier: Tier = Tier.DEVICE) -> float:
        used = sum(
            (pages.num_usable(tier) - pages.num_free(tier)) * share for pages, share in self._parts
        )
        usable = sum(pages.num_usable(tier) * share for pages, share in self._parts)
        return used / usable if usable else 0.0


class GroupedStorage:
    """The storage calls an engine makes, on every group's storage."""

    def __init__(self, managers: Sequence[Any]) -> None:
        self._storages = [manager.storage for manager in managers]

    def warmup(self) -> None:
        for storage in self._storages:
            storage.warmup()

    def reset_pool(self) -> None:
        for storage in self._storages:
            storage.reset_pool()
