"""The decode loop: prefill, sample token by token with a KV cache, and yield text as it forms."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling parameters of one request."""

    max_new_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Finished:
    """The last item of a generation: why it stopped and what it produced."""

    finish_reason: str
    text: str
    completion_tokens: int
    time_to_first_token: float | None
    token_ids: list[int] = field(default_factory=list)


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Pick the next token from one row of logits: greedy at temperature 0, else top-k / top-p sampling."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))

    # float64 and the max subtracted first: a tiny temperature such as 1e-300 then sends the
    # other scores to -inf instead of overflowing to inf - inf = NaN
    scores = logits.double()
    scores = (scores - scores.max()) / params.temperature
    if 0 < params.top_k < scores.numel():
        threshold = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probabilities = torch.softmax(sorted_scores, dim=-1)
        # drop a token once the mass before it already reaches top_p; the first token always stays
        drop = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities >= params.top_p
        drop[0] = False
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probabilities = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text deltas without re-decoding the whole output.

    Text is decoded from a short window that starts a few tokens back, so tokenizers that change
    a token's text by its neighbours (leading spaces, multi-byte characters split over tokens)
    still produce the same string as decoding everything at once.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        """Append a token and return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        current = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(current) <= len(prefix) or current.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return current[len(prefix) :]


def _find_stop(text: str, stops: tuple[str, ...], search_from: int) -> int:
    """Return the index of the earliest stop sequence in ``text[search_from:]``, or -1."""
    positions = [text.find(stop, search_from) for stop in stops]
    positions = [p for p in positions if p >= 0]
    return min(positions) if positions else -1


def generate(
    model,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    cancel: threading.Event,
    eos_token_ids: set[int],
) -> Iterator[str | Finished]:
    """Generate from ``prompt_ids``, yielding text deltas and then one :class:`Finished`.

    The loop checks ``cancel`` before each decode step and stops with ``finish_reason``
    ``"cancelled"`` once it is set. Text that may be the start of a stop sequence is held back
    until it is known not to be one; the stop sequence itself is never yielded.
    """
    device = next(model.parameters()).device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
    longest_stop = max((len(stop) for stop in params.stop), default=0)

    detokenizer = IncrementalDetokenizer(tokenizer)
    text = ""
    emitted = 0
    started = time.perf_counter()
    first_token_at = None
    finish_reason = "length"

    with torch.inference_mode():
        past = DynamicCache()
        inputs = torch.tensor([prompt_ids], device=device)
        logits = model(
            input_ids=inputs, past_key_values=past, use_cache=True, logits_to_keep=1
        ).logits[0, -1]

        for _ in range(params.max_new_tokens):
            if cancel.is_set():
                finish_reason = "cancelled"
                break

            token = sample_token(
                logits.cpu() if generator is not None else logits, params, generator
            )
            if first_token_at is None:
                first_token_at = time.perf_counter() - started
            if token in eos_token_ids and not params.ignore_eos:
                finish_reason = "stop"
                break

            # extend the text and look for a stop sequence in the part not yet checked
            text += detokenizer.add(token)
            if params.stop:
                stop_at = _find_stop(text, params.stop, max(0, emitted - longest_stop))
                if stop_at >= 0:
                    text = text[:stop_at]
                    if stop_at > emitted:
                        yield text[emitted:]
                    emitted = len(text)
                    finish_reason = "stop"
                    break

            safe_end = len(text) - (longest_stop - 1 if longest_stop else 0)
            if safe_end > emitted:
                yield text[emitted:safe_end]
                emitted = safe_end

            step_input = torch.tensor([[token]], device=device)
            logits = model(input_ids=step_input, past_key_values=past, use_cache=True).logits[0, -1]

    if emitted < len(text):
        yield text[emitted:]
    yield Finished(finish_reason, text, len(detokenizer.ids), first_token_at, list(detokenizer.ids))
