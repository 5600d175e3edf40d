"""The serving loop: requests in, tokens out, through the scheduler, the cache and compiled steps.

Each `step()` is a pipeline: propose drafts, schedule (the cache moves pages as it decides), build
the batch padded to a compiled bucket, dispatch it with the pool donated and sample on the
device, then apply the results (prompt tokens committed for reuse, drafts verified and the rest
rewound, finished requests closed; their blocks stay in the radix tree as cache). By default the
loop is overlapped (`kvjax.engine.runner`): a step's tokens are applied during the next `step()`,
after that step was dispatched, so the host's work hides behind the device's. Every step shape
is compiled at construction; serving never compiles.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
from flax import nnx
from jax.sharding import Mesh

from kvjax.cache.config import CacheConfig
from kvjax.cache.multimodal import MultimodalItem
from kvjax.engine.assembly import EngineOptions, EngineParts, assemble
from kvjax.engine.generation import Generation
from kvjax.engine.geometry import check_model_geometry
from kvjax.engine.preflight import (
    check_processes_agree,
    check_sampler_variants,
    check_tokenizer,
    plan,
)
from kvjax.engine.recovery import recover_lost_pool
from kvjax.engine.runner import StepLost, StepRunner
from kvjax.runtime.buckets import Buckets
from kvjax.runtime.compile_cache import configure_compile_cache
from kvjax.runtime.sharding import spans_processes, tensor_parallel_mesh
from kvjax.serving.intake import Prompt, RequestIntake, encode_prompt
from kvjax.serving.interrupts import interrupts_deferred
from kvjax.serving.metrics import EngineMetrics
from kvjax.serving.progress import ProgressWatch, memory_report
from kvjax.serving.request import Request, RequestOutput, RequestState, SamplingParams
from kvjax.serving.request_queue import RequestQueue
from kvjax.serving.scheduler import SchedulerConfig, SchedulerOutput
from kvjax.serving.speculative import DraftPlanner, SpeculativeConfig

if TYPE_CHECKING:  # the text layer loads only where a tokenizer is used
    from kvjax.text.tokenizer import Tokenizer

__all__ = ["Engine"]


class Engine(Generation):
    """Serves requests with a model that follows the model protocol (`models.llama.Llama`):
    `model(inputs, kv_pool, impl=, interpret=) -> (logits, kv_pool)` and a `config` with
    `vocab_size`, `num_layers`, `num_kv_heads`, `head_dim`.

    Threads: `add_request`, `abort` and `num_unfinished` are safe from any thread while one
    thread calls `step()`, `generate()` or `stream()`; call those from one thread at a time.

    Args:
        model: the NNX module (e.g. from `models.loader.load_hf_checkpoint`).
        cache_config: pages and quotas; `kvjax.cache_config_for(model, ...)` derives
            the geometry from the model so only the quotas need choosing.
        scheduler_config: batch and token limits and the policy.
        buckets: the step shapes to compile (default: from `scheduler_config`).
        max_seq_len: the longest prompt plus output (default: what the device holds).
        enable_block_reuse: prefix reuse through the radix tree.
        commit_generated: also commit generated tokens, so follow-up turns reuse them.
        lora_pages: the known LoRA adapters and the device pages each takes (the scheduler's
            LoRA budget); requests naming another id are refused.
        eos_token_ids: tokens that end a request unless it ignores EOS (default the model's
            and the tokenizer's).
        tokenizer: text in and out (`kvjax.text.load_tokenizer`): prompts may be strings or
            chat messages, outputs carry `.text`, requests may give stop strings.
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
        sampler_variants: also compile, at construction, the sampler for requests asking for
            "logprobs" or "penalties", and the steps that score prompts ("prompt_logprobs");
            else the first step needing one compiles it.
        compile_cache: JAX's persistent compilation cache: True (default) uses the directory
            of `kvjax.runtime.compile_cache`, a path that directory, False leaves JAX as is.
        overlap: schedule and build each step while the device runs the previous one (its
            tokens reach the next step on the device; outputs are exactly the serial loop's);
            steps with speculative drafts run serially whatever this says.
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
        compile_cache: bool | str | os.PathLike = True,
        overlap: bool = True,
        tokenizer: Tokenizer | None = None,
        sampler_variants: Sequence[str] = (),
    ) -> None:
        config = self.scheduler_config = scheduler_config or SchedulerConfig()
        self.tokenizer = tokenizer
        eos_token_ids = check_tokenizer(model, tokenizer, eos_token_ids)
        self.compile_cache_dir = configure_compile_cache(compile_cache)
        check_model_geometry(model, cache_config)
        self.mesh = None if tensor_parallel is None else tensor_parallel_mesh(tensor_parallel)
        self.lockstep = spans_processes(self.mesh)
        self.speculative = speculative
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids, draft_lengths, self.buckets = plan(
            model, config, buckets, eos_token_ids, speculative, self.mesh, self.lockstep
        )
        self.lora_pages = dict(lora_pages or {})
        options = EngineOptions(
            max_seq_len, enable_block_reuse, commit_generated, self.lora_pages, impl, interpret,
            check_sampler_variants(sampler_variants),
        )  # fmt: skip
        if self.lockstep:
            check_processes_agree(
                self.mesh, model.config, cache_config, config, self.buckets.keys, draft_lengths,
                options.agreement_key(), seed, sorted(self.eos_token_ids),
            )  # fmt: skip
        parts = assemble(
            model, cache_config, config, self.buckets, options, speculative, draft_lengths[-1],
            self.mesh,
        )  # fmt: skip
        self._start(parts, seed, check_agreement and self.lockstep, overlap)

    def _start(self, parts: EngineParts, seed: int, check_agreement: bool, overlap: bool) -> None:
        """Takes the built parts and sets up the serving state."""
        self.manager, self.resources = parts.manager, parts.resources
        self.scheduler, self.compiles = parts.scheduler, parts.compiles
        self.registry, self._params = parts.registry, parts.params
        config = self.scheduler_config
        self.metrics = EngineMetrics(self.manager)
        self._drafting = self.speculative and DraftPlanner(
            self.speculative, self.resources, config, self.vocab_size
        )
        intake = RequestIntake(
            self.manager, config, self.vocab_size, self.lora_pages, seed, self.tokenizer,
            speculative=bool(self._drafting),
        )  # fmt: skip
        self._queue = RequestQueue(intake)
        # Held by a step and by what changes live requests: abort waits for a running step.
        self._step_lock = threading.RLock()
        report = functools.partial(memory_report, self.manager.pages, config.max_num_tokens)
        self._progress = ProgressWatch(report)
        self.check_agreement = check_agreement
        self.feed_size = parts.registry.feed_size
        self._runner = StepRunner(self, overlap and not self._drafting)

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        *,
        request_id: int | None = None,
        lora_id: int | None = None,
        salt: int | bytes | str | None = None,
        priority: int | None = None,
        multimodal_items: Sequence[MultimodalItem] = (),
        stream: bool = False,
    ) -> int:
        """Queues a request and returns its id; nothing is allocated until it is scheduled.
        Safe from any thread, also while another thread steps: the next step admits it.
        `prompt`: token ids, or with a tokenizer a string or chat messages (`encode_prompt`).
        `stream`: `step()` reports its progress after each step (`RequestOutput.new_token_ids`,
        `.new_text`), not only its end.

        Raises:
            RuntimeError: the engine was shut down.
            ValueError: a prompt that is empty, holds a token outside the vocabulary or leaves
                no room below `max_seq_len`; an unknown LoRA id; a taken request id; bad
                sampling parameters or multimodal items.
        """
        prompt_token_ids = encode_prompt(prompt, self.tokenizer)  # outside the queue's lock
        return self._queue.submit(
            prompt_token_ids, sampling_params, request_id=request_id, lora_id=lora_id,
            salt=salt, priority=priority, multimodal_items=multimodal_items, stream=stream,
        )  # fmt: skip

    def add_samples(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, n: int = 1, **options
    ) -> list[int]:
        """Queues `n` parallel samples of one prompt (`add_request`'s keywords, `request_ids`
        for their ids) and returns their ids. The prompt is computed once: the other samples
        wait until the first has computed it, then reuse its KV through the prefix cache (with
        reuse on). A seeded `sampling_params` gives sample i the seed `seed + i`. Safe from any
        thread.

        Raises:
            ValueError: as `add_request`; `n` not in [1, 128].
        """
        prompt_token_ids = encode_prompt(prompt, self.tokenizer)
        return self._queue.submit_group(n, prompt_token_ids, sampling_params, **options)

    def abort(self, request_id: int) -> RequestOutput:
        """Stops a queued or running request and frees its pages; returns what it generated.
        Safe from any thread: it waits for a running step to end first."""
        with self._step_lock:
            request, started = self._queue.withdraw(request_id)
            if started:
                self._release(request)
            request.state = RequestState.COMPLETE
            return request.output()

    @property
    def num_unfinished(self) -> int:
        """Requests queued or running (safe from any thread)."""
        return len(self._queue)

    def request_counts(self) -> tuple[int, int]:
        """(running, waiting) requests: holding device pages, or queued or suspended (a
        snapshot, safe from any thread)."""
        return self._queue.counts()

    # -- the loop: one step as a pipeline ------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the requests that finished since the last call (with the
        overlapped loop, by the tokens of the step before this one: they arrive one call
        later), and the progress of streamed requests that got tokens. Call it from one
        thread at a time.

        Raises:
            RuntimeError: requests wait but none can be scheduled (a deadlock).
        """
        with self._step_lock:
            queue = self._queue.admit()
            if queue:
                self._step(queue)
                self._queue.report(queue)
            else:  # every request of the step in flight ended: its rows are void
                self._runner.drain()
            return self._queue.take_finished()

    def _step(self, queue: list[Request]) -> None:
        queue = self._runner.settle_penalized(queue)
        if not queue:  # the step in flight ended every request
            return
        draft_len = self._drafting.propose(queue) if self._drafting else 0
        with interrupts_deferred():  # the books change: no Ctrl-C half way
            output = self._schedule(queue, draft_len)
        if output is None:
            return
        try:
            if self._drafting:
                self._runner.run_serial(output, draft_len)
            else:
                self._runner.run(output)
        except Exception as error:
            # A failure that consumed the donated pool (or a step that failed on the device):
            # recover once; twice in a row, raise.
            pools = jax.tree.leaves(self.manager.pool)  # one pool, or each layer group's
            lost = isinstance(error, StepLost) or any(pool.is_deleted() for pool in pools)
            if not lost or self._runner.recovering:
                raise
            self._runner.drop()
            recover_lost_pool(error, queue, self.resources, self.manager)
            self._runner.recovering = True

    def _schedule(self, queue: list[Request], draft_len: int) -> SchedulerOutput | None:
        """The scheduler's decisions, or None when nothing runs in this step (after waiting for
        the step in flight, so that the next pass sees its tokens); raises when nothing can
        ever run."""
        runner = self._runner
        try:
            output = self.scheduler.schedule(
                queue, runner.ends_by_length(queue), padded_draft_len=draft_len
            )
        except RuntimeError:  # a deadlock, unless the step in flight ends requests
            if runner.inflight is None:
                raise
            output = None
        if output is not None:
            if self._drafting:  # draft caches follow the target's suspensions
                for request in output.paused_requests:
                    self._drafting.drafter.suspend(request)
            for request in output.failed_requests:
                self._finish(request, time.perf_counter())
        if runner.inflight is not None and (output is None or output.is_empty):
            runner.drain()
            return None
        self._progress.observe(output, len(queue))
        return None if output.is_empty else output

    def _finish(self, request: Request, now: float) -> None:
        request.state = RequestState.GENERATION_TO_COMPLETE
        self._release(request)
        request.state = RequestState.COMPLETE
        request.metrics.finish_time = now
        output = request.output()
        self._queue.finish(request, output)
        self.metrics.record_finished(output)

    def _release(self, request: Request) -> None:
        self.resources.free(request)
        if self._drafting:
            self._drafting.drafter.release(request)

    # -- the end ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Aborts live requests and releases the cache. Idempotent."""
        self._queue.close()
        for request_id in self._queue.live_ids():
            self.abort(request_id)
        self._runner.drop()
        if self._drafting:
            self._drafting.drafter.shutdown()
        self.manager.shutdown()
        self.compiles.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
