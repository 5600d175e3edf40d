"""The serving loop: requests in, tokens out, through the scheduler, the cache and compiled steps.

Each `step()`: the scheduler decides (and the cache moves pages as it does), the batch is padded
to a compiled bucket and run with the pool donated, tokens are sampled on the device, prompt
tokens are committed for reuse, finished requests are closed (their blocks stay in the radix tree
as cache). Every step shape is compiled at construction; serving never compiles.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from kvjax.cache.config import CacheConfig
from kvjax.cache.manager import KVCacheManager
from kvjax.cache.multimodal import MultimodalItem, splice_multimodal_tokens
from kvjax.engine.batch import build_step_batch
from kvjax.engine.setup import (
    CompileCounter,
    check_model_geometry,
    check_speculative,
    default_buckets,
    model_registry,
    warm_up,
)
from kvjax.runtime.sampling import SamplingInputs
from kvjax.runtime.sharding import (
    check_heads,
    check_same_on_every_process,
    spans_processes,
    tensor_parallel_mesh,
)
from kvjax.runtime.step import Buckets
from kvjax.runtime.storage import KVStorage
from kvjax.serving.metrics import EngineMetrics
from kvjax.serving.request import FinishReason, Request, RequestOutput, RequestState, SamplingParams
from kvjax.serving.resources import CacheResources
from kvjax.serving.scheduler import Scheduler, SchedulerConfig
from kvjax.serving.speculative import DraftPlanner, SpeculativeConfig

__all__ = ["Engine"]


def _quotas(config: CacheConfig) -> dict:
    """What of a `CacheConfig` every process must share (the disk tier's directory may differ)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields["disk_dir"] = config.disk_dir is not None
    return fields


class Engine:
    """Serves requests with a model that follows the model protocol (`models.llama.Llama`):
    `model(inputs, kv_pool, impl=, interpret=) -> (logits, kv_pool)` and a `config` with
    `vocab_size`, `num_layers`, `num_kv_heads`, `head_dim`.

    Args:
        model: the NNX module (e.g. from `models.loader.load_hf_checkpoint`).
        cache_config: pages and quotas; `kvjax.engine.setup.cache_config_for(model, ...)` derives
            the geometry from the model so only the quotas need choosing.
        scheduler_config: batch and token limits and the policy.
        buckets: the step shapes to compile (default: from `scheduler_config`).
        max_seq_len: the longest prompt plus output (default: what the device holds).
        enable_block_reuse: prefix reuse through the radix tree.
        commit_generated: also commit generated tokens, so follow-up turns reuse them.
        lora_pages: the known LoRA adapters and the device pages each takes (the scheduler's
            LoRA budget); requests naming another id are refused.
        eos_token_ids: tokens that end a request unless it ignores EOS (default the model
            config's `eos_token_ids`, if any).
        impl, interpret: kernel choice (default Pallas on a GPU, XLA elsewhere).
        seed: draws the seeds of requests that give none.
        speculative: a drafter and draft lengths; each step then verifies every generation
            request's drafts (padded to the step's draft length) in one ragged step.
        tensor_parallel: shard over this many devices (or this `jax.sharding.Mesh`, axis
            `kvjax.runtime.sharding.TP_AXIS`): the pool over KV heads, the weights by the model's
            `partition_specs()`; the scheduler and the cache manager stay single. Under
            `jax.distributed.initialize()` the devices of every process count: each process
            builds the same engine and adds the same requests in the same order, so all make
            the same scheduling decisions and page ids without exchanging them.
        check_agreement: a mesh of several processes only: before each step runs, check that
            every process scheduled the same batch and moved the same pages (a collective per
            step; a debugging aid). The configuration is always checked once, at construction.
            After a mismatch (`RuntimeError`) the processes' caches differ: shut the engine down.
    """

    def __init__(
        self,
        model: nnx.Module,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig | None = None,
        buckets: Buckets | None = None,
        *,
        max_seq_len: int | None = None,
        enable_block_reuse: bool = True,
        commit_generated: bool = False,
        lora_pages: Mapping[int, int] | None = None,
        eos_token_ids: Sequence[int] | None = None,
        impl: str | None = None,
        interpret: bool | None = None,
        seed: int = 0,
        speculative: SpeculativeConfig | None = None,
        tensor_parallel: int | Mesh | None = None,
        check_agreement: bool = False,
    ) -> None:
        self.scheduler_config = scheduler_config or SchedulerConfig()
        check_model_geometry(model, cache_config)
        self.mesh = None if tensor_parallel is None else tensor_parallel_mesh(tensor_parallel)
        if self.mesh is not None:
            check_heads(model.config.num_heads, model.config.num_kv_heads, self.mesh)
        self.vocab_size = model.config.vocab_size
        if eos_token_ids is None:
            eos_token_ids = getattr(model.config, "eos_token_ids", ())
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.speculative = speculative
        draft_lengths = check_speculative(speculative, self.scheduler_config)
        self.buckets = buckets or default_buckets(self.scheduler_config, draft_lengths)
        missing = sorted(set(draft_lengths) - set(self.buckets.draft_lengths))
        if missing:
            raise ValueError(
                f"draft lengths {missing} of the speculative config are not in "
                f"buckets.draft_lengths={self.buckets.draft_lengths}"
            )
        draft_vocab = getattr(speculative and speculative.drafter, "vocab_size", None)
        if draft_vocab is not None and draft_vocab != self.vocab_size:
            raise ValueError(
                f"the draft model's vocab_size={draft_vocab} differs from the target's "
                f"{self.vocab_size}"
            )
        drafter_mesh = getattr(speculative and speculative.drafter, "mesh", self.mesh)
        self.lockstep = spans_processes(self.mesh)
        if self.lockstep and drafter_mesh != self.mesh:
            raise ValueError(
                "across several processes the draft model must be sharded on the engine's mesh: "
                "build it with DraftModelDrafter(..., mesh=engine mesh)"
            )
        if self.lockstep:  # before any other collective: a mismatch fails here, clearly
            options = (max_seq_len, enable_block_reuse, commit_generated, impl, interpret, seed)
            check_same_on_every_process(
                "the engine's configuration", model.config, _quotas(cache_config),
                self.scheduler_config, self.buckets.keys, draft_lengths, options,
                sorted((lora_pages or {}).items()), sorted(self.eos_token_ids),
                [(d.id, d.process_index) for d in self.mesh.devices.flat], self.mesh.axis_names,
            )  # fmt: skip
        max_draft = draft_lengths[-1]
        self.manager = KVCacheManager(
            cache_config, KVStorage.for_config(cache_config, mesh=self.mesh),
            max_seq_len=max_seq_len, max_total_draft_tokens=max_draft,
        )  # fmt: skip
        try:
            self.resources = CacheResources(
                self.manager,
                enable_block_reuse=enable_block_reuse,
                commit_generated=commit_generated,
                max_draft_tokens=max_draft,
            )
            self.lora_pages = dict(lora_pages or {})
            self.scheduler = Scheduler(self.scheduler_config, self.resources, self.lora_pages)
            self.registry, self._params = model_registry(
                model, impl=impl, interpret=interpret, mesh=self.mesh
            )
            self.compiles = CompileCounter()
            warm_up(
                self.registry, self._params, self.manager, self.buckets, self.scheduler_config,
                self.mesh,
            )  # fmt: skip
            self.compiles.mark_warm()
        except BaseException:
            self.manager.shutdown()
            if hasattr(self, "compiles"):
                self.compiles.close()
            raise
        self.metrics = EngineMetrics(self.manager)
        self._drafting = speculative and DraftPlanner(
            speculative, self.resources, self.scheduler_config, self.vocab_size
        )
        self._requests: dict[int, Request] = {}  # live requests in arrival order
        self._rng = np.random.default_rng(seed)
        self._next_id = 0
        self._empty_steps = 0  # consecutive passes that scheduled nothing
        self.check_agreement = check_agreement and self.lockstep

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        prompt_token_ids: Sequence[int] | np.ndarray,
        sampling_params: SamplingParams | None = None,
        *,
        request_id: int | None = None,
        lora_id: int | None = None,
        salt: int | bytes | str | None = None,
        priority: int | None = None,
        multimodal_items: Sequence[MultimodalItem] = (),
    ) -> int:
        """Queues a request and returns its id; nothing is allocated until it is scheduled.

        Raises:
            ValueError: a prompt that is empty, holds a token outside the vocabulary or leaves
                no room below `max_seq_len`; an unknown LoRA id; a taken request id; bad
                sampling parameters or multimodal items.
        """
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params={params!r} is not a SamplingParams")
        prompt = [int(t) for t in np.asarray(prompt_token_ids).reshape(-1)]
        max_seq_len = self.manager.max_seq_len
        if not 1 <= len(prompt) < max_seq_len:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens must have 1 to {max_seq_len - 1} tokens "
                f"(max_seq_len={max_seq_len} leaves room for one generated token)"
            )
        config = self.scheduler_config
        if not config.enable_chunked_prefill and len(prompt) > min(
            config.context_limit, config.max_num_tokens or np.inf
        ):
            raise ValueError(
                f"a prompt of {len(prompt)} tokens exceeds the per-step token budget "
                f"{config.max_num_tokens} and chunked prefill is off"
            )
        key_tokens = splice_multimodal_tokens(prompt, multimodal_items, self.vocab_size)
        if lora_id is not None and lora_id not in self.lora_pages:
            raise ValueError(f"lora_id={lora_id!r} is unknown; known: {sorted(self.lora_pages)}")
        if request_id is None:
            request_id = self._next_id
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id} is already live")
        self._next_id = max(self._next_id, request_id + 1)
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(self._rng.integers(2**32)))
        request = Request(
            request_id, prompt, params, lora_id=lora_id, salt=salt, priority=priority,
            multimodal_items=tuple(multimodal_items), key_tokens=key_tokens,
            arrival_time=time.perf_counter(),
        )  # fmt: skip
        self._requests[request_id] = request
        return request_id

    def abort(self, request_id: int) -> RequestOutput:
        """Stops a live request and frees its pages; returns what it generated."""
        request = self._requests.pop(request_id, None)
        if request is None:
            raise ValueError(f"request_id={request_id} is not live")
        self._release(request)
        request.state = RequestState.COMPLETE
        return request.output()

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    # -- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the requests that finished in it.

        Raises:
            RuntimeError: requests wait but none can be scheduled (a deadlock).
        """
        if not self._requests:
            return []
        queue = list(self._requests.values())
        drafting = self._drafting
        draft_len = drafting.propose(queue) if drafting else 0
        output = self.scheduler.schedule(queue, padded_draft_len=draft_len)
        if drafting:  # draft caches follow the target's suspensions
            for request in output.paused_requests:
                drafting.drafter.suspend(request)
        if output.is_empty:
            # Suspending requests may make room for the next pass; with nothing suspended, or
            # after as many empty passes as there are requests, nothing can ever run.
            self._empty_steps = self._empty_steps + 1 if output.paused_requests else len(queue) + 1
            if self._empty_steps > len(queue):
                raise RuntimeError(
                    f"no request of {len(queue)} can be scheduled; device utilization "
                    f"{self.manager.pages.utilization():.0%}: give the KVCacheManager more "
                    "device pages or a host tier, or lower max_num_tokens"
                )
            return []
        self._empty_steps = 0
        start = time.perf_counter()
        batch = build_step_batch(output, self.manager, self.buckets, draft_len)
        key = batch.inputs.key
        sampling = SamplingInputs(key.num_seqs)
        for row, request in enumerate(batch.requests):
            params = request.sampling_params
            sampling.set_row(row, params, params.seed, len(request.output_token_ids))
        if self.check_agreement:
            # After scheduling, the page moves have run: their digest stands in for them.
            arrays = [*dataclasses.astuple(batch.inputs), *vars(sampling).values()]
            ids = [request.request_id for request in batch.requests]
            check_same_on_every_process(
                f"the batch of step {len(self.metrics.steps)}",
                *map(np.asarray, arrays), batch.draft_tokens, ids, self.manager.moves_digest,
            )  # fmt: skip
        logits, self.manager.pool = self.registry(self._params, self.manager.pool, batch.inputs)
        accepted, tokens = sampling.verify(logits, batch.draft_tokens, batch.num_drafts)
        now = time.perf_counter()
        finished: list[RequestOutput] = []
        num_generated = num_accepted = 0
        for row, request in enumerate(batch.requests):
            chunk = batch.chunk_sizes[row]
            if chunk:
                if request.metrics.first_scheduled_time is None:
                    request.metrics.first_scheduled_time = start
                self.resources.context_computed(request, chunk)
                if request.context_remaining:
                    continue  # a non-last chunk: its logit row is not a token
                request.state = RequestState.GENERATION_IN_PROGRESS
                request.metrics.first_token_time = now
                new_tokens = tokens[row, :1]
            else:
                # The input token and the accepted drafts have KV; the rest is rewound.
                n = int(accepted[row])
                computed = [*request.output_token_ids[-1:], *request.draft_tokens[:n]]
                self.resources.tokens_computed(request, computed, num_rejected=draft_len - n)
                new_tokens = tokens[row, : n + 1]
            for index, token in enumerate(new_tokens):
                num_generated += 1
                num_accepted += index < len(new_tokens) - 1  # a draft (not the last pick)
                if self._append_token(request, int(token)):
                    finished.append(self._finish(request, now))
                    break
        self.metrics.record_step(start, now, batch, output, num_generated, num_accepted)
        return finished

    def _append_token(self, request: Request, token: int) -> bool:
        """Adds a sampled token; True when the request is finished."""
        request.output_token_ids.append(token)
        params = request.sampling_params
        num_generated = len(request.output_token_ids)
        if token in params.stop_token_ids or (
            token in self.eos_token_ids and not params.ignore_eos
        ):
            request.finish_reason = FinishReason.STOP
        elif num_generated >= params.max_new_tokens or (
            request.prompt_length + num_generated >= self.manager.max_seq_len
        ):
            request.finish_reason = FinishReason.LENGTH
        return request.finish_reason is not None

    def _finish(self, request: Request, now: float) -> RequestOutput:
        request.state = RequestState.GENERATION_TO_COMPLETE
        self._release(request)
        request.state = RequestState.COMPLETE
        request.metrics.finish_time = now
        del self._requests[request.request_id]
        output = request.output()
        self.metrics.record_finished(output)
        return output

    def _release(self, request: Request) -> None:
        self.resources.free(request)
        if self._drafting:
            self._drafting.drafter.release(request)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        **request_options,
    ) -> list[RequestOutput]:
        """Serves `prompts` to completion; outputs in prompt order.

        Args:
            sampling_params: one for all prompts, or one each.
            use_tqdm: show a progress bar over finished requests.
            request_options: `add_request` keywords applied to every prompt (lora_id, salt,
                priority).

        Raises:
            ValueError: a bad request; nothing of this call stays queued.
        """
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        ids: list[int] = []
        try:
            for prompt, params in zip(prompts, sampling_params, strict=True):
                ids.append(self.add_request(prompt, params, **request_options))
        except BaseException:
            for request_id in ids:
                self.abort(request_id)
            raise
        wanted, outputs = set(ids), {}
        with tqdm(total=len(ids), disable=not use_tqdm, desc="generate", unit="req") as bar:
            while len(outputs) < len(ids):
                for output in self.step():
                    if output.request_id in wanted:
                        outputs[output.request_id] = output
                        bar.update(1)
        return [outputs[request_id] for request_id in ids]

    # -- the end ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Aborts live requests and releases the cache. Idempotent."""
        for request_id in list(self._requests):
            self.abort(request_id)
        if self._drafting:
            self._drafting.drafter.shutdown()
        self.manager.shutdown()
        self.compiles.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
