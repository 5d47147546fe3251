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
    engine: str | None = None  # the path that served the last token, set by the server


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


class DecodeState:
    """The per-request half of decoding: sampling, detokenizing, stop sequences and the finish.

    The forward passes are someone else's job (a batch of many requests runs them); this object
    takes one row of next-token logits at a time. Text that may be the start of a stop sequence
    is held back until it is known not to be one; the stop sequence itself is never emitted.
    """

    def __init__(self, tokenizer, params: SamplingParams, eos_token_ids: set[int]):
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device="cpu").manual_seed(params.seed)
        self.longest_stop = max((len(stop) for stop in params.stop), default=0)
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.text = ""
        self.emitted = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: torch.Tensor) -> tuple[int | None, str]:
        """Sample from one row of logits.

        Returns:
            The token to feed into the next forward pass (None once finished) and the text that
            became safe to emit (possibly empty).
        """
        params = self.params
        if len(self.detokenizer.ids) >= params.max_new_tokens:
            self.finish_reason = "length"
            return None, self._flush()
        token = sample_token(
            logits.cpu() if self.generator is not None else logits, params, self.generator
        )
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter() - self.started
        if token in self.eos_token_ids and not params.ignore_eos:
            self.finish_reason = "stop"
            return None, self._flush()

        # extend the text and look for a stop sequence in the part not yet checked
        self.text += self.detokenizer.add(token)
        if params.stop:
            search_from = max(0, self.emitted - self.longest_stop)
            stop_at = _find_stop(self.text, params.stop, search_from)
            if stop_at >= 0:
                self.text = self.text[:stop_at]
                self.finish_reason = "stop"
                return None, self._flush()

        safe_end = len(self.text) - (self.longest_stop - 1 if self.longest_stop else 0)
        delta = ""
        if safe_end > self.emitted:
            delta = self.text[self.emitted : safe_end]
            self.emitted = safe_end
        if len(self.detokenizer.ids) >= params.max_new_tokens:
            self.finish_reason = "length"
            return None, delta + self._flush()
        return token, delta

    def stop(self, reason: str) -> str:
        """Finish early (cancelled, shutdown) and return the text still held back."""
        self.finish_reason = reason
        return self._flush()

    def _flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def finished(self) -> Finished:
        """Return the :class:`Finished` record; call once :attr:`done` is true."""
        return Finished(
            self.finish_reason or "length",
            self.text,
            len(self.detokenizer.ids),
            self.first_token_at,
            list(self.detokenizer.ids),
        )


def generate(
    model,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    cancel: threading.Event,
    eos_token_ids: set[int],
) -> Iterator[str | Finished]:
    """Generate from ``prompt_ids`` alone, yielding text deltas and then one :class:`Finished`.

    The loop checks ``cancel`` before each decode step and stops with ``finish_reason``
    ``"cancelled"`` once it is set. The server runs requests through
    :class:`server.batching.BatchScheduler` instead; this is the same decoding for one request.
    """
    device = next(model.parameters()).device
    state = DecodeState(tokenizer, params, eos_token_ids)
    with torch.inference_mode():
        past = DynamicCache()
        inputs = torch.tensor([prompt_ids], device=device)
        logits = model(input_ids=inputs, cache=past, use_cache=True, logits_to_keep=1).logits[0, -1]
        while True:
            if cancel.is_set():
                delta = state.stop("cancelled")
                if delta:
                    yield delta
                break
            token, delta = state.accept(logits)
            if delta:
                yield delta
            if token is None:
                break
            step_input = torch.tensor([[token]], device=device)
            logits = model(input_ids=step_input, cache=past, use_cache=True).logits[0, -1]
    yield state.finished()
