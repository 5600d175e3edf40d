"""The shared-prefix workload in real text, for a model with a tokenizer and a chat template:
groups of users behind one long system prompt each (an assistant product's instructions),
each asking a question; some ask a follow-up on the answer they got.

Prompts are token ids rendered by the model's chat template, so the benchmark measures the
engine, not the tokenizer; a follow-up is the first turn's prompt, the answer's tokens, then
the template's text between an answer and the next generation prompt.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks.workload import Turn
from kvjax.text.tokenizer import Tokenizer

__all__ = ["ChatWorkload"]

SYSTEM_PROMPTS = [
    "You are the help desk assistant of Northwind Books, an online bookstore. Answer customers "
    "politely and briefly, in plain English. Orders ship within two business days from our "
    "warehouse in Leeds; standard delivery takes three to five days and express delivery one "
    "day. Returns are free within thirty days when the book is unread. Gift cards never expire. "
    "Members of the reading club get ten percent off every order and free express delivery. "
    "Never invent an order number, a price or a tracking link; if you do not know, say so and "
    "offer to connect the customer with a person.",
    "You are a patient science tutor for students aged twelve to sixteen. Explain ideas step "
    "by step with everyday examples, avoid jargon unless you define it, and check the student "
    "understood by ending with one short question. Keep every answer under one hundred words. "
    "Topics include the solar system, cells, electricity, forces, the water cycle, simple "
    "chemistry and the human body. If a question is not about science, gently steer back.",
    "You are a travel planning assistant. Suggest practical plans with times, distances and "
    "rough costs, and prefer trains and walking over flights and taxis. Mention one thing to "
    "book ahead and one local dish to try. Ask about budget and dates when they matter. You "
    "know Europe's major cities, their museums, parks and markets, and how to travel between "
    "them by rail. Keep answers short and friendly, with at most five bullet points.",
    "You are a cooking assistant for busy home cooks. Recipes use at most eight common "
    "ingredients and take under forty minutes. Give quantities for two people in grams and "
    "millilitres, list steps in order, and note one way to make the dish vegetarian. Warn "
    "about common allergens such as nuts, gluten, eggs and milk when a recipe contains them. "
    "If asked about something unsafe to eat, explain why briefly.",
]

QUESTIONS = [
    "What is the capital of France?",
    "How long does delivery take?",
    "Why is the sky blue?",
    "Plan one day in Paris for me.",
    "How do I make a quick tomato pasta?",
    "Can I return a book I already read?",
    "What is photosynthesis?",
    "How do I get from Paris to Amsterdam by train?",
    "What can I cook with eggs and spinach?",
    "Do gift cards expire?",
    "How does a battery work?",
    "What should I see in Rome?",
]

FOLLOW_UPS = [
    "Can you say that in one sentence?",
    "Thanks! Can you give me one more example?",
    "Why is that?",
    "What would you suggest instead?",
]

_MARK = "\x00ANSWER\x00"  # placeholder answer, to cut the template's text after an answer


@dataclasses.dataclass
class ChatWorkload:
    """Args: the tokenizer with the model's chat template; first turns in `num_groups` groups
    of `requests_per_group` (group members share a system prompt); the share of first turns
    that get a follow-up; the seed of the questions' draw."""

    tokenizer: Tokenizer
    num_groups: int = 4
    requests_per_group: int = 6
    follow_up_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.tokenizer.source}: a chat workload needs a chat template")

    def first_turns(self) -> list[Turn]:
        """First turns, groups interleaved (as independent users would arrive)."""
        rng = np.random.default_rng(self.seed)
        turns = []
        for _ in range(self.requests_per_group):
            for group in range(self.num_groups):
                system = SYSTEM_PROMPTS[group % len(SYSTEM_PROMPTS)]
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": QUESTIONS[rng.integers(len(QUESTIONS))]},
                ]
                follow_up = None
                if rng.random() < self.follow_up_fraction:
                    follow_up = self._follow_up(messages, FOLLOW_UPS[rng.integers(len(FOLLOW_UPS))])
                turns.append(Turn(self.tokenizer.encode_chat(messages), follow_up))
        return turns

    def _follow_up(self, messages: list[dict], question: str) -> list[int]:
        """The template's tokens after an answer: its end-of-turn, the next user message and
        the generation prompt."""
        after = [{"role": "assistant", "content": _MARK}, {"role": "user", "content": question}]
        text = self.tokenizer.apply_chat_template(messages + after, add_generation_prompt=True)
        return self.tokenizer.encode(text.split(_MARK, 1)[1], add_special_tokens=False)

    def max_seq_len(self, new_tokens: int) -> int:
        """A bound on the longest sequence: the longest first turn and follow-up, two answers."""
        turns = self.first_turns()
        longest_follow_up = max((len(t.follow_up or ()) for t in turns), default=0)
        return max(len(t.prompt) for t in turns) + longest_follow_up + 2 * new_tokens
