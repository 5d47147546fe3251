"""Continuous batching: one decode loop steps every running request, and new ones join between steps.

Requests are grouped by the model that serves them: one group per fused model, and one group for
the unfused mixed model, whose rows may each ask for different coefficients. Each turn of the
loop first admits waiting requests: the requests joining a group are prefilled together, their
prompts padded on the left. It then runs one forward pass per group over all of its rows, and
hands every row's logits to that request's :class:`DecodeState`.

The rows of a group share one key/value cache laid out right-aligned: a row whose context is
shorter than the group's is padded on the left and masked out. When rows leave, the columns
that only padding still uses are cut off.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from peo_merge.mixed import RowCoefficients
from server.generation import DecodeState, Finished

logger = logging.getLogger(__name__)


class LoopClosedError(RuntimeError):
    """The decode loop has stopped for shutdown and takes no more requests."""


@dataclass
class Route:
    """The model that serves a request, and its coefficient row on the unfused path."""

    group: Hashable
    model: torch.nn.Module
    rows: RowCoefficients | None = None
    coefficients: list[float] | None = None


@dataclass
class Sequence:
    """One request inside the decode loop.

    ``emit`` receives text deltas, then a :class:`Finished` or an exception, from the loop's
    thread; ``on_exit`` runs once after the last item.
    """

    prompt_ids: list[int]
    state: DecodeState
    route: Route
    emit: Callable[[object], None]
    on_exit: Callable[[], None]
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"
    next_token: int | None = None
    # The unfused route a fused request may move to once other preferences are decoded unfused.
    # ``on_move`` runs after the move, when the fused model is no longer used.
    unfused_route: Route | None = None
    on_move: Callable[[], None] | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        if not self.cancel_event.is_set():
            self.cancel_reason = reason
            self.cancel_event.set()


@dataclass
class _LongPrefill:
    """A prompt longer than the per-turn budget, prefilled one chunk per turn."""

    sequence: Sequence
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """Pad the sequence axis (-2) of a key or value tensor with ``columns`` zeros on the left."""
    return F.pad(tensor, (0, 0, columns, 0)) if columns else tensor


def _stack_right(first: torch.Tensor, second: torch.Tensor, width: int) -> torch.Tensor:
    """Stack two key or value tensors along the batch axis, right-aligned to ``width`` columns."""
    return torch.cat(
        [_pad_left(first, width - first.shape[-2]), _pad_left(second, width - second.shape[-2])]
    )


class DecodeGroup:
    """The running rows that one model serves, with their shared key/value cache."""

    def __init__(self, model: torch.nn.Module, rows: RowCoefficients | None):
        self.model = model
        self.rows = rows
        self.device = next(model.parameters()).device
        self.sequences: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # batch × cached columns, 1 where a real token is
        self.positions: torch.Tensor | None = None  # position id of each row's next input token
        self.coefficients: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def _set_rows(self, coefficients: torch.Tensor | None) -> None:
        if self.rows is not None:
            self.rows.set(coefficients)

    def _coefficient_rows(self, sequences: list[Sequence]) -> torch.Tensor | None:
        if self.rows is None:
            return None
        rows = [sequence.route.coefficients for sequence in sequences]
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def prefill(self, sequences: list[Sequence]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Run the prompts of new requests together, padded on the left to one width.

        Returns:
            Their cache, their mask (1 where a real token is) and their last logits.
        """
        width = max(len(sequence.prompt_ids) for sequence in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros(len(sequences), width, dtype=torch.long)
        for index, sequence in enumerate(sequences):
            length = len(sequence.prompt_ids)
            ids[index, width - length :] = torch.tensor(sequence.prompt_ids)
            mask[index, width - length :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        self._set_rows(self._coefficient_rows(sequences))
        cache = DynamicCache()
        logits = self.model(
            input_ids=ids,
            attention_mask=mask if padded else None,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0) if padded else None,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        return cache, mask, logits

    def join(self, sequences: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add prefilled requests as new rows, aligning caches on the right."""
        positions = mask.sum(dim=-1)
        coefficients = self._coefficient_rows(sequences)
        if not self.sequences:
            self.cache, self.mask, self.positions = cache, mask, positions
            self.coefficients = coefficients
        else:
            current, incoming = self.mask.shape[1], mask.shape[1]
            width = max(current, incoming)
            # build every tensor first, so that a failure leaves the group as it was
            merged = [
                (
                    _stack_right(mine.keys, theirs.keys, width),
                    _stack_right(mine.values, theirs.values, width),
                )
                for mine, theirs in zip(self.cache.layers, cache.layers, strict=True)
            ]
            merged_mask = torch.cat(
                [F.pad(self.mask, (width - current, 0)), F.pad(mask, (width - incoming, 0))]
            )
            merged_positions = torch.cat([self.positions, positions])
            merged_coefficients = (
                torch.cat([self.coefficients, coefficients]) if coefficients is not None else None
            )
            for layer, (keys, values) in zip(self.cache.layers, merged, strict=True):
                layer.keys, layer.values = keys, values
            self.mask, self.positions = merged_mask, merged_positions
            self.coefficients = merged_coefficients
        self.sequences.extend(sequences)

    def step(self) -> torch.Tensor:
        """Feed every row's next token through the model; return next-token logits (batch × vocab)."""
        tokens = torch.tensor(
            [[sequence.next_token] for sequence in self.sequences], device=self.device
        )
        mask = F.pad(self.mask, (0, 1), value=1)
        # without padding, positions follow the cache length: the model's own defaults apply
        padded = bool((self.mask == 0).any())
        self._set_rows(self.coefficients)
        logits = self.model(
            input_ids=tokens,
            attention_mask=mask if padded else None,
            position_ids=self.positions[:, None] if padded else None,
            cache=self.cache,
            use_cache=True,
        ).logits[:, -1]
        self.mask = mask
        self.positions = self.positions + 1
        return logits

    def take(self, indices: list[int]) -> tuple[list[Sequence], DynamicCache, torch.Tensor]:
        """Remove the rows at ``indices`` and return them with their cache and mask."""
        index = torch.tensor(indices, device=self.device)
        mask = self.mask[index]
        first_used = int(mask.any(dim=0).nonzero()[0])
        mask = mask[:, first_used:]
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer in cache.layers:
            layer.keys = layer.keys[index, :, first_used:]
            layer.values = layer.values[index, :, first_used:]
        sequences = [self.sequences[i] for i in indices]
        taken = set(indices)
        self.keep([i for i in range(len(self.sequences)) if i not in taken])
        return sequences, cache, mask

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices`` and drop the columns no kept row uses."""
        if len(indices) == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in indices]
        if not indices:
            self.cache = self.mask = self.positions = self.coefficients = None
            return
        index = torch.tensor(indices, device=self.device)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        if self.coefficients is not None:
            self.coefficients = self.coefficients[index]
        first_used = int(self.mask.any(dim=0).nonzero()[0])
        self.mask = self.mask[:, first_used:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first_used:]
            layer.values = layer.values[index, :, first_used:]


class BatchScheduler:
    """Runs the decode loop on one thread for every group of running requests.

    Prompts are prefilled within a budget of ``prefill_chunk_tokens`` per turn of the loop, so
    the rows already decoding wait at most about that much prefill between two of their steps:
    short prompts are prefilled together while their padded size fits the budget, and a prompt
    longer than the budget is prefilled one chunk per turn before it joins its group.

    Args:
        max_batch_size: maximum rows in one group; a request for a full group waits for a row.
        prefill_chunk_tokens: prefill budget per turn, in (padded) prompt tokens.
    """

    def __init__(
        self,
        max_batch_size: int,
        prefill_chunk_tokens: int = 256,
        on_step: Callable[[int], None] | None = None,
        on_move: Callable[[int], None] | None = None,
    ):
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._long_prefills: deque[_LongPrefill] = deque()
        self.on_step = on_step
        self.on_move = on_move
        self._condition = threading.Condition()
        self._incoming: deque[Sequence] = deque()
        self._waiting: deque[Sequence] = deque()
        self._groups: dict[Hashable, DecodeGroup] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._thread.start()

    def submit(self, sequence: Sequence) -> None:
        """Queue a request; it joins its group before the next decode step."""
        with self._condition:
            if self._closed:
                raise LoopClosedError("the decode loop is closed")
            self._incoming.append(sequence)
            self._condition.notify()

    def close(self, timeout: float | None = None) -> None:
        """Stop the loop after its current step; requests still running end as ``shutdown``."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout)

    # the loop

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closed and not self._incoming and not self._has_work():
                    self._condition.wait()
                if self._closed:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
            try:
                self._admit()
                self._move_to_unfused()
                for key, group in list(self._groups.items()):
                    if group.sequences:
                        self._step(key, group)
                    if not group.sequences:
                        del self._groups[key]
            except Exception:  # keep the loop alive whatever one step did
                logger.exception("decode loop step failed")
        self._end_all("shutdown")

    def _has_work(self) -> bool:
        return (
            bool(self._waiting)
            or bool(self._long_prefills)
            or any(group.sequences for group in self._groups.values())
        )

    def _group(self, route: Route) -> DecodeGroup:
        group = self._groups.get(route.group)
        if group is None:
            group = DecodeGroup(route.model, route.rows)
            self._groups[route.group] = group
        return group

    def _admit(self) -> None:
        """Start prefills for waiting requests while rows are free, within the turn's budget.

        Short prompts joining one group are prefilled together, shortest first, while their
        padded size fits the budget; at least one request is always admitted. A prompt longer
        than the budget starts a chunked prefill instead.
        """
        reserved = Counter(prefill.sequence.route.group for prefill in self._long_prefills)
        joining: dict[Hashable, list[Sequence]] = {}
        padded: dict[Hashable, int] = {}  # prompt tokens of each joining batch, padded
        still_waiting: deque[Sequence] = deque()
        for sequence in sorted(self._waiting, key=lambda s: len(s.prompt_ids)):
            if sequence.cancel_event.is_set():
                self._finish(sequence, sequence.state.stop(sequence.cancel_reason))
                continue
            key = sequence.route.group
            batch = joining.setdefault(key, [])
            rows = len(self._groups[key]) if key in self._groups else 0
            if rows + reserved[key] + len(batch) >= self.max_batch_size:
                still_waiting.append(sequence)
                continue
            length = len(sequence.prompt_ids)
            if length > self.prefill_chunk_tokens:
                self._long_prefills.append(_LongPrefill(sequence))
                reserved[key] += 1
                continue
            # prompts come shortest first, so this one sets the batch's padded width
            batch_tokens = (len(batch) + 1) * length
            used = sum(padded.values()) - padded.get(key, 0) + batch_tokens
            if used > self.prefill_chunk_tokens and any(joining.values()):
                still_waiting.append(sequence)
                continue
            batch.append(sequence)
            padded[key] = batch_tokens
        # keep arrival order among those still waiting
        order = {id(sequence): index for index, sequence in enumerate(self._waiting)}
        self._waiting = deque(sorted(still_waiting, key=lambda s: order[id(s)]))

        for sequences in joining.values():
            if sequences:
                self._prefill(self._group(sequences[0].route), sequences)
        if self._long_prefills:
            self._advance_long_prefill()

    def _advance_long_prefill(self) -> None:
        """Run one chunk of the oldest long prompt; when it is done, the request joins its group."""
        prefill = self._long_prefills[0]
        sequence = prefill.sequence
        if sequence.cancel_event.is_set():
            self._long_prefills.popleft()
            self._finish(sequence, sequence.state.stop(sequence.cancel_reason))
            return
        route = sequence.route
        end = min(prefill.done + self.prefill_chunk_tokens, len(sequence.prompt_ids))
        last = end == len(sequence.prompt_ids)
        try:
            if route.rows is not None:
                row = torch.tensor([route.coefficients], dtype=torch.float32)
                route.rows.set(row.to(next(route.model.parameters()).device))
            device = next(route.model.parameters()).device
            chunk = torch.tensor([sequence.prompt_ids[prefill.done : end]], device=device)
            with torch.inference_mode():
                output = route.model(
                    input_ids=chunk,
                    cache=prefill.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            prefill.done = end
            if not last:
                return
            self._long_prefills.popleft()
            group = self._group(route)
            first = len(group)
            mask = torch.ones(1, end, dtype=torch.long, device=device)
            group.join([sequence], prefill.cache, mask)
        except Exception as error:
            logger.exception("prefill failed")
            if self._long_prefills and self._long_prefills[0] is prefill:
                self._long_prefills.popleft()
            self._fail(sequence, error)
            return
        kept = list(range(first))
        if self._advance(sequence, output.logits[0, -1]):
            kept.append(first)
        group.keep(kept)

    def _move_to_unfused(self) -> None:
        """While the unfused group runs, move fused rows that allow it into that group.

        Two groups cost two forward passes per step; one batch of all rows costs about one.
        """
        unfused = [(key, g) for key, g in self._groups.items() if g.rows is not None and len(g)]
        if not unfused:
            return
        target_key, target = unfused[0]
        for group in list(self._groups.values()):
            if group is target or group.rows is not None or not len(group):
                continue
            room = self.max_batch_size - len(target)
            movable = [
                index
                for index, sequence in enumerate(group.sequences)
                if sequence.unfused_route is not None and sequence.unfused_route.group == target_key
            ][:room]
            if not movable:
                continue
            sequences, cache, mask = group.take(movable)
            for sequence in sequences:
                sequence.route = sequence.unfused_route
            try:
                target.join(sequences, cache, mask)
            except (
                Exception
            ) as error:  # for example out of memory: these requests fail, and the loop goes on
                logger.exception("moving %d rows to the unfused batch failed", len(sequences))
                for sequence in sequences:
                    self._fail(sequence, error)
                continue
            for sequence in sequences:
                if sequence.on_move is not None:
                    sequence.on_move()
            if self.on_move is not None:
                self.on_move(len(sequences))

    def _prefill(self, group: DecodeGroup, sequences: list[Sequence]) -> None:
        first = len(group)
        try:
            with torch.inference_mode():
                cache, mask, logits = group.prefill(sequences)
            group.join(sequences, cache, mask)
        except Exception as error:
            logger.exception("prefill failed")
            for sequence in sequences:
                self._fail(sequence, error)
            return
        kept = list(range(first))
        for index, sequence in enumerate(sequences):
            if self._advance(sequence, logits[index]):
                kept.append(first + index)
        group.keep(kept)

    def _advance(self, sequence: Sequence, logits: torch.Tensor) -> bool:
        """Hand one row its logits; return whether it stays in its group.

        A failure here (non-finite logits that cannot be sampled, say) fails this request only.
        """
        try:
            token, delta = sequence.state.accept(logits)
            if delta:
                sequence.emit(delta)
        except Exception as error:
            logger.exception("sampling failed")
            self._fail(sequence, error)
            return False
        if token is None:
            self._finish(sequence, "")
            return False
        sequence.next_token = token
        return True

    def _step(self, key: Hashable, group: DecodeGroup) -> None:
        # requests cancelled since the last step leave before it
        kept = []
        for index, sequence in enumerate(group.sequences):
            if sequence.cancel_event.is_set():
                self._finish(sequence, sequence.state.stop(sequence.cancel_reason))
            else:
                kept.append(index)
        group.keep(kept)
        if not group.sequences:
            return

        try:
            with torch.inference_mode():
                logits = group.step()
        except Exception as error:
            logger.exception("decode step failed for group %s", key)
            for sequence in group.sequences:
                self._fail(sequence, error)
            group.keep([])
            return
        if self.on_step is not None:
            self.on_step(len(group))

        kept = [
            index
            for index, sequence in enumerate(group.sequences)
            if self._advance(sequence, logits[index])
        ]
        group.keep(kept)

    def _finish(self, sequence: Sequence, delta: str) -> None:
        if delta:
            sequence.emit(delta)
        sequence.emit(sequence.state.finished())
        sequence.on_exit()

    def _fail(self, sequence: Sequence, error: Exception) -> None:
        sequence.state.finish_reason = "error"
        sequence.emit(error)
        sequence.on_exit()

    def _end_all(self, reason: str) -> None:
        with self._condition:
            pending = list(self._incoming) + list(self._waiting)
            pending += [prefill.sequence for prefill in self._long_prefills]
            self._incoming.clear()
            self._waiting.clear()
            self._long_prefills.clear()
        for group in self._groups.values():
            pending.extend(group.sequences)
            group.keep([])
        self._groups.clear()
        for sequence in pending:
            self._finish(sequence, sequence.state.stop(reason))


__all__ = ["BatchScheduler", "DecodeGroup", "Finished", "LoopClosedError", "Route", "Sequence"]
