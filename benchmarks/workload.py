"""A seeded shared-prefix workload: groups of requests behind one long system prompt each, and
multi-turn follow-ups whose prompt is the previous turn's prompt, its answer and a new message.

`ideal_hit_rate` is what an infinite cache could reuse: each request's longest common prefix with
any sequence served before it (prompt, and answer when generated tokens are committed), at most
all but its last token.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["RepetitiveWorkload", "Turn", "Workload", "ideal_hit_rate"]


@dataclasses.dataclass
class Turn:
    prompt: list[int]
    follow_up: list[int] | None  # the next turn's new message, if there is a next turn


@dataclasses.dataclass
class Workload:
    """Args:
    num_groups, requests_per_group: first turns; group members share a system prompt.
    system_len: system prompt tokens; user_len: (min, max) tokens of each message.
    follow_up_fraction: share of first turns that get a second turn.
    """

    vocab_size: int
    num_groups: int = 4
    requests_per_group: int = 6
    system_len: int = 192
    user_len: tuple[int, int] = (16, 64)
    follow_up_fraction: float = 0.5
    seed: int = 0

    def first_turns(self) -> list[Turn]:
        """First turns, groups interleaved (as independent users would arrive)."""
        rng = np.random.default_rng(self.seed)
        systems = [self._tokens(rng, self.system_len) for _ in range(self.num_groups)]
        turns = []
        for _ in range(self.requests_per_group):
            for system in systems:
                prompt = system + self._tokens(rng, int(rng.integers(*self.user_len)))
                follow_up = None
                if rng.random() < self.follow_up_fraction:
                    follow_up = self._tokens(rng, int(rng.integers(*self.user_len)))
                turns.append(Turn(prompt, follow_up))
        return turns

    def max_seq_len(self, new_tokens: int) -> int:
        """The longest sequence the workload can make: a follow-up holds its first turn's
        prompt and answer, then its own message and answer."""
        return self.system_len + 2 * (self.user_len[1] + new_tokens)

    def _tokens(self, rng, length: int) -> list[int]:
        return rng.integers(0, self.vocab_size, length).tolist()


@dataclasses.dataclass
class RepetitiveWorkload:
    """Prompts that repeat a short random phrase, then a short random tail (as in editing,
    quoting or code tasks): prompt lookup finds continuations, and even a random model's greedy
    answers repeat. Single turns.

    Args:
    num_requests: prompts; phrase_len: tokens of each prompt's phrase; repeats: how often it
    repeats; tail_len: (min, max) random tokens after the repeats.
    """

    vocab_size: int
    num_requests: int = 16
    phrase_len: int = 12
    repeats: int = 6
    tail_len: tuple[int, int] = (4, 16)
    seed: int = 0

    def first_turns(self) -> list[Turn]:
        rng = np.random.default_rng(self.seed)
        turns = []
        for _ in range(self.num_requests):
            phrase = rng.integers(0, self.vocab_size, self.phrase_len).tolist()
            tail = rng.integers(0, self.vocab_size, int(rng.integers(*self.tail_len))).tolist()
            turns.append(Turn(phrase * self.repeats + tail, None))
        return turns


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if mismatch.size else n


def ideal_hit_rate(prompts: list[list[int]], served: list[list[int]]) -> float:
    """Reusable prompt tokens over all prompt tokens, with an infinite cache.

    Args:
        prompts: in the order they were submitted.
        served: for each, the sequence it leaves in the cache (its prompt, or prompt + answer).
    """
    reusable = total = 0
    for index, prompt in enumerate(prompts):
        best = max((_common_prefix(prompt, s) for s in served[:index]), default=0)
        reusable += min(best, len(prompt) - 1)
        total += len(prompt)
    return reusable / total if total else 0.0
