"""The unfused mixed model and the continuous-batching decode loop, in process on the real base.

The fused path is the reference: a model fused for one coefficient pair, run alone. The unfused
model must give the same logits within a stated tolerance for any mix of pairs in one batch, and
the decode loop must give every request the tokens it gets when it runs alone.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from peo_merge.base_model import load_base_model, resolve_base_model
from peo_merge.bundle import load_bundle
from peo_merge.fused_model import base_state, build_fused_model
from peo_merge.fusion import Fuser
from peo_merge.mixed import build_mixed_model, mixed_nbytes
from peo_merge.task_vector import TaskVector
from server.batching import BatchScheduler, DecodeGroup, Route, Sequence
from server.generation import DecodeState, Finished, SamplingParams, generate
from tests.conftest import DEFAULT_BUNDLE
from tests.tiny_model import tiny_llama_config

# fp32 logits of SmolLM2 are about 30 in magnitude. The two paths round differently
# (W₀ + c·s·B·A formed first, against W₀·x + c·s·B·(A·x)), which moves them by about 1e-4.
LOGIT_TOLERANCE = 5e-4

PAIRS = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.5, -0.5), (-0.5, 1.5), (0.0, 0.0)]
PROMPTS = [
    "Hi",
    "Tell me a long story about a dog and a cat who",
    "What is 2+2?",
    "Explain why the sky is blue in simple words, for a child of five",
    "How do I",
    "Write a haiku about autumn leaves falling on a quiet pond",
]


@pytest.fixture(scope="module")
def real():
    torch.set_num_threads(1)
    bundle = load_bundle(DEFAULT_BUNDLE)
    model, tokenizer = load_base_model(resolve_base_model(None))
    state = base_state(model)
    fuser = Fuser(state, bundle.vectors)
    mixed, rows = build_mixed_model(model, bundle.vectors)
    return {
        "bundle": bundle,
        "model": model,
        "tokenizer": tokenizer,
        "fuser": fuser,
        "mixed": mixed,
        "rows": rows,
        "eos": {tokenizer.eos_token_id},
    }


def fused_model_for(real, pair):
    buffers = real["fuser"].allocate()
    real["fuser"].fuse_into(buffers, real["bundle"].vector_coefficients(*pair))
    return build_fused_model(real["model"], buffers)


def coefficient_row(real, pair):
    return real["rows"].row(real["bundle"].vector_coefficients(*pair))


def test_mixed_rows_match_fused_models(real):
    tokenizer = real["tokenizer"]
    ids = torch.tensor([tokenizer("The quick brown fox jumps over")["input_ids"]] * len(PAIRS))
    real["rows"].set(torch.tensor([coefficient_row(real, pair) for pair in PAIRS]))
    with torch.inference_mode():
        mixed_logits = real["mixed"](input_ids=ids).logits
        for index, pair in enumerate(PAIRS):
            fused_logits = fused_model_for(real, pair)(input_ids=ids[:1]).logits[0]
            error = (fused_logits - mixed_logits[index]).abs().max().item()
            assert error <= LOGIT_TOLERANCE, (pair, error)


def test_mixed_zero_row_is_the_base_model(real):
    ids = torch.tensor([real["tokenizer"]("Good morning")["input_ids"]])
    real["rows"].set(torch.zeros(1, len(real["rows"].vector_names)))
    with torch.inference_mode():
        mixed_logits = real["mixed"](input_ids=ids).logits
        base_logits = real["model"](input_ids=ids).logits
    assert torch.equal(mixed_logits, base_logits)


def test_mixed_model_shares_base_weights_and_owns_only_factors(real):
    base_pointers = {p.data_ptr() for p in real["model"].parameters()}
    mixed_pointers = {p.data_ptr() for p in real["mixed"].parameters()}
    assert mixed_pointers == base_pointers
    factor_bytes = sum(vector.nbytes() for vector in real["bundle"].vectors.values())
    # the bundle stores fp16 factors; the mixed model keeps them in the fp32 serving dtype
    assert mixed_nbytes(real["mixed"]) == 2 * factor_bytes


def test_mixed_model_rejects_wrong_row_shapes(real):
    vectors = len(real["bundle"].vectors)
    with pytest.raises(ValueError, match=rf"shape \(batch, {vectors}\), got \(3, 5\)"):
        real["rows"].set(torch.zeros(3, 5))
    with pytest.raises(KeyError, match="unknown task vectors"):
        real["rows"].row({"creativity": 1.0})


def test_mixed_model_refuses_an_embedding_target():
    model = LlamaForCausalLM(tiny_llama_config(64)).eval()
    delta = torch.zeros_like(model.model.embed_tokens.weight)
    vector = TaskVector("helpfulness", "dense", deltas={"model.embed_tokens.weight": delta})
    with pytest.raises(
        ValueError, match=r"model\.embed_tokens\.weight is not the weight of a linear"
    ):
        build_mixed_model(model, {"helpfulness": vector})


def solo_tokens(model, real, prompt_ids, params, rows=None, row=None):
    if rows is not None:
        rows.set(torch.tensor([row]))
    items = list(
        generate(model, real["tokenizer"], prompt_ids, params, threading.Event(), real["eos"])
    )
    return items[-1].token_ids


class Collector:
    """Gathers what the decode loop emits for several sequences."""

    def __init__(self, count: int):
        self.deltas = {i: [] for i in range(count)}
        self.finished: dict[int, Finished] = {}
        self.errors: dict[int, Exception] = {}
        self.exited = threading.Semaphore(0)

    def sequence(self, index, prompt_ids, params, route, real):
        def emit(item):
            if isinstance(item, Finished):
                self.finished[index] = item
            elif isinstance(item, Exception):
                self.errors[index] = item
            else:
                self.deltas[index].append(item)

        return Sequence(
            prompt_ids,
            DecodeState(real["tokenizer"], params, real["eos"]),
            route,
            emit,
            self.exited.release,
        )

    def wait(self, count: int, timeout: float = 120.0) -> None:
        for _ in range(count):
            assert self.exited.acquire(timeout=timeout), "a sequence never left the decode loop"


def test_unfused_batch_with_mixed_preferences_gives_solo_tokens(real):
    """Rows join together and at different times, with prompts of different lengths and pairs."""
    tokenizer = real["tokenizer"]
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    lengths = [24, 16, 20, 12, 28, 8]
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    expected = [
        solo_tokens(real["mixed"], real, ids, p, real["rows"], coefficient_row(real, pair))
        for ids, p, pair in zip(prompt_ids, params, PAIRS, strict=True)
    ]

    steps = []
    scheduler = BatchScheduler(max_batch_size=8, on_step=steps.append)
    collector = Collector(len(PROMPTS))
    try:
        for index, pair in enumerate(PAIRS):
            route = Route("unfused", real["mixed"], real["rows"], coefficient_row(real, pair))
            scheduler.submit(
                collector.sequence(index, prompt_ids[index], params[index], route, real)
            )
            if index >= 2:  # the first three join in one padded prefill, the rest one by one
                time.sleep(0.05)
        collector.wait(len(PROMPTS))
    finally:
        scheduler.close(10)

    assert not collector.errors
    for index in range(len(PROMPTS)):
        finished = collector.finished[index]
        assert finished.finish_reason == "length"
        assert finished.token_ids == expected[index], index
        assert "".join(collector.deltas[index]) == finished.text
    assert max(steps) >= 3, f"rows never shared a step: {steps}"


def test_fused_groups_batch_their_own_rows(real):
    """Two fused models in one loop: each batches its rows and gives solo tokens."""
    tokenizer = real["tokenizer"]
    models = {pair: fused_model_for(real, pair) for pair in PAIRS[:2]}
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    jobs = [(PROMPTS[i], PAIRS[i % 2]) for i in range(4)]
    expected = [
        solo_tokens(models[pair], real, tokenizer(prompt)["input_ids"], params)
        for prompt, pair in jobs
    ]
    steps = []
    scheduler = BatchScheduler(max_batch_size=8, on_step=steps.append)
    collector = Collector(len(jobs))
    try:
        for index, (prompt, pair) in enumerate(jobs):
            route = Route(("fused", pair), models[pair])
            ids = tokenizer(prompt)["input_ids"]
            scheduler.submit(collector.sequence(index, ids, params, route, real))
        collector.wait(len(jobs))
    finally:
        scheduler.close(10)
    assert [collector.finished[i].token_ids for i in range(len(jobs))] == expected
    assert 2 in steps


def test_cancelled_row_leaves_and_the_others_finish(real):
    tokenizer = real["tokenizer"]
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    scheduler = BatchScheduler(max_batch_size=8)
    collector = Collector(3)
    sequences = []
    try:
        for index in range(3):
            route = Route(
                "unfused", real["mixed"], real["rows"], coefficient_row(real, PAIRS[index])
            )
            ids = tokenizer(PROMPTS[index])["input_ids"]
            sequences.append(collector.sequence(index, ids, params, route, real))
            scheduler.submit(sequences[-1])
        while not collector.deltas[1]:
            time.sleep(0.01)
        sequences[1].cancel("cancelled")
        collector.wait(3)
    finally:
        scheduler.close(10)
    assert collector.finished[1].finish_reason == "cancelled"
    assert collector.finished[1].completion_tokens < 40
    assert collector.finished[0].completion_tokens == 40
    assert collector.finished[2].completion_tokens == 40


def test_full_group_makes_requests_wait_for_a_row(real):
    tokenizer = real["tokenizer"]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    steps = []
    scheduler = BatchScheduler(max_batch_size=2, on_step=steps.append)
    collector = Collector(5)
    try:
        for index in range(5):
            route = Route(
                "unfused", real["mixed"], real["rows"], coefficient_row(real, PAIRS[index])
            )
            ids = tokenizer(PROMPTS[index])["input_ids"]
            scheduler.submit(collector.sequence(index, ids, params, route, real))
        collector.wait(5)
    finally:
        scheduler.close(10)
    assert all(collector.finished[i].completion_tokens == 6 for i in range(5))
    assert max(steps) == 2


def test_failed_step_fails_its_group_and_the_loop_goes_on(real):
    tokenizer = real["tokenizer"]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)

    class Broken(torch.nn.Module):
        """Prefills like the real model, then raises on the first decode step."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, **kwargs):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("injected decode failure")
            return self.inner(**kwargs)

    broken = Broken(real["model"])
    scheduler = BatchScheduler(max_batch_size=8)
    collector = Collector(2)
    try:
        ids = tokenizer(PROMPTS[0])["input_ids"]
        scheduler.submit(collector.sequence(0, ids, params, Route("broken", broken), real))
        collector.wait(1)
        scheduler.submit(collector.sequence(1, ids, params, Route("base", real["model"]), real))
        collector.wait(1)
    finally:
        scheduler.close(10)
    assert "injected decode failure" in str(collector.errors[0])
    assert collector.finished[1].completion_tokens == 8


def test_close_ends_running_rows_as_shutdown(real):
    tokenizer = real["tokenizer"]
    params = SamplingParams(max_new_tokens=500, temperature=0.0, ignore_eos=True)
    scheduler = BatchScheduler(max_batch_size=8)
    collector = Collector(1)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    scheduler.submit(collector.sequence(0, ids, params, Route("base", real["model"]), real))
    while not collector.deltas[0]:
        time.sleep(0.01)
    scheduler.close(10)
    collector.wait(1)
    assert collector.finished[0].finish_reason == "shutdown"
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(collector.sequence(0, ids, params, Route("base", real["model"]), real))


def test_padded_prefill_of_different_lengths_gives_solo_tokens(real):
    """Three prompts of different lengths prefilled in one padded pass, then decoded together."""
    tokenizer = real["tokenizer"]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    indices = [0, 1, 3]
    routes = [
        Route("unfused", real["mixed"], real["rows"], coefficient_row(real, PAIRS[i]))
        for i in indices
    ]
    prompt_ids = [tokenizer(PROMPTS[i])["input_ids"] for i in indices]
    assert len({len(ids) for ids in prompt_ids}) == 3
    expected = [
        solo_tokens(real["mixed"], real, ids, params, real["rows"], route.coefficients)
        for ids, route in zip(prompt_ids, routes, strict=True)
    ]

    collector = Collector(3)
    sequences = [
        collector.sequence(i, ids, params, route, real)
        for i, (ids, route) in enumerate(zip(prompt_ids, routes, strict=True))
    ]
    group = DecodeGroup(real["mixed"], real["rows"])
    with torch.inference_mode():
        cache, mask, logits = group.prefill(sequences)
        assert mask.sum(dim=-1).tolist() == [len(ids) for ids in prompt_ids]
        group.join(sequences, cache, mask)
        tokens = [[] for _ in sequences]
        for _ in range(params.max_new_tokens):
            for row, sequence in enumerate(sequences):
                sequence.next_token = int(torch.argmax(logits[row]))
                tokens[row].append(sequence.next_token)
            logits = group.step()
    assert tokens == expected


def test_fused_rows_move_into_the_running_unfused_batch(real):
    """A fused request moves to the unfused group once it runs, and keeps its solo tokens."""
    tokenizer = real["tokenizer"]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    pairs = [PAIRS[0], PAIRS[1]]
    fused = fused_model_for(real, pairs[0])
    ids = [tokenizer(PROMPTS[i])["input_ids"] for i in (1, 3)]
    expected = [
        solo_tokens(fused, real, ids[0], params),
        solo_tokens(
            real["mixed"], real, ids[1], params, real["rows"], coefficient_row(real, pairs[1])
        ),
    ]

    moved, steps = [], []
    scheduler = BatchScheduler(max_batch_size=8, on_step=steps.append, on_move=moved.append)
    collector = Collector(2)
    released = threading.Event()
    try:
        first = collector.sequence(0, ids[0], params, Route(("fused", pairs[0]), fused), real)
        first.unfused_route = Route(
            "unfused", real["mixed"], real["rows"], coefficient_row(real, pairs[0])
        )
        first.on_move = released.set
        scheduler.submit(first)
        while len(collector.deltas[0]) < 3:
            time.sleep(0.01)
        route = Route("unfused", real["mixed"], real["rows"], coefficient_row(real, pairs[1]))
        scheduler.submit(collector.sequence(1, ids[1], params, route, real))
        collector.wait(2)
    finally:
        scheduler.close(10)
    assert moved == [1]
    assert released.is_set()
    assert first.route.group == "unfused"
    assert [collector.finished[i].token_ids for i in range(2)] == expected
    assert 2 in steps


def test_a_row_that_fails_to_sample_fails_alone(real):
    """One request whose sampling raises fails; the rows beside it finish, each exits once."""
    tokenizer = real["tokenizer"]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)

    class FailsOnThirdToken(DecodeState):
        def accept(self, logits):
            if len(self.detokenizer.ids) == 2:
                raise RuntimeError("probability tensor contains inf or nan")
            return super().accept(logits)

    exits = []
    collector = Collector(3)
    scheduler = BatchScheduler(max_batch_size=8)
    try:
        for index in range(3):
            sequence = collector.sequence(
                index,
                tokenizer(PROMPTS[index])["input_ids"],
                params,
                Route("base", real["model"]),
                real,
            )
            if index == 1:
                sequence.state = FailsOnThirdToken(tokenizer, params, real["eos"])
            release = sequence.on_exit
            sequence.on_exit = lambda index=index, release=release: (exits.append(index), release())
            scheduler.submit(sequence)
        collector.wait(3)
        time.sleep(0.2)  # a second exit, if any, would land here
    finally:
        scheduler.close(10)
    assert sorted(exits) == [0, 1, 2]
    assert "inf or nan" in str(collector.errors[1])
    assert collector.finished[0].completion_tokens == 10
    assert collector.finished[2].completion_tokens == 10


def test_long_prompt_prefills_in_chunks_between_decode_steps(real):
    """A prompt over the budget is prefilled chunk by chunk while a running row keeps decoding,
    and both get their solo tokens; short prompts are never padded to the long one."""
    tokenizer = real["tokenizer"]
    params = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    short_ids = tokenizer(PROMPTS[0])["input_ids"]
    long_ids = tokenizer(" ".join([PROMPTS[3]] * 6))["input_ids"]
    assert len(long_ids) > 4 * 16
    expected = [
        solo_tokens(real["model"], real, short_ids, params),
        solo_tokens(real["model"], real, long_ids, params),
    ]

    # tokens the running row had when the long one produced its first token
    steps_seen = []
    collector = Collector(2)
    scheduler = BatchScheduler(max_batch_size=8, prefill_chunk_tokens=16, on_step=steps_seen.append)
    try:
        route = Route("base", real["model"])
        scheduler.submit(collector.sequence(0, short_ids, params, route, real))
        while len(collector.deltas[0]) < 2:
            time.sleep(0.01)
        running_before = len(steps_seen)
        scheduler.submit(collector.sequence(1, long_ids, params, route, real))
        while not collector.deltas[1] and 1 not in collector.finished:
            time.sleep(0.005)
        steps_during_prefill = len(steps_seen) - running_before
        collector.wait(2)
    finally:
        scheduler.close(10)
    assert [collector.finished[i].token_ids for i in range(2)] == expected
    # the long prompt needs at least 4 chunks of 16, and the running row stepped between them
    assert steps_during_prefill >= 3, steps_during_prefill


def test_prefill_budget_splits_joining_prompts_and_keeps_their_tokens(real, monkeypatch):
    tokenizer = real["tokenizer"]
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    collector = Collector(4)
    sequences = [
        collector.sequence(
            i, tokenizer(PROMPTS[i])["input_ids"], params, Route("base", real["model"]), real
        )
        for i in range(4)
    ]
    budget = max(len(s.prompt_ids) for s in sequences) + 1
    padded_sizes = []
    original = DecodeGroup.prefill

    def recording_prefill(self, batch):
        padded_sizes.append(len(batch) * max(len(s.prompt_ids) for s in batch))
        return original(self, batch)

    monkeypatch.setattr(DecodeGroup, "prefill", recording_prefill)
    scheduler = BatchScheduler(max_batch_size=8, prefill_chunk_tokens=budget)
    with scheduler._condition:  # hold the loop so that all four wait together
        scheduler._incoming.extend(sequences)
        scheduler._condition.notify()
    try:
        collector.wait(4)
    finally:
        scheduler.close(10)
    assert len(padded_sizes) >= 2, "all four prompts went into one prefill over the budget"
    assert all(size <= budget for size in padded_sizes), (padded_sizes, budget)
    expected = [solo_tokens(real["model"], real, s.prompt_ids, params) for s in sequences]
    assert [collector.finished[i].token_ids for i in range(4)] == expected
