"""What one scheduling pass may still spend: tokens, request slots and LoRA device pages.

Host side, no JAX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvjax.serving.scheduler import SchedulerConfig

__all__ = ["BudgetTracker"]


class BudgetTracker:
    """Tokens, request slots and LoRA device pages left in one pass.

    Args:
        lora_pages: device pages each adapter takes (adapters not listed take none).
    """

    def __init__(self, config: SchedulerConfig, lora_pages: Mapping[int, int]) -> None:
        limit = config.max_num_tokens
        self.tokens_left: float = math.inf if limit is None else limit
        self.num_requests = 0
        self.max_requests = config.max_batch_size
        self._max_lora_pages = config.max_lora_pages
        self._lora_pages = lora_pages
        self._loaded: set[int] = set()
        self.lora_pages_used = 0

    @property
    def is_full(self) -> bool:
        return self.num_requests >= self.max_requests

    def lora_pages_needed(self, lora_id: int | None) -> int | None:
        """Pages the request's adapter adds (0 if loaded or none); None when they don't fit."""
        if lora_id is None or lora_id in self._loaded:
            return 0
        pages = self._lora_pages.get(lora_id, 0)
        if self._max_lora_pages is not None and self.lora_pages_used + pages > self._max_lora_pages:
            return None
        return pages

    def pre_claim_lora(self, lora_id: int | None) -> None:
        """Charges an adapter without scheduling a request (it is still in use)."""
        pages = self.lora_pages_needed(lora_id)
        if lora_id is not None and pages:
            self._loaded.add(lora_id)
            self.lora_pages_used += pages

    def commit(self, num_tokens: int, lora_id: int | None, lora_pages: int) -> None:
        self.tokens_left -= num_tokens
        self.num_requests += 1
        if lora_id is not None:
            self._loaded.add(lora_id)
            self.lora_pages_used += lora_pages
