"""Build a tiny Llama base with the real tokenizer, and a bundle of task vectors that fits it.

The tiny model has random weights, so its text is noise, but it loads in about a second and
goes through the same engine, fusion and generation code as the real base model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from peo_merge.base_model import resolve_base_model
from peo_merge.bundle import FORMAT_VERSION, Manifest, VectorEntry, write_manifest
from peo_merge.fused_model import base_state
from peo_merge.task_vector import TaskVector, save_task_vector

logger = logging.getLogger(__name__)

TARGET_MODULES = ("q_proj", "v_proj")
RANK = 2


def tiny_llama_config(vocab_size: int, hidden_size: int = 32) -> LlamaConfig:
    """Return the config of a two-layer Llama, small enough to build and run in tests."""
    return LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def write_tiny_base(folder: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny random Llama and the real base model's tokenizer into ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(None).path)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size)).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    logger.debug("wrote tiny base with hidden size %d to %s", hidden_size, folder)
    return folder


def write_tiny_encoder(folder: Path, tokenizer, layers: int = 2) -> Path:
    """Save a tiny random BERT with a one-output head and ``tokenizer`` into ``folder``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_bundle(folder: Path, base_folder: Path, seed: int = 1) -> Path:
    """Write a bundle of low-rank helpfulness and harmlessness vectors shaped for a tiny base."""
    model = LlamaForCausalLM.from_pretrained(base_folder)
    state = base_state(model)
    targets = sorted(name for name in state if name.rsplit(".", 2)[-2] in TARGET_MODULES)
    generator = torch.Generator().manual_seed(seed)
    entries = {}
    for name in ("helpfulness", "harmlessness"):
        factors = {}
        for target in targets:
            out_features, in_features = state[target].shape
            lora_a = 0.1 * torch.randn(RANK, in_features, generator=generator)
            lora_b = 0.1 * torch.randn(out_features, RANK, generator=generator)
            factors[target] = (lora_a, lora_b)
        relative = f"vectors/{name}.safetensors"
        save_task_vector(TaskVector(name, "lowrank", 2.0, factors=factors), folder / relative)
        entries[name] = VectorEntry(
            file=relative, kind="lowrank", target_modules=TARGET_MODULES, rank=RANK, scaling=2.0
        )
    manifest = Manifest(
        format_version=FORMAT_VERSION, name="tiny", base_model={"origin": "tiny"}, vectors=entries
    )
    write_manifest(folder, manifest)
    return folder
