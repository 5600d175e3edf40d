"""Continuous batching under memory pressure (the reference's in-flight batching test).

A small serving loop: generation first (each running request grows by one token; on shortage the
tail of the batch is suspended, then the request itself), then one new request (prefix reuse from
shared system prompts and from earlier rounds of the same dialog), then suspended requests resume
last-in first-out. Every generated and prompt token is committed, so later rounds reuse earlier
ones. The fill-and-check engine verifies every history token of every active cache each step.
"""

import random

import pytest

from kvjax.cache import CacheStatus
from tests.test_manager import make


class Request:
    def __init__(self, prompt, max_new_tokens):
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.cache = None
        self.num_generated = 0


def decode(engine, cache, rng):
    return engine.run_step(cache, [rng.randrange(50)])


def schedule_generation(engine, running, suspended, rng):
    for request in list(running):
        if request not in running:  # suspended by an earlier request this step
            continue
        while not decode(engine, request.cache, rng):
            victim = running.pop()  # the tail of the batch makes room
            victim.cache.suspend()
            suspended.append(victim)
            if victim is request:
                break
        else:
            request.num_generated += 1


def admit(manager, engine, request, running):
    """Creates the cache with reuse, resumes it and computes the prompt; False leaves nothing."""
    cache = manager.create_kv_cache(request.prompt[:-1])  # the last token is always computed
    engine.register(cache)
    if not cache.resume() or not engine.run_step(
        cache, request.prompt[cache.num_committed_tokens :]
    ):
        cache.close()
        return False
    request.cache = cache
    running.append(request)
    return True


@pytest.mark.parametrize("seed", range(4))
def test_inflight_batching_with_suspend_resume_and_dialog_reuse(seed):
    rng = random.Random(seed)
    manager, engine = make(tpb=4, device=16, host=12)
    system_prompts = [[rng.randrange(50) for _ in range(n)] for n in (5, 8, 11)]
    dialogs, running, suspended, waiting = [], [], [], []
    finished = 0
    for _ in range(160):
        schedule_generation(engine, running, suspended, rng)
        engine.check_all()
        for request in [r for r in running if r.num_generated >= r.max_new_tokens]:
            running.remove(request)
            dialogs.append(engine.tokens(request.cache))
            request.cache.close()
            finished += 1
        if not waiting:
            if dialogs and rng.random() < 0.5:  # the next round of an earlier dialog
                prompt = dialogs.pop(rng.randrange(len(dialogs))) + [rng.randrange(50)] * 2
            else:
                prompt = rng.choice(system_prompts) + [rng.randrange(50) for _ in range(4)]
            waiting.append(Request(prompt, rng.randint(2, 10)))
        if not suspended and admit(manager, engine, waiting[0], running):
            waiting.pop(0)
        while suspended and suspended[-1].cache.resume():
            running.append(suspended.pop())
        engine.check_all()
    stats = manager.stats
    assert finished >= 10
    assert stats.reused_blocks > 0 and stats.partially_reused_blocks > 0
    assert stats.offloaded_pages > 0 and stats.onboarded_pages > 0  # suspend and resume moved
    for request in running + suspended:
        request.cache.close()
    assert all(cache.status is CacheStatus.CLOSED for cache in manager.live_caches)
    manager.clear_reusable_blocks()
    assert manager.pages.num_free(manager.pages.tiers[0]) == 15
    manager.check_invariants()
