"""`Engine.generate`: a batch of prompts served to completion on top of the step loop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

from tqdm.auto import tqdm

from kvjax.serving.intake import Prompt
from kvjax.serving.request import RequestOutput, SamplingParams

__all__ = ["Generation"]


class Generation:
    """What `Engine` adds over `add_request`, `step` and `abort`: serving a list of prompts and
    collecting their outputs in order (`Engine`'s threading rules apply)."""

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        **request_options,
    ) -> list[RequestOutput]:
        """Serves `prompts` to completion; outputs in prompt order. A single string or chat
        (a list of message dicts) is one prompt.

        Args:
            sampling_params: one for all prompts, or one each.
            use_tqdm: show a progress bar over finished requests.
            request_options: `add_request` keywords applied to every prompt (lora_id, salt,
                priority).

        Raises:
            ValueError: a bad request; nothing of this call stays queued.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], Mapping)):
            prompts = [prompts]  # one text or one conversation, not a list of them
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        ids: list[int] = []
        outputs: dict[int, RequestOutput] = {}
        try:
            for prompt, params in zip(prompts, sampling_params, strict=True):
                ids.append(self.add_request(prompt, params, **request_options))
            self._serve_until_done(ids, outputs, use_tqdm)
        finally:  # a bad request or an interrupt leaves none of this call's requests queued
            for request_id in ids:
                if request_id not in outputs:
                    with contextlib.suppress(ValueError):  # finished meanwhile
                        self.abort(request_id)
        return [outputs[request_id] for request_id in ids]

    def _serve_until_done(self, ids, outputs: dict[int, RequestOutput], use_tqdm: bool) -> None:
        """Steps until every request of `ids` finished, collecting their outputs; outputs of
        other requests are kept for the next `step()`."""
        wanted, others = set(ids), []
        try:
            with tqdm(total=len(ids), disable=not use_tqdm, desc="generate", unit="req") as bar:
                while len(outputs) < len(ids):
                    for output in self.step():
                        if output.request_id in wanted:
                            outputs[output.request_id] = output
                            bar.update(1)
                        else:
                            others.append(output)
        finally:
            self._queue.put_back(others)

    def stream(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        **request_options,
    ) -> Iterator[RequestOutput]:
        """Serves one request, yielding its progress after each step that gave it tokens
        (`new_token_ids`, `new_text`), the last output finished. Closing the generator early
        aborts the request; other requests' outputs wait for the next `step()`.

        Raises:
            ValueError: a bad request (nothing is queued).
        """
        request_id = self.add_request(prompt, sampling_params, stream=True, **request_options)
        others: list[RequestOutput] = []
        finished = False
        try:
            while not finished:
                for output in self.step():
                    if output.request_id != request_id:
                        others.append(output)
                        continue
                    finished = output.finished
                    yield output
        finally:  # also when the caller stops early: the request goes, its pages with it
            if not finished:
                with contextlib.suppress(ValueError):  # finished meanwhile
                    self.abort(request_id)
            self._queue.put_back(others)
