"""Tests for the fusion of task vectors onto base weights and for the fused model.

Tolerances: every fused fp32 weight must match a float64 reference computed in this file,
``W0 + sum(c * s * (B @ A))`` or ``W0 + sum(c * delta)``, with a max abs error of at most
``FP32_ATOL = 1e-5``. The weights and deltas here have magnitudes of order 1, so this bound is
about 100 fp32 ulps. A bf16 output buffer must hold exactly the fp32 result cast once to bf16,
and so lies within half a bf16 ulp (relative 2**-8) of the float64 reference.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peo_merge.fused_model import base_state, build_fused_model
from peo_merge.fusion import Fuser, fuse_reference
from peo_merge.task_vector import TaskVector

torch.set_num_threads(1)

FP32_ATOL = 1e-5
BF16_RTOL = 2.0**-8
COEFFICIENTS = (-0.5, 0.0, 1.0, 1.5)
COEFFICIENT_PAIRS = list(itertools.product(COEFFICIENTS, repeat=2))

Q_PROJ = "layer.q_proj.weight"
V_PROJ = "layer.v_proj.weight"
O_PROJ = "layer.o_proj.weight"
NORM = "layer.norm.weight"
# Shapes chosen with out != in so that a transposed factor product fails loudly.
SHAPES = {Q_PROJ: (12, 8), V_PROJ: (6, 8), O_PROJ: (8, 12), NORM: (8,)}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _synthetic_base() -> dict[str, torch.Tensor]:
    generator = _generator(0)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _lowrank_vector(
    name: str, targets: list[str], rank: int, scaling: float, seed: int
) -> TaskVector:
    generator = _generator(seed)
    factors = {}
    for target in targets:
        out_features, in_features = SHAPES[target]
        lora_a = torch.randn(rank, in_features, generator=generator)
        lora_b = torch.randn(out_features, rank, generator=generator)
        factors[target] = (lora_a, lora_b)
    return TaskVector(name, "lowrank", scaling, factors=factors)


def _dense_vector(name: str, targets: list[str], seed: int) -> TaskVector:
    generator = _generator(seed)
    deltas = {target: torch.randn(SHAPES[target], generator=generator) for target in targets}
    return TaskVector(name, "dense", 1.0, deltas=deltas)


def _lowrank_vectors() -> dict[str, TaskVector]:
    """Two vectors with different ranks, scalings and partly overlapping targets."""
    return {
        "helpfulness": _lowrank_vector("helpfulness", [Q_PROJ, V_PROJ], 4, scaling=2.0, seed=1),
        "harmlessness": _lowrank_vector("harmlessness", [Q_PROJ, O_PROJ], 2, scaling=0.5, seed=2),
    }


def _reference(
    base: dict[str, torch.Tensor], vectors: dict[str, TaskVector], coefficients: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Compute the fused targets in float64 straight from the factors or deltas."""
    reference = {}
    for vector in vectors.values():
        for target in vector.factors or vector.deltas:
            reference.setdefault(target, base[target].detach().double().clone())
    for name, vector in vectors.items():
        coefficient = coefficients.get(name, 0.0)
        for target, (lora_a, lora_b) in vector.factors.items():
            product = lora_b.detach().double() @ lora_a.detach().double()
            reference[target] += coefficient * vector.scaling * product
        for target, delta in vector.deltas.items():
            reference[target] += coefficient * delta.detach().double()
    return reference


def _max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double() - expected.double()).abs().max().item()


# Fuser against the float64 reference


@pytest.mark.parametrize("expand", ["lowrank", "dense"])
@pytest.mark.parametrize(("help_coefficient", "harm_coefficient"), COEFFICIENT_PAIRS)
def test_fuser_lowrank_matches_float64_reference(expand, help_coefficient, harm_coefficient):
    base = _synthetic_base()
    vectors = _lowrank_vectors()
    coefficients = {"helpfulness": help_coefficient, "harmlessness": harm_coefficient}
    fuser = Fuser(base, vectors, expand=expand)
    buffers = fuser.allocate()

    fuser.fuse_into(buffers, coefficients)

    reference = _reference(base, vectors, coefficients)
    assert sorted(buffers) == sorted(reference)
    for target, expected in reference.items():
        assert buffers[target].dtype == torch.float32
        assert _max_abs_error(buffers[target], expected) <= FP32_ATOL, target


@pytest.mark.parametrize("expand", ["lowrank", "dense"])
@pytest.mark.parametrize(("dense_coefficient", "lowrank_coefficient"), COEFFICIENT_PAIRS)
def test_fuser_dense_vector_matches_float64_reference(
    expand, dense_coefficient, lowrank_coefficient
):
    base = _synthetic_base()
    vectors = {
        "generalist": _dense_vector("generalist", [Q_PROJ, NORM], seed=3),
        "helpfulness": _lowrank_vector("helpfulness", [Q_PROJ], rank=3, scaling=1.5, seed=4),
    }
    coefficients = {"generalist": dense_coefficient, "helpfulness": lowrank_coefficient}
    fuser = Fuser(base, vectors, expand=expand)
    buffers = fuser.allocate()

    fuser.fuse_into(buffers, coefficients)

    reference = _reference(base, vectors, coefficients)
    assert sorted(buffers) == sorted([Q_PROJ, NORM])
    for target, expected in reference.items():
        assert _max_abs_error(buffers[target], expected) <= FP32_ATOL, target


@pytest.mark.parametrize("expand", ["lowrank", "dense"])
def test_fuser_zero_coefficients_give_base_exactly(expand):
    base = _synthetic_base()
    fuser = Fuser(base, _lowrank_vectors(), expand=expand)
    buffers = fuser.allocate()

    fuser.fuse_into(buffers, {"helpfulness": 0.0, "harmlessness": 0.0})

    for target, buffer in buffers.items():
        assert torch.equal(buffer, base[target]), target


def test_fuser_missing_coefficient_counts_as_zero():
    base = _synthetic_base()
    vectors = _lowrank_vectors()
    fuser = Fuser(base, vectors)
    buffers = fuser.allocate()

    fuser.fuse_into(buffers, {"helpfulness": 1.5})

    reference = _reference(base, vectors, {"helpfulness": 1.5, "harmlessness": 0.0})
    for target, expected in reference.items():
        assert _max_abs_error(buffers[target], expected) <= FP32_ATOL, target


@pytest.mark.parametrize(("help_coefficient", "harm_coefficient"), COEFFICIENT_PAIRS)
def test_fuse_reference_matches_independent_reference(help_coefficient, harm_coefficient):
    base = _synthetic_base()
    vectors = {**_lowrank_vectors(), "generalist": _dense_vector("generalist", [V_PROJ], seed=5)}
    coefficients = {
        "helpfulness": help_coefficient,
        "harmlessness": harm_coefficient,
        "generalist": 1.0,
    }

    fused = fuse_reference(base, vectors, coefficients)

    expected = _reference(base, vectors, coefficients)
    assert sorted(fused) == sorted(expected)
    for target, tensor in fused.items():
        assert tensor.dtype == torch.float64
        assert _max_abs_error(tensor, expected[target]) <= 1e-12, target


# Output dtype, in-place writes and errors


@pytest.mark.parametrize("expand", ["lowrank", "dense"])
@pytest.mark.parametrize(("help_coefficient", "harm_coefficient"), [(1.5, -0.5), (1.0, 0.0)])
def test_fuser_bf16_equals_cast_fp32_result(expand, help_coefficient, harm_coefficient):
    base = _synthetic_base()
    vectors = {**_lowrank_vectors(), "generalist": _dense_vector("generalist", [Q_PROJ], seed=6)}
    coefficients = {
        "helpfulness": help_coefficient,
        "harmlessness": harm_coefficient,
        "generalist": 1.0,
    }
    fuser = Fuser(base, vectors, expand=expand)
    fp32_buffers = fuser.allocate()
    bf16_buffers = fuser.allocate(torch.bfloat16)

    fuser.fuse_into(fp32_buffers, coefficients)
    fuser.fuse_into(bf16_buffers, coefficients)

    reference = _reference(base, vectors, coefficients)
    for target, bf16 in bf16_buffers.items():
        assert bf16.dtype == torch.bfloat16
        assert torch.equal(bf16, fp32_buffers[target].to(torch.bfloat16)), target
        torch.testing.assert_close(bf16.double(), reference[target], rtol=BF16_RTOL, atol=FP32_ATOL)


@pytest.mark.parametrize("expand", ["lowrank", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuser_writes_in_place(expand, dtype):
    base = _synthetic_base()
    fuser = Fuser(base, _lowrank_vectors(), expand=expand)
    buffers = fuser.allocate(dtype)
    pointers = {target: buffer.data_ptr() for target, buffer in buffers.items()}

    fuser.fuse_into(buffers, {"helpfulness": 1.0, "harmlessness": 0.0})
    fuser.fuse_into(buffers, {"helpfulness": -0.5, "harmlessness": 1.5})

    for target, buffer in buffers.items():
        assert buffer.data_ptr() == pointers[target], target


@pytest.mark.parametrize("expand", ["lowrank", "dense"])
def test_fuser_second_fusion_overwrites_first(expand):
    base = _synthetic_base()
    vectors = {**_lowrank_vectors(), "generalist": _dense_vector("generalist", [O_PROJ], seed=7)}
    fuser = Fuser(base, vectors, expand=expand)
    buffers = fuser.allocate()
    for buffer in buffers.values():
        buffer.fill_(1e6)
    second = {"helpfulness": 0.0, "harmlessness": 1.0, "generalist": 1.0}

    fuser.fuse_into(buffers, {"helpfulness": 1.5, "harmlessness": -0.5, "generalist": 1.5})
    fuser.fuse_into(buffers, second)

    reference = _reference(base, vectors, second)
    for target, expected in reference.items():
        assert _max_abs_error(buffers[target], expected) <= FP32_ATOL, target


def test_fuser_unknown_vector_name():
    fuser = Fuser(_synthetic_base(), _lowrank_vectors())
    buffers = fuser.allocate()

    with pytest.raises(KeyError, match="verbosity"):
        fuser.fuse_into(buffers, {"helpfulness": 1.0, "verbosity": 0.5})


def test_fuser_unknown_expand_mode():
    with pytest.raises(ValueError, match="expand"):
        Fuser(_synthetic_base(), _lowrank_vectors(), expand="sparse")


def test_fuser_does_not_modify_base_weights():
    base = _synthetic_base()
    snapshot = {name: tensor.clone() for name, tensor in base.items()}
    fuser = Fuser(base, _lowrank_vectors())

    fuser.fuse_into(fuser.allocate(), {"helpfulness": 1.5, "harmlessness": -0.5})

    for name, tensor in base.items():
        assert torch.equal(tensor, snapshot[name]), name


# The fused model on a tiny tied-embedding Llama

TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def _tiny_llama_config(tie_word_embeddings: bool = True) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config()).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _vector_for(model, name: str, targets: list[str], seed: int) -> TaskVector:
    generator = _generator(seed)
    state = base_state(model)
    factors = {}
    for target in targets:
        out_features, in_features = state[target].shape
        lora_a = 0.1 * torch.randn(4, in_features, generator=generator)
        lora_b = 0.1 * torch.randn(out_features, 4, generator=generator)
        factors[target] = (lora_a, lora_b)
    return TaskVector(name, "lowrank", 2.0, factors=factors)


def _fuse_tiny(model, targets: list[str], coefficient: float = 1.5):
    """Fuse one vector onto ``model`` and return the fused model and the float64 reference."""
    vector = _vector_for(model, "helpfulness", targets, seed=11)
    state = base_state(model)
    fuser = Fuser(state, {"helpfulness": vector})
    buffers = fuser.allocate()
    fuser.fuse_into(buffers, {"helpfulness": coefficient})
    fused_model = build_fused_model(model, buffers)
    reference = _reference(state, {"helpfulness": vector}, {"helpfulness": coefficient})
    return fused_model, buffers, reference


def _reference_model(model, reference: dict[str, torch.Tensor]):
    """Build an untied model holding the base weights with ``reference`` loaded over them."""
    untied = LlamaForCausalLM(_tiny_llama_config(tie_word_embeddings=False)).eval()
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    weights.update({name: tensor.float() for name, tensor in reference.items()})
    untied.load_state_dict(weights, strict=True)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    return untied


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_base_state_lists_both_tied_names(tiny_llama):
    state = base_state(tiny_llama)

    assert "lm_head.weight" in state
    assert "model.embed_tokens.weight" in state
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]


def test_fused_lm_head_leaves_embedding_as_base(tiny_llama):
    base_embedding = tiny_llama.model.embed_tokens.weight
    embedding_values = base_embedding.detach().clone()

    fused_model, buffers, reference = _fuse_tiny(tiny_llama, ["lm_head.weight"])

    assert fused_model.model.embed_tokens.weight is base_embedding
    assert torch.equal(fused_model.model.embed_tokens.weight, embedding_values)
    assert fused_model.lm_head.weight is not base_embedding
    assert fused_model.lm_head.weight.data_ptr() == buffers["lm_head.weight"].data_ptr()
    assert _max_abs_error(fused_model.lm_head.weight, reference["lm_head.weight"]) <= FP32_ATOL


def test_fused_embedding_leaves_lm_head_as_base(tiny_llama):
    base_head = tiny_llama.lm_head.weight
    head_values = base_head.detach().clone()

    fused_model, buffers, reference = _fuse_tiny(tiny_llama, ["model.embed_tokens.weight"])

    assert fused_model.lm_head.weight is base_head
    assert torch.equal(fused_model.lm_head.weight, head_values)
    assert fused_model.model.embed_tokens.weight is not base_head
    embedding = fused_model.model.embed_tokens.weight
    assert embedding.data_ptr() == buffers["model.embed_tokens.weight"].data_ptr()
    assert _max_abs_error(embedding, reference["model.embed_tokens.weight"]) <= FP32_ATOL


@pytest.mark.parametrize(
    "targets",
    [
        ["lm_head.weight"],
        ["model.embed_tokens.weight"],
        ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"],
    ],
)
def test_build_fused_model_leaves_base_unmodified(tiny_llama, targets):
    before = _snapshot(tiny_llama)
    parameters_before = {name: id(parameter) for name, parameter in tiny_llama.named_parameters()}

    _fuse_tiny(tiny_llama, targets)

    after = _snapshot(tiny_llama)
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    parameters_after = {name: id(parameter) for name, parameter in tiny_llama.named_parameters()}
    assert parameters_after == parameters_before
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight


@pytest.mark.parametrize(
    "targets",
    [
        ["lm_head.weight"],
        ["model.embed_tokens.weight"],
        ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"],
    ],
)
def test_build_fused_model_shares_untouched_tensors(tiny_llama, targets):
    fused_model, _, _ = _fuse_tiny(tiny_llama, targets)

    base_tensors = base_state(tiny_llama)
    fused_tensors = base_state(fused_model)
    assert sorted(fused_tensors) == sorted(base_tensors)
    for name, tensor in fused_tensors.items():
        if name in targets:
            assert tensor is not base_tensors[name], name
            assert tensor.data_ptr() != base_tensors[name].data_ptr(), name
        else:
            assert tensor is base_tensors[name], name
            assert tensor.data_ptr() == base_tensors[name].data_ptr(), name

    base_buffers = dict(tiny_llama.named_buffers())
    fused_buffers = dict(fused_model.named_buffers())
    assert sorted(fused_buffers) == sorted(base_buffers)
    for name, buffer in fused_buffers.items():
        assert buffer is base_buffers[name], name


@pytest.mark.parametrize(
    "targets",
    [
        ["lm_head.weight"],
        ["model.embed_tokens.weight"],
        ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"],
    ],
)
def test_fused_model_forward_matches_reference_model(tiny_llama, targets):
    fused_model, _, reference = _fuse_tiny(tiny_llama, targets)
    reference_model = _reference_model(tiny_llama, reference)

    with torch.no_grad():
        fused_logits = fused_model(TOKENS).logits
        reference_logits = reference_model(TOKENS).logits
        base_logits = tiny_llama(TOKENS).logits

    torch.testing.assert_close(fused_logits, reference_logits, rtol=0.0, atol=FP32_ATOL)
    assert not torch.allclose(fused_logits, base_logits, rtol=0.0, atol=FP32_ATOL)


def test_fused_model_sees_later_fusions(tiny_llama):
    target = "model.layers.0.self_attn.q_proj.weight"
    vector = _vector_for(tiny_llama, "helpfulness", [target], seed=12)
    state = base_state(tiny_llama)
    fuser = Fuser(state, {"helpfulness": vector})
    buffers = fuser.allocate()
    fuser.fuse_into(buffers, {"helpfulness": 1.0})
    fused_model = build_fused_model(tiny_llama, buffers)

    fuser.fuse_into(buffers, {"helpfulness": -0.5})

    reference = _reference(state, {"helpfulness": vector}, {"helpfulness": -0.5})
    fused_weight = fused_model.get_parameter(target)
    assert _max_abs_error(fused_weight, reference[target]) <= FP32_ATOL


def test_build_fused_model_rejects_wrong_shape(tiny_llama):
    wrong = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)}

    with pytest.raises(ValueError, match="q_proj"):
        build_fused_model(tiny_llama, wrong)
