"""Every committed bundle: its files match the manifest and its tensors fit the real base model."""

from __future__ import annotations

from pathlib import Path

import pytest

from peo_merge.base_model import load_base_model, resolve_base_model
from peo_merge.bundle import load_bundle
from peo_merge.fused_model import base_state
from peo_merge.validation import validate_against_base

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
BUNDLES = sorted(path.parent for path in CHECKPOINTS.glob("*/manifest.json"))
MANIFEST_FIELDS = (
    "data_files",
    "steps",
    "batch_size",
    "max_length",
    "learning_rate",
    "lora_rank",
    "lora_targets",
    "seed",
    "wall_time_seconds",
)


@pytest.fixture(scope="module")
def base():
    model, _ = load_base_model(resolve_base_model(None))
    return base_state(model)


def test_checkpoints_folder_has_bundles():
    assert len(BUNDLES) >= 2


@pytest.mark.parametrize("folder", BUNDLES, ids=lambda path: path.name)
def test_committed_bundle_fits_base(folder, base):
    bundle = load_bundle(folder)
    validate_against_base(bundle, base)
    assert {"helpfulness", "harmlessness"} <= set(bundle.vectors)
    for name, entry in bundle.manifest.vectors.items():
        missing = [field for field in MANIFEST_FIELDS if field not in entry.recipe]
        assert missing == [], f"{folder.name}: recipe of {name} lacks {missing}"
