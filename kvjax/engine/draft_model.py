"""The draft-model drafter: a smaller model of the family proposes drafts greedily, on its own
KV cache manager whose caches mirror the target's requests.

Each request gets a draft cache when it is first drafted for; it is suspended when the target
suspends the request and closed when the request ends, and its blocks go to the draft manager's
radix tree (a shared system prompt is computed once by the draft model too). A propose call
first brings every draft cache up to the target's confirmed tokens in one ragged step: the
drafts it fed last time that the target accepted keep their KV, the rest is rewound by
shrinking capacity, and what is missing (the whole prompt, the first time) is fed, chunked to
`max_num_tokens` per call; its last logits give the first draft. Then one single-token step per
further draft. Proposals are the draft model's argmax (point proposals, see
`kvjax.serving.speculative`). A draft cache that cannot get pages proposes nothing that step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kvjax.cache.config import CacheConfig
from kvjax.cache.kv_cache import KVCache
from kvjax.cache.manager import KVCacheManager
from kvjax.engine.assembly import new_manager
from kvjax.engine.batch import pack_rows
from kvjax.engine.compile import compile_steps, model_registry
from kvjax.engine.geometry import check_model_geometry
from kvjax.runtime.buckets import Buckets, default_buckets
from kvjax.runtime.sharding import check_heads
from kvjax.runtime.step import allow_compile
from kvjax.serving.request import Request
from kvjax.serving.speculative import DraftLimits

__all__ = ["DraftModelDrafter"]


@dataclasses.dataclass
class _DraftSequence:
    request_id: int
    cache: KVCache
    fed: list[int]  # tokens whose KV the draft cache holds, position by position


@dataclasses.dataclass
class _Row:
    sequence: _DraftSequence
    tokens: list[int]  # fed this step
    wants: int  # drafts still to propose for it (0: only catching up)


def _argmax(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class DraftModelDrafter:
    """Proposes drafts with `model` (same vocabulary as the target). It takes the target
    engine's limits when the engine binds it (`bind`): its cache manager, step registry and
    compiled steps are built then, inside the engine's construction.

    Not thread-safe: the engine's stepping thread drives it.

    Args:
        model: the draft model (follows the model protocol of `kvjax.engine.Engine`).
        cache_config: its pages (`cache_config_for(model, ...)`); the draft manager's quotas.
        buckets: the draft model's step shapes (default: powers of two up to the engine's batch
            size and token budget, as the engine's own).
        impl, interpret: kernel choice, as for the engine.
        mesh: the target engine's mesh under tensor parallelism (required when it spans
            several processes): the draft model and its pool are sharded like the target's.
    """

    def __init__(
        self,
        model: nnx.Module,
        cache_config: CacheConfig,
        *,
        buckets: Buckets | None = None,
        impl: str | None = None,
        interpret: bool | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        check_model_geometry(model, cache_config)
        if mesh is not None:
            check_heads(model.config.num_heads, model.config.num_kv_heads, mesh)
        self.model, self.cache_config, self.buckets = model, cache_config, buckets
        self.mesh = mesh
        self.vocab_size = model.config.vocab_size
        self._options = {"impl": impl, "interpret": interpret, "mesh": mesh}
        self.manager: KVCacheManager | None = None
        self._sequences: dict[int, _DraftSequence] = {}
        self.num_steps = 0  # draft model steps run

    def bind(self, limits: DraftLimits) -> None:
        """Builds the draft cache manager and compiles every draft step for the engine's
        `limits`; a drafter serves one engine. Raises, with nothing kept, when the buckets
        cannot hold a catch-up step of the engine's batch and token budget."""
        if self.manager is not None:
            raise RuntimeError("this DraftModelDrafter is bound to an engine already")
        batch, budget = limits.max_batch_size, limits.max_num_tokens
        if budget < batch:
            raise ValueError(f"max_num_tokens={budget} < max_batch_size={batch}")
        buckets = self.buckets or default_buckets(batch, budget)
        buckets.pad(batch, budget)  # raises naming the largest bucket when none holds it
        config = self.cache_config
        # The target's sequences may be longer than the draft device holds: such requests get
        # no drafts (see `_catch_up_row`), so the draft manager takes what its device holds.
        device_tokens = (config.num_device_pages - 1) * config.tokens_per_block
        manager = new_manager(
            config, self.mesh, max_seq_len=min(limits.max_seq_len, device_tokens),
            max_total_draft_tokens=limits.max_draft_tokens,
        )  # fmt: skip
        try:
            registry, params = model_registry(self.model, on_logits=_argmax, **self._options)
            with allow_compile():
                compile_steps(registry, params, manager, buckets.keys)
        except BaseException:
            manager.shutdown()
            raise
        self.buckets, self.max_num_tokens, self.manager = buckets, budget, manager
        self.registry, self._params = registry, params

    # -- Drafter ------------------------------------------------------------------------------

    def propose(self, requests: Sequence[Request], max_lens: Sequence[int]) -> list[list[int]]:
        drafts: dict[int, list[int]] = {}
        rows: list[_Row] = []
        budget = self.max_num_tokens
        for request, k in zip(requests, max_lens, strict=True):
            if len(rows) == self.buckets.batch_sizes[-1] or budget == 0:
                break
            row = self._catch_up_row(request, k, budget)
            if row is not None:
                rows.append(row)
                budget -= len(row.tokens)
                drafts[request.request_id] = []
        # Each step's argmax is the next draft of its row; rows wanting more feed it back.
        while rows:
            next_rows = []
            for row, token in zip(rows, self._run(rows), strict=True):
                if row.wants:
                    drafts[row.sequence.request_id].append(int(token))
                    row.wants -= 1
                    row.tokens = [int(token)]
                    if row.wants:
                        next_rows.append(row)
            rows = next_rows
        return [drafts.get(r.request_id, []) for r in requests]

    def suspend(self, request: Request) -> None:
        sequence = self._sequences.get(request.request_id)
        if sequence is not None and sequence.cache.is_active:
            sequence.cache.suspend()

    def release(self, request: Request) -> None:
        sequence = self._sequences.pop(request.request_id, None)
        if sequence is not None:
            sequence.cache.close()

    def shutdown(self) -> None:
        for sequence in self._sequences.values():
            sequence.cache.close()
        self._sequences.clear()
        if self.manager is not None:
            self.manager.shutdown()

    # -- catching up --------------------------------------------------------------------------

    def _catch_up_row(self, request: Request, wants: int, budget: int) -> _Row | None:
        """The tokens to feed for `request` this call (with room for `wants` drafts after
        them), or None when its draft cache gets no pages."""
        tokens = [*request.prompt_token_ids, *request.output_token_ids]
        keys = [*request.key_tokens, *request.output_token_ids]
        manager = self.manager
        room = manager.max_blocks * manager.config.tokens_per_block
        if len(tokens) - 1 > manager.max_seq_len or len(tokens) + wants > room:
            return None  # longer than the draft device holds (its max_seq_len was clamped)
        sequence = self._sequences.get(request.request_id)
        if sequence is None:
            cache = self.manager.create_kv_cache(
                keys[:-1], lora_id=request.lora_id, salt=request.salt, priority=request.priority
            )
            # Kept even when the device refuses the resume: a later call resumes it.
            sequence = _DraftSequence(
                request.request_id, cache, tokens[: cache.num_committed_tokens]
            )
            self._sequences[request.request_id] = sequence
        cache = sequence.cache
        if not cache.is_active and not cache.resume():
            return None
        # Fed tokens the target confirmed keep their KV (the last confirmed token is fed
        # again: its logits give the first draft).
        valid = cache.history_length
        limit = min(len(sequence.fed), len(tokens) - 1)
        while valid < limit and sequence.fed[valid] == tokens[valid]:
            valid += 1
        del sequence.fed[valid:]
        feed = tokens[valid : valid + budget]
        wants = wants if valid + len(feed) == len(tokens) else 0
        needed = valid + len(feed) + max(wants - 1, 0)
        history = max(cache.history_length, valid)
        if not cache.resize(capacity=max(needed, history)):
            return None
        cache.commit(keys[cache.num_committed_tokens : valid])  # confirmed, with KV: to the tree
        return _Row(sequence, feed, wants)

    def _run(self, rows: list[_Row]) -> np.ndarray:
        """One draft-model step over `rows`; the argmax after each row's last token."""
        num_seqs = len(rows)
        key = self.buckets.pad(num_seqs, sum(len(row.tokens) for row in rows))
        inputs = pack_rows(
            [row.tokens for row in rows],
            [len(row.sequence.fed) + len(row.tokens) for row in rows],
            [row.sequence.cache for row in rows],
            self.manager,
            key,
        )
        tokens, self.manager.pool = self.registry(self._params, self.manager.pool, inputs)
        for row in rows:  # their KV is written now
            row.sequence.fed += row.tokens
        self.num_steps += 1
        return np.asarray(tokens)[:num_seqs]
