"""Property tests: request validation, coefficient bounds, sampling and fusion on random inputs.

Fusion is checked against the independent float64 reference of tests/test_fusion.py, within its
tolerance ``FP32_ATOL``: a max abs error of 1e-5 on every fused fp32 weight.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from test_fusion import FP32_ATOL, _reference
from tiny_model import tiny_llama_config, write_tiny_base, write_tiny_bundle
from transformers import LlamaForCausalLM

from peo_merge.fused_model import base_state
from peo_merge.fusion import Fuser
from peo_merge.task_vector import TaskVector
from server.engine import Engine, RequestError
from server.generation import SamplingParams, sample_token
from server.schemas import MAX_SEED, GenerateRequest
from server.settings import Settings

torch.set_num_threads(1)

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# JSON values of any shape, for bodies that may or may not be valid requests
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
request_keys = st.sampled_from(sorted(GenerateRequest.model_fields)) | st.text(max_size=12)
random_bodies = st.dictionaries(request_keys, json_values, max_size=8)

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(min_size=1)}
    ),
    min_size=1,
    max_size=4,
)
sampling_fields = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.integers(min_value=1, max_value=10**6),
        "temperature": st.floats(min_value=0.0, max_value=5.0),
        "top_p": st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
        "top_k": st.integers(min_value=0, max_value=100_000),
        "seed": st.integers(min_value=0, max_value=MAX_SEED),
        "stop": st.lists(st.text(min_size=1, max_size=256), max_size=4),
        "ignore_eos": st.booleans(),
        "stream": st.booleans(),
    },
)
steering = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"preference": st.floats(min_value=0.0, max_value=1.0)}),
    st.fixed_dictionaries(
        {
            "coefficients": st.fixed_dictionaries(
                {"helpfulness": finite_floats, "harmlessness": finite_floats}
            )
        }
    ),
)
valid_bodies = st.builds(
    lambda source, steer, fields: source | steer | fields,
    st.one_of(
        st.fixed_dictionaries({"prompt": st.text(min_size=1)}),
        st.fixed_dictionaries({"messages": messages}),
    ),
    steering,
    sampling_fields,
)
outside_unit_interval = st.one_of(
    st.floats(max_value=0.0, exclude_max=True),
    st.floats(min_value=1.0, exclude_min=True),
)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    """A real engine on a tiny random Llama and a bundle with the default bounds [-1, 2]."""
    root = tmp_path_factory.mktemp("tiny")
    base = write_tiny_base(root / "base")
    bundle = write_tiny_bundle(root / "bundle", base)
    return Engine(Settings(base_model=str(base), bundle=bundle, threads=1, cache_max_entries=1))


# request validation


@PROPERTY_SETTINGS
@given(body=random_bodies)
def test_request_random_json_validates_or_raises(body):
    try:
        request = GenerateRequest.model_validate(body)
    except ValidationError as error:
        assert error.errors()
        return
    assert (request.prompt is None) != (request.messages is None)
    assert set(body) <= set(GenerateRequest.model_fields)


@PROPERTY_SETTINGS
@given(body=valid_bodies)
def test_request_valid_bodies_are_accepted(body):
    request = GenerateRequest.model_validate(body)
    assert request.prompt == body.get("prompt")
    assert request.stream == body.get("stream", False)
    if "preference" in body:
        assert request.preference == body["preference"]


@PROPERTY_SETTINGS
@given(preference=outside_unit_interval | st.sampled_from([math.nan, math.inf, -math.inf]))
def test_request_preference_outside_unit_rejected(preference):
    with pytest.raises(ValidationError) as raised:
        GenerateRequest.model_validate({"prompt": "x", "preference": preference})
    locations = [item["loc"] for item in raised.value.errors()]
    assert ("preference",) in locations


@PROPERTY_SETTINGS
@given(
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
    field=st.sampled_from(["helpfulness", "harmlessness"]),
)
def test_request_non_finite_coefficient_rejected(value, field):
    coefficients = {"helpfulness": 0.0, "harmlessness": 0.0} | {field: value}
    with pytest.raises(ValidationError) as raised:
        GenerateRequest.model_validate({"prompt": "x", "coefficients": coefficients})
    locations = [item["loc"] for item in raised.value.errors()]
    assert ("coefficients", field) in locations


# coefficient bounds


@PROPERTY_SETTINGS
@given(
    alpha=st.floats(min_value=-1.0, max_value=2.0), beta=st.floats(min_value=-1.0, max_value=2.0)
)
def test_engine_coefficients_within_bounds_resolve(tiny_engine, alpha, beta):
    step = tiny_engine.settings.coefficient_step
    _, (rounded_alpha, rounded_beta) = tiny_engine.resolve_coefficients(
        None, {"helpfulness": alpha, "harmlessness": beta}
    )
    assert abs(rounded_alpha - alpha) <= step / 2 + 1e-9
    assert abs(rounded_beta - beta) <= step / 2 + 1e-9
    assert -1.0 <= rounded_alpha <= 2.0
    assert -1.0 <= rounded_beta <= 2.0


@PROPERTY_SETTINGS
@given(
    value=st.floats(max_value=-1.0, exclude_max=True) | st.floats(min_value=2.0, exclude_min=True),
    field=st.sampled_from(["helpfulness", "harmlessness"]),
)
def test_engine_coefficients_outside_bounds_rejected(tiny_engine, value, field):
    coefficients = {"helpfulness": 0.5, "harmlessness": 0.5} | {field: value}
    with pytest.raises(RequestError) as raised:
        tiny_engine.resolve_coefficients(None, coefficients)
    assert raised.value.status == 422
    assert raised.value.field == f"coefficients.{field}"
    assert f"coefficients.{field}" in raised.value.message


@PROPERTY_SETTINGS
@given(preference=st.floats(min_value=0.0, max_value=1.0))
def test_engine_preference_maps_inside_bounds(tiny_engine, preference):
    used, (alpha, beta) = tiny_engine.resolve_coefficients(preference, None)
    assert used == preference
    assert -1.0 <= alpha <= 2.0
    assert -1.0 <= beta <= 2.0


# sampling


logit_rows = st.lists(
    st.floats(min_value=-1e4, max_value=1e4, width=32), min_size=2, max_size=64
).map(lambda values: torch.tensor(values, dtype=torch.float32))


@PROPERTY_SETTINGS
@given(
    logits=logit_rows,
    temperature=st.floats(min_value=0.0, max_value=5.0) | st.sampled_from([1e-300, 5e-324, 1e-45]),
    top_p=st.floats(min_value=0.0, max_value=1.0, exclude_min=True) | st.just(1e-300),
    top_k=st.integers(min_value=0, max_value=100),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_sample_token_valid_parameters_give_index(logits, temperature, top_p, top_k, seed):
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k)
    generator = torch.Generator().manual_seed(seed)
    token = sample_token(logits, params, generator)
    assert 0 <= token < logits.numel()
    assert math.isfinite(float(logits[token]))


@PROPERTY_SETTINGS
@given(logits=logit_rows, temperature=st.floats(min_value=0.0, max_value=5.0))
def test_sample_token_top_k_one_is_argmax(logits, temperature):
    assume(int((logits == logits.max()).sum()) == 1)
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=1)
    token = sample_token(logits, params, torch.Generator().manual_seed(0))
    assert token == int(torch.argmax(logits))


# fusion on a tiny Llama


@pytest.fixture(scope="module")
def tiny_fusion():
    """A tiny Llama's state and two low-rank vectors on its attention and MLP weights."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=64)).eval()
    state = base_state(model)
    targets = [name for name in state if name.endswith(("q_proj.weight", "down_proj.weight"))]
    generator = torch.Generator().manual_seed(7)
    vectors = {}
    for name, rank, scaling in (("helpfulness", 4, 2.0), ("harmlessness", 2, 0.5)):
        factors = {}
        for target in targets:
            out_features, in_features = state[target].shape
            factors[target] = (
                torch.randn(rank, in_features, generator=generator),
                torch.randn(out_features, rank, generator=generator),
            )
        vectors[name] = TaskVector(name, "lowrank", scaling, factors=factors)
    return state, vectors


@PROPERTY_SETTINGS
@given(
    alpha=st.floats(min_value=-1.0, max_value=2.0),
    beta=st.floats(min_value=-1.0, max_value=2.0),
    expand=st.sampled_from(["lowrank", "dense"]),
)
def test_fuser_random_pairs_match_float64_reference(tiny_fusion, alpha, beta, expand):
    state, vectors = tiny_fusion
    coefficients = {"helpfulness": alpha, "harmlessness": beta}
    fuser = Fuser(state, vectors, expand=expand)
    buffers = fuser.allocate()

    fuser.fuse_into(buffers, coefficients)

    reference = _reference(state, vectors, coefficients)
    assert sorted(buffers) == sorted(reference)
    for target, expected in reference.items():
        error = (buffers[target].double() - expected).abs().max().item()
        assert error <= FP32_ATOL, (target, error)
