"""Train the generalist task vector τ_gen from the interpolated initialisation, resumably.

Run as ``python -m training.generalist --bundle DIR --data PATH ... --output-dir DIR``. The
policy starts at θ_init = θ₀ + λ·τ_help + (1 − λ)·τ_harm, fused from the bundle's two aspect
vectors (λ = 0.5 unless ``--init-weight`` sets it), and is trained once with DPO on the
mixed data: the helpfulness and harmlessness pairs together. The LoRA learned on top of θ_init is
τ_gen = θ_gen − θ_init. The DPO reference is θ_init itself (the adapter switched off).

The run writes what :mod:`training.dpo` writes (``task_vector.safetensors`` and ``record.json``,
resumable from checkpoints), and the record gains an ``init`` entry: λ, the bundle and the sha256
of each vector file fused into θ_init.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from pydantic import ValidationError

from peo_merge.base_model import load_base_model, resolve_base_model, sha256_file
from peo_merge.bundle import load_bundle, read_manifest
from peo_merge.fused_model import base_state
from peo_merge.fusion import Fuser
from training.config import AspectRunConfig, describe_option_errors
from training.dpo import (
    RECORD_FILE,
    build_parser,
    config_from_args,
    export_newest_checkpoint,
    finished_vector,
    train_aspect,
)

logger = logging.getLogger(__name__)

INIT_FILE = "init.json"


def init_coefficients(init_weight: float) -> dict[str, float]:
    """Return the coefficients of θ_init = θ₀ + λ·τ_help + (1 − λ)·τ_harm."""
    if not 0.0 <= init_weight <= 1.0:
        raise ValueError(f"init_weight (λ) is {init_weight}; allowed: a number in [0, 1]")
    return {"helpfulness": init_weight, "harmlessness": 1.0 - init_weight}


def fuse_into_model(model, bundle_path: Path, coefficients: dict[str, float]) -> None:
    """Overwrite the model's targeted weights with θ₀ + Σ cₖ·τₖ from the bundle's vectors.

    Raises:
        KeyError: the bundle lacks one of the aspect vectors, naming it and what it has.
    """
    bundle = load_bundle(bundle_path)
    missing = [name for name in coefficients if name not in bundle.vectors]
    if missing:
        raise KeyError(
            f"bundle {bundle_path} has no vector {missing[0]!r}; it has {sorted(bundle.vectors)}"
        )
    vectors = {name: bundle.vectors[name] for name in coefficients}
    state = base_state(model)
    fuser = Fuser(state, vectors)
    buffers = fuser.allocate()
    fuser.fuse_into(buffers, coefficients)
    with torch.no_grad():
        for name, fused in buffers.items():
            state[name].copy_(fused)


def expected_init(bundle_path: Path, init_weight: float) -> dict:
    """Return the ``init`` entry of a generalist started from ``bundle_path`` with λ."""
    coefficients = init_coefficients(init_weight)
    manifest = read_manifest(bundle_path)
    missing = [name for name in coefficients if name not in manifest.vectors]
    if missing:
        raise KeyError(
            f"bundle {bundle_path} has no vector {missing[0]!r}; it has {sorted(manifest.vectors)}"
        )
    return {
        "lambda": init_weight,
        "coefficients": coefficients,
        "vector_sha256": {
            name: sha256_file(Path(bundle_path) / manifest.vectors[name].file)
            for name in coefficients
        },
    }


def train_generalist(config: AspectRunConfig, bundle_path: Path, init_weight: float = 0.5) -> Path:
    """Fuse θ_init, train τ_gen on top with DPO, and record the initialisation.

    The initialisation is written to ``init.json`` before training starts, so a run is resumed
    only from the same θ_init, and a finished run of the same θ_init and settings is kept.

    Returns:
        The path of the exported task vector file.

    Raises:
        ValueError: the run folder was begun from another θ_init.
    """
    init = expected_init(bundle_path, init_weight)
    finished = finished_vector(config, init)
    if finished is not None:
        logger.info("generalist: %s contains this run, already finished; kept", finished)
        return finished
    init_path = config.output_dir / INIT_FILE
    if init_path.is_file() and json.loads(init_path.read_text()) != init:
        raise ValueError(
            f"{config.output_dir} was begun from another θ_init ({init_path}); resume it with "
            "that bundle and λ, or choose another output folder"
        )
    config.output_dir.mkdir(parents=True, exist_ok=True)
    init_path.write_text(json.dumps(init, indent=2) + "\n")

    model, tokenizer = load_base_model(resolve_base_model(config.base_model))
    fuse_into_model(model, bundle_path, init["coefficients"])
    logger.info("generalist: θ_init fused with %s from %s", init["coefficients"], bundle_path)
    vector_path = train_aspect(config, model=model, tokenizer=tokenizer, expected_init=init)
    record_init(config, bundle_path, init_weight, init)
    return vector_path


def record_init(
    config: AspectRunConfig, bundle_path: Path, init_weight: float, init: dict | None = None
) -> None:
    """Add the ``init`` entry (λ, the bundle, its vector hashes) to the run's ``record.json``.

    ``init`` is the entry of :func:`expected_init` when the caller has computed it already.
    """
    record_path = config.output_dir / RECORD_FILE
    record = json.loads(record_path.read_text())
    init = init or expected_init(bundle_path, init_weight)
    record["init"] = init | {"bundle": str(bundle_path)}
    record_path.write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = build_parser(aspect_required=False)
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--bundle", required=True, type=Path, help="bundle with both vectors")
    parser.add_argument("--init-weight", type=float, default=0.5, help="λ of θ_init")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, aspect="mixed")
    except ValidationError as error:
        parser.error(describe_option_errors(error))
    if args.export_checkpoint:
        export_newest_checkpoint(config)
        record_init(config, args.bundle, args.init_weight)
    else:
        train_generalist(config, args.bundle, args.init_weight)


if __name__ == "__main__":
    main()
