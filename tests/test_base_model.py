"""Loading a base model: its weights end up in the process's own memory, with ties kept."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_model import write_tiny_base

from peo_merge.base_model import load_base_model, resolve_base_model


def file_mappings(suffix: str) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files whose names end with ``suffix``."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(suffix):
                start, end = (int(value, 16) for value in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("base") / "model")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_weights_are_not_in_a_file_mapping(tiny_base):
    model, _ = load_base_model(resolve_base_model(str(tiny_base)))
    mapped = file_mappings(".safetensors")
    for name, parameter in model.named_parameters():
        pointer = parameter.data_ptr()
        inside = [(start, end) for start, end in mapped if start <= pointer < end]
        assert not inside, f"{name} still lives in a mapping of the safetensors file"


def test_loaded_weights_keep_their_values_and_ties(tiny_base):
    from transformers import AutoModelForCausalLM

    model, _ = load_base_model(resolve_base_model(str(tiny_base)))
    reference = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    expected = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, expected[name]), name
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
